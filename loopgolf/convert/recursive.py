"""Tie a vanilla model's layers into a recursive one, and relax the tying with SVD-initialised
per-virtual-layer LoRA: the conversion of "Relaxed Recursive Transformers" (Bae et al., ICLR 2025,
arXiv:2410.20672; summarised in docs/background.md).

An L-layer source becomes a plan with V = L virtual layers over K stored blocks (CYCLE K x B or
SEQUENCE K x B, K * B = L); virtual layer v takes the place of source layer v. Stored block j
runs the *group* of virtual layers ``{v : attn_of[v] == j}`` and is initialised by:

- ``stepwise``: source layer ``floor(j (L - 1) / (K - 1))``: a fixed interval keeping the first
  and the last layer (6 layers, K = 3: layers 0, 2, 5, the paper's 1, 3, 6);
- ``average``: the mean of the layers of its group;
- ``lower``: layer j (the first K layers); ``upper``: layer L - K + j (the last K);
- ``random``: the fresh model's own initialisation (a baseline; embeddings, final norm and
  head are still copied, as for every strategy).

Vectors (norm gains and biases, projection biases, attn/mlp scales, residual mixes, q gains) are
per virtual layer (``per_layer_controls``, the default for a relaxed model): each virtual layer
keeps its source layer's own. With shared controls they are picked or averaged like the
matrices (never zeroed). Embeddings, positions, the final norm, the head, U-Net skips and depth
embeddings are copied.

Relaxation: for each virtual layer v and LoRA target t, the residual ``R = W_v - W'_j`` (source
layer minus its stored block) is factored by truncated SVD, ``R ~ U_r S_r V_r^T``; loopgolf's
adapter computes ``y += s * (x @ A) @ B`` with ``A`` (in, r) and ``B`` (r, out), so ``A = V_r``
and ``B = S_r U_r^T / s``: dividing by the runtime scale s = alpha / r makes ``s A B = R_r^T``
exactly (factors left unscaled while the forward multiplies by s would not reproduce the source,
the first pitfall docs/background.md lists for recursive-model code). Where R is zero
(a Stepwise block's own source layer) the adapter keeps its fresh init: A random, B zero, so it
starts at zero and can still learn. At full rank the converted model reproduces the source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.model.plan import PlanSpec
from loopgolf.sources.hf import ConversionError
from loopgolf.sources.load import Source

INITS = ("stepwise", "average", "lower", "upper", "random")
CONVERTIBLE_KINDS = ("cycle", "sequence")
# LoRA target -> (stored module, weight) inside a block.
TARGET_WEIGHTS = {
    "q": ("attn", "c_q"),
    "k": ("attn", "c_k"),
    "v": ("attn", "c_v"),
    "o": ("attn", "proj"),
    "mlp_in": ("mlps", "fc"),
    "mlp_gate": ("mlps", "gate"),
    "mlp_out": ("mlps", "proj"),
}
# Tensors with one row per attention / MLP control index (per stored block or per virtual layer).
ATTN_CONTROLS = ("attn_scale", "resid_mix", "q_gain", "attn_norm", "attn_norm_bias", "attn_gate")
MLP_CONTROLS = ("mlp_scale", "mlp_norm", "mlp_norm_bias", "lane_resid", "lane_post")
# Model-wide tensors (embeddings, head, per-virtual-layer or per-skip-pair vectors, the smear
# gate, the lane mix): the same in the source and the converted model, so copied.
MODEL_WIDE = (
    "tok_emb.weight",
    "pos_emb.weight",
    "lm_head.weight",
    "final_norm",
    "final_norm_bias",
    "skip_weight",
    "skip_gate",
    "depth_emb",
    "smear_gate",
    "smear_lambda",
    "lane_merge",
)


def stepwise_layers(num_layers: int, num_blocks: int) -> list[int]:
    """Source layer of each stored block under Stepwise (0-based)."""
    if num_blocks == 1:
        return [0]
    return [j * (num_layers - 1) // (num_blocks - 1) for j in range(num_blocks)]


def block_sources(init: str, groups: list[list[int]], num_layers: int) -> list[list[int]]:
    """The source layers whose mean initialises each stored block (one layer unless Average;
    empty for Random)."""
    k = len(groups)
    if init == "stepwise":
        return [[i] for i in stepwise_layers(num_layers, k)]
    if init == "average":
        return [list(g) for g in groups]
    if init == "lower":
        return [[j] for j in range(k)]
    if init == "upper":
        return [[num_layers - k + j] for j in range(k)]
    if init == "random":
        return [[] for _ in range(k)]
    raise ConversionError(f"unknown init {init!r}; valid: {', '.join(INITS)}")


def truncated_svd_factors(residual: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor, float]:
    """(A, B, relative error) with ``scale * A @ B`` the best rank-``rank`` approximation of
    ``residual.T`` (residual is (out, in) like a weight; A is (in, r'), B is (r', out) with
    r' = min(rank, min(in, out))). The error is ``||R - R_r||_F / ||R||_F`` (0 for R = 0), the
    Eckart-Young tail ``sqrt(sum_{i > r} s_i^2) / ||R||_F``."""
    u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
    r = min(rank, s.numel())
    a = vh[:r].T
    b = (s[:r, None] * u[:, :r].T) / scale
    total = float(s.square().sum())
    tail = float(s[r:].square().sum())
    return a.float(), b.float(), math.sqrt(tail / total) if total > 0 else 0.0


@dataclass
class ConversionReport:
    """What a conversion did, per stored block and per virtual layer."""

    init: str
    plan: dict[str, Any]
    block_sources: list[list[int]]
    # per virtual layer: {target: relative Frobenius error ||W_v - W'_j - R_r|| / ||W_v||}
    layer_errors: list[dict[str, float]] = field(default_factory=list)
    unique_params_source: int = 0
    unique_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "init": self.init,
            "plan": self.plan,
            "block_sources": self.block_sources,
            "layer_errors": self.layer_errors,
            "unique_params_source": self.unique_params_source,
            "unique_params": self.unique_params,
        }

    def format(self) -> str:
        """The per-layer table `loopgolf convert` prints."""
        targets = list(self.layer_errors[0]) if self.layer_errors else []
        lines = [f"  init {self.init}: stored block j <- source layers " + ", ".join(f"{j}:{src or 'random'}" for j, src in enumerate(self.block_sources))]
        lines.append("  relative Frobenius error left per virtual layer (||W_v - W'_j - B A|| / ||W_v||):")
        lines.append("  layer  " + "  ".join(f"{t:>8}" for t in targets))
        for v, errs in enumerate(self.layer_errors):
            lines.append(f"  {v:>5}  " + "  ".join(f"{errs[t]:8.4f}" for t in targets))
        lines.append(f"  unique params: {self.unique_params_source:,} (source) -> {self.unique_params:,}")
        return "\n".join(lines)


def target_config(source: ModelConfig, plan: PlanSpec, lora_ranks: dict[str, int], *, per_layer_controls: bool, lora_alpha: float | None = None) -> ModelConfig:
    """The converted model's config: the source's architecture with the new plan and adapters."""
    if plan.kind not in CONVERTIBLE_KINDS or plan.share != "block":
        raise ConversionError(f"conversion makes a cycle or sequence plan with block sharing, not {plan.kind} ({plan.share})")
    layers = source.depth_plan.num_virtual
    if plan.layers * plan.loops != layers:
        raise ConversionError(f"plan {plan.kind}:{plan.layers}x{plan.loops} runs {plan.layers * plan.loops} virtual layers but the source has {layers}")
    bad = sorted(set(lora_ranks) - set(source.projections))
    if bad:
        raise ConversionError(f"LoRA target(s) {bad} do not exist in this model; its projections: {', '.join(source.projections)}")
    d = {**source.to_dict(), "plan": plan.to_dict(), "lora_ranks": dict(lora_ranks), "lora_alpha": lora_alpha, "per_layer_controls": per_layer_controls}
    return ModelConfig.from_dict(d)


def convert(
    source_cfg: ModelConfig,
    source_state: dict[str, Tensor],
    plan: PlanSpec,
    init: str,
    lora_ranks: dict[str, int] | None = None,
    *,
    per_layer_controls: bool | None = None,
    lora_alpha: float | None = None,
    seed: int = 0,
) -> tuple[ModelConfig, dict[str, Tensor], ConversionReport]:
    """(config, state dict, report) of the recursive model made from a vanilla source.
    ``per_layer_controls`` None means: per virtual layer when there are adapters (a relaxed
    model), shared otherwise (strict recursion)."""
    lora_ranks = dict(lora_ranks or {})
    if init not in INITS:
        raise ConversionError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    if source_cfg.plan.kind != "vanilla":
        raise ConversionError(f"the source must have a vanilla plan, not {source_cfg.plan.kind}")
    if source_cfg.parallel_from is not None:
        # parallel_from names a stored MLP: in a shared plan it would pick other layers.
        raise ConversionError(
            f"the source runs a parallel residual{' (two lanes)' if source_cfg.parallel_lanes else ''} from stored layer {source_cfg.parallel_from}; "
            "a shared plan stores other blocks, so conversion cannot keep which layers run it"
        )
    for name, t in source_state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ConversionError(f"source tensor {name!r} has non-finite values (NaN or inf); refusing to convert it")
    if per_layer_controls is None:
        per_layer_controls = bool(lora_ranks)
    cfg = target_config(source_cfg, plan, lora_ranks, per_layer_controls=per_layer_controls, lora_alpha=lora_alpha)
    dp = cfg.depth_plan
    n_layers = dp.num_virtual
    groups = [[v for v in range(n_layers) if dp.attn_of[v] == j] for j in range(dp.num_attn)]
    sources = block_sources(init, groups, n_layers)

    torch.manual_seed(seed)
    model = GPT(cfg)  # the fresh init: Random's blocks and every adapter's starting point
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    src = source_state

    def mean_of(layers: list[int], name: str) -> Tensor:
        return torch.stack([src[name.format(i)] for i in layers]).mean(0)

    # Stored block matrices.
    for j, layers in enumerate(sources):
        if not layers:
            continue
        for module, weight in set(TARGET_WEIGHTS.values()):
            key = f"{module}.{{}}.{weight}.weight"
            if key.format(0) in src:
                state[key.format(j)] = mean_of(layers, key)
    # Control vectors: the source's row for each virtual layer, or picked / averaged per block.
    vector_names = [n for n in (*ATTN_CONTROLS, *MLP_CONTROLS) if n in src] + [f"bias.{t}" for t in cfg.projections if f"bias.{t}" in src]
    for name in vector_names:
        if per_layer_controls:
            state[name] = src[name].clone()
        else:
            for j, layers in enumerate(sources):
                if layers:
                    state[name][j] = src[name][layers].mean(0)
    # Model-wide tensors are copied.
    for name in MODEL_WIDE:
        if name in src:
            state[name] = src[name].clone()

    report = ConversionReport(init=init, plan=dp.to_dict(), block_sources=sources)
    for v in range(n_layers):
        j = dp.attn_of[v]
        errors = {}
        for t in cfg.projections:
            module, weight = TARGET_WEIGHTS[t]
            w_v = src[f"{module}.{v}.{weight}.weight"]
            residual = w_v - state[f"{module}.{j}.{weight}.weight"]
            norm_w = float(w_v.norm()) or 1.0
            if t not in lora_ranks:
                errors[t] = float(residual.norm()) / norm_w
                continue
            if not residual.any():
                errors[t] = 0.0  # zero residual: the adapter keeps its fresh init (B = 0)
                continue
            a, b, rel = truncated_svd_factors(residual, lora_ranks[t], cfg.lora_scale(t))
            r = a.shape[1]
            state[f"lora.{t}.A.{v}"][:, :r] = a
            state[f"lora.{t}.B.{v}"][:r] = b
            state[f"lora.{t}.B.{v}"][r:] = 0.0
            errors[t] = rel * float(residual.norm()) / norm_w
        report.layer_errors.append(errors)
    model.load_state_dict(state, strict=True)
    report.unique_params_source = sum(t.numel() for t in src.values())
    report.unique_params = sum(p.numel() for p in model.parameters())
    return cfg, state, report


__all__ = ["INITS", "ConversionReport", "block_sources", "convert", "stepwise_layers", "target_config", "truncated_svd_factors"]


def as_vanilla(source: Source) -> Source:
    """The source with a vanilla plan and per-virtual-layer controls, the form conversion starts
    from. A vanilla loopgolf model has one control row per layer either way, so this only
    relabels; a source with LoRA adapters or another plan is refused."""
    cfg = source.config
    if cfg.plan.kind != "vanilla" or cfg.plan.share != "block":
        raise ConversionError(f"{source.path}: the source has a {cfg.plan.kind} plan ({cfg.depth_plan.describe()}); conversion starts from a vanilla model")
    if cfg.lora_ranks:
        raise ConversionError(f"{source.path}: the source already has LoRA adapters; convert the model they relax instead")
    if cfg.per_layer_controls:
        return source
    vanilla = ModelConfig.from_dict({**cfg.to_dict(), "per_layer_controls": True})
    return Source(vanilla, source.state, source.origin, source.path)

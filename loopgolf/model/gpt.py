"""The baseline Parameter Golf GPT, built from a depth plan.

Architecture (the Parameter Golf baseline, which the default config builds): weightless RMSNorm;
the normalized embedding is kept as x0; each virtual layer mixes ``x = a*x + b*x0`` then adds
``attn_scale * Attn(norm x)`` and ``mlp_scale * MLP(norm x)``; QK-norm, RoPE, per-head q gain;
relu^2 MLP; zero-initialised output projections; U-Net skips from the first half of the virtual
layers into the second half; tied embeddings; logits soft-capped at ``c * tanh(z / c)``.

Sharing lives entirely in the plan: the model stores ``plan.num_attn`` attention sublayers and
``plan.num_mlp`` MLP sublayers and virtual layer v runs ``attn[attn_of[v]]`` and ``mlps[mlp_of[v]]``.
Control tensors (attn/mlp scales, residual mixes, q gains) are tied to the stored sublayer they
belong to (strict sharing) or kept per virtual layer (``per_layer_controls``).

One code path runs a virtual layer: ``GPT.layer`` takes one virtual layer for the whole batch (the
training forward) or one per batch row (serving, each token at its own depth); ``LayerRows`` picks
the control rows, norm gains, biases and adapters either way (plain views when every row agrees,
gathers only where rows differ), and ``GPT.skip_in`` / ``GPT.skip_out`` hold the U-Net skip rule
for the full forward and the layer-by-layer runner (loopgolf.serve.runner) alike.

Architecture options (plain config fields; the defaults are the baseline above) let a model
converted from another family (Llama, GPT-2, Gemma: loopgolf.convert) be an ordinary loopgolf
model: ``norm`` (weightless RMS, RMS with a gain, Gemma's (1 + w) gain, LayerNorm with bias),
``norm_eps``, ``qk_norm``, ``embed_norm`` and ``embed_scale``, ``pos_emb`` (RoPE or learned
positions), ``unet_skips``, ``logit_softcap`` (None: no cap), ``mlp_act`` (relu^2, tanh-GELU,
SwiGLU, GeGLU) with ``mlp_hidden``, and ``bias`` (biases on every projection). Norm gains and
biases are vectors and follow the control-tensor rule: one row per stored sublayer, or per
virtual layer with ``per_layer_controls``, so a relaxed model can give each virtual layer its own.

This module knows nothing about training, quantization or files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loopgolf.checks import ADDED_LATER, check_range, check_types, from_dict
from loopgolf.model.plan import DepthPlan, PlanSpec, build_plan, parse_plan

LORA_TARGETS = ("q", "k", "v", "o", "mlp_in", "mlp_out", "mlp_gate")  # mlp_gate: gated MLPs only
UNGATED_TARGETS = LORA_TARGETS[:-1]  # the projections every model has
ATTN_TARGETS = ("q", "k", "v", "o")
NORMS = ("rms", "rms_scaled", "rms_offset", "layer")  # weightless RMS | RMS * w | RMS * (1 + w) | LayerNorm(w, b)
MLP_ACTS = ("relu2", "gelu", "swiglu", "geglu", "leaky_relu2")
LEAKY_SLOPE = 0.5  # leaky_relu2: LeakyReLU(0.5)^2, the Parameter Golf record's MLP (openai/parameter-golf #493)
GATED_ACTS = ("swiglu", "geglu")
POS_EMBS = ("rope", "learned")
# Bounds on the shape of a model, far above any model that fits a byte cap: they turn a typo or a
# crafted artifact header (model_dim = 2**22 once asked for 17 GB) into an error before anything
# is allocated.
MAX_MODEL_DIM = 1 << 16
MAX_MLP_MULT = 64
MAX_LORA_RANK = 4096
MAX_SEQ_LEN = 1 << 20
MAX_ROTARY_ENTRIES = 1 << 24  # max_seq_len x head_dim / 2: each rotary table is 64 MiB at most


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 2
    plan: PlanSpec = field(default_factory=PlanSpec)
    tie_embeddings: bool = True
    per_layer_controls: bool = False  # unshared attn/mlp scales, residual mixes and q gains per virtual layer
    depth_embeddings: bool = False  # a learned vector added at the start of each virtual layer
    lora_ranks: dict[str, int] = field(default_factory=dict)  # per-virtual-layer LoRA: projection -> rank
    lora_alpha: float | None = None  # LoRA scale alpha / r (None: alpha = r, scale 1)
    rope_base: float = 10000.0
    max_seq_len: int = 4096  # longest sequence the rotary tables cover (built once, not stored)
    logit_softcap: float | None = 30.0  # None: no soft cap
    qk_gain_init: float = 1.5
    tied_embed_init_std: float = 0.005
    # Architecture options (see the module docstring); the defaults are the Parameter Golf baseline.
    norm: str = "rms"
    norm_eps: float | None = None  # None: float32 machine epsilon for RMS norms, 1e-5 for LayerNorm
    qk_norm: bool = True  # weightless RMS norm of queries and keys (then the q gain sets the temperature)
    embed_norm: bool = True  # normalize the token embedding before the first layer
    embed_scale: float = 1.0  # multiply the embedding by this (Gemma: sqrt(model_dim))
    pos_emb: str = "rope"  # rope | learned (a table of max_seq_len positions added to the embedding)
    unet_skips: bool = True
    mlp_act: str = "relu2"
    mlp_hidden: int | None = None  # MLP width; None: mlp_mult * model_dim
    bias: bool = False  # a bias on every attention and MLP projection
    # The Parameter Golf record's architecture options (docs/models.md "The record's
    # architecture"); each off by default, so the baseline above is unchanged bit for bit.
    ln_scale: bool = field(default=False, metadata=ADDED_LATER)  # virtual layer v's normed inputs are scaled by 1/sqrt(v + 1)
    rope_dims: int | None = field(default=None, metadata=ADDED_LATER)  # rotate only the first rope_dims of each head (None: all of it)
    xsa: bool = field(default=False, metadata=ADDED_LATER)  # exclusive self-attention: drop each head output's component along the token's own value
    attn_gate: bool = field(default=False, metadata=ADDED_LATER)  # sparse head-output gate: y_h *= sigmoid(scale * w_h . x[:gate_window])
    attn_gate_scale: float = field(default=1.0, metadata=ADDED_LATER)
    gate_window: int = field(default=12, metadata=ADDED_LATER)  # leading residual dims the attention gate and the smear gate read
    skip_gates: bool = field(default=False, metadata=ADDED_LATER)  # U-Net skips mix by a learned sigmoid gate (lerp) instead of adding
    smear_gate: bool = field(default=False, metadata=ADDED_LATER)  # e_t += lam * sigmoid(w . e_t[:gate_window]) * e_{t-1}, never across a BOS
    smear_bos_id: int = field(default=1, metadata=ADDED_LATER)  # the token that starts a document (the official shards' BOS)
    # GPT-J parallel residual: the stored MLPs from this index on read the layer's input, as its
    # attention does, instead of the attention's output (None: every MLP reads the attention's output).
    parallel_from: int | None = field(default=None, metadata=ADDED_LATER)
    # The record's 2-lane decoder (openai/parameter-golf #1204, #1530): from parallel_from on the
    # residual is two lanes, attention reading one and the MLP the other, each sublayer writing
    # into both by learned weights; the lanes merge by a learned mix where one stream is needed.
    parallel_lanes: bool = field(default=False, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        if isinstance(self.plan, dict):
            self.plan = PlanSpec.from_dict(self.plan)
        elif isinstance(self.plan, str):  # --model plan=cycle:3x2
            self.plan = parse_plan(self.plan)
        check_types(self, "model")
        for name in (
            "rope_base",
            "logit_softcap",
            "qk_gain_init",
            "tied_embed_init_std",
            "norm_eps",
            "embed_scale",
            "attn_gate_scale",
        ):  # JSON may write 3 for 3.0
            if getattr(self, name) is not None:
                setattr(self, name, float(getattr(self, name)))
        for name, valid in (("norm", NORMS), ("mlp_act", MLP_ACTS), ("pos_emb", POS_EMBS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"model {name} must be one of {', '.join(valid)}, got {getattr(self, name)!r}")
        if self.norm_eps is not None:
            check_range("model", "norm_eps", self.norm_eps, 0.0, 1.0, lo_open=True)
        check_range("model", "embed_scale", self.embed_scale, 0.0, 1e6, lo_open=True)
        if self.mlp_hidden is not None:
            check_range("model", "mlp_hidden", self.mlp_hidden, 1, MAX_MODEL_DIM * MAX_MLP_MULT)
        check_range("model", "qk_gain_init", self.qk_gain_init, -1e4, 1e4)
        for name in ("vocab_size", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "max_seq_len"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"model {name} must be a positive integer, got {value!r}")
        check_range("model", "model_dim", self.model_dim, 1, MAX_MODEL_DIM)
        check_range("model", "mlp_mult", self.mlp_mult, 1, MAX_MLP_MULT)
        check_range("model", "max_seq_len", self.max_seq_len, 1, MAX_SEQ_LEN)
        check_range("model", "rope_base", self.rope_base, 1.0, 1e30, lo_open=True)  # base <= 1: frequencies that do not decay
        if self.logit_softcap is not None:
            check_range("model", "logit_softcap", self.logit_softcap, 0.0, None, lo_open=True)
        check_range("model", "tied_embed_init_std", self.tied_embed_init_std, 0.0)
        if self.num_heads > self.model_dim:
            raise ValueError(f"num_heads {self.num_heads} is more than model_dim {self.model_dim}")
        if self.model_dim % self.num_heads:
            raise ValueError(f"model_dim {self.model_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if (self.model_dim // self.num_heads) % 2:
            raise ValueError(f"head dim {self.model_dim // self.num_heads} must be even for rotary embeddings")
        if self.max_seq_len * self.head_dim // 2 > MAX_ROTARY_ENTRIES:
            raise ValueError(
                f"max_seq_len {self.max_seq_len} x head dim {self.head_dim} needs rotary tables of more than {MAX_ROTARY_ENTRIES:,} entries; lower max_seq_len"
            )
        if self.pos_emb == "learned" and self.max_seq_len * self.model_dim > MAX_ROTARY_ENTRIES:
            raise ValueError(f"a learned position table of max_seq_len {self.max_seq_len} x model_dim {self.model_dim} is too large; lower max_seq_len")
        if self.vocab_size > 65536:
            raise ValueError(f"vocab_size {self.vocab_size} does not fit the uint16 shard format (max 65536)")
        build_plan(self.plan)  # validate early
        self.lora_ranks = {str(k): v for k, v in dict(self.lora_ranks).items()}
        for name, rank in self.lora_ranks.items():
            if name not in LORA_TARGETS:
                raise ValueError(f"unknown LoRA target {name!r}; valid: {', '.join(LORA_TARGETS)}")
            if name == "mlp_gate" and self.mlp_act not in GATED_ACTS:
                raise ValueError(f"LoRA target 'mlp_gate' needs a gated MLP (mlp_act {' or '.join(GATED_ACTS)}), not {self.mlp_act!r}")
            if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_LORA_RANK:
                raise ValueError(f"LoRA rank for {name!r} must be an integer in [1, {MAX_LORA_RANK}], got {rank!r}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha}")
        self._check_record_options()

    def _check_record_options(self) -> None:
        if self.rope_dims is not None:
            if self.pos_emb != "rope":
                raise ValueError(f"rope_dims needs rotary positions (pos_emb 'rope'), not {self.pos_emb!r}")
            if not 2 <= self.rope_dims <= self.head_dim or self.rope_dims % 2:
                raise ValueError(f"rope_dims must be an even number in [2, head dim {self.head_dim}], got {self.rope_dims}")
        check_range("model", "gate_window", self.gate_window, 1, self.model_dim)
        check_range("model", "attn_gate_scale", self.attn_gate_scale, -1e4, 1e4)
        if self.smear_gate:
            check_range("model", "smear_bos_id", self.smear_bos_id, 0, self.vocab_size - 1)
        if self.parallel_lanes and self.parallel_from is None:
            raise ValueError("parallel_lanes needs parallel_from (the first stored MLP whose layers run two lanes)")
        if self.parallel_from is not None:
            n_mlp = build_plan(self.plan).num_mlp
            if not 0 <= self.parallel_from < n_mlp:
                raise ValueError(f"parallel_from must be a stored MLP index in [0, {n_mlp - 1}] (the plan stores {n_mlp}), got {self.parallel_from}")

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def rotary_dims(self) -> int:
        """Dimensions of each head that RoPE rotates."""
        return self.head_dim if self.rope_dims is None else self.rope_dims

    @property
    def depth_plan(self) -> DepthPlan:
        return build_plan(self.plan)

    @property
    def hidden_dim(self) -> int:
        """Width of the MLP."""
        return self.mlp_hidden if self.mlp_hidden is not None else self.mlp_mult * self.model_dim

    @property
    def gated(self) -> bool:
        return self.mlp_act in GATED_ACTS

    @property
    def projections(self) -> tuple[str, ...]:
        """The projections each virtual layer runs (the LoRA and bias targets)."""
        return tuple(t for t in LORA_TARGETS if t != "mlp_gate" or self.gated)

    def lora_shape(self, target: str) -> tuple[int, int]:
        """(in, out) features of a projection (a LoRA target)."""
        d, kv, h = self.model_dim, self.num_kv_heads * self.head_dim, self.hidden_dim
        return {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "mlp_in": (d, h), "mlp_out": (h, d), "mlp_gate": (d, h)}[target]

    def lora_scale(self, target: str) -> float:
        r = self.lora_ranks[target]
        return 1.0 if self.lora_alpha is None else self.lora_alpha / r

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["plan"] = self.plan.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return from_dict(cls, d, "model config")


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """A bias-free linear layer whose weight stays fp32 and is cast to the input dtype (autocast)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False) -> None:
        super().__init__(in_features, out_features, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    """cos/sin tables for positions 0..max_seq_len-1, built once when the model is built.

    They are non-persistent buffers (not in the state dict; they move with ``model.to``) and are
    never written during forward: a table filled lazily inside an ``inference_mode`` evaluation
    would be an inference tensor that the next training step cannot save for backward, and a
    compiled graph would be guarded on the cache's state."""

    def __init__(self, head_dim: int, base: float, max_seq_len: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        self.max_seq_len = max_seq_len
        self.register_buffer("cos", freqs.cos()[None, None], persistent=False)
        self.register_buffer("sin", freqs.sin()[None, None], persistent=False)

    def forward(self, seq_len: int) -> tuple[Tensor, Tensor]:
        """(cos, sin) of shape (1, 1, seq_len, head_dim / 2)."""
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence of {seq_len} tokens is longer than the model's max_seq_len={self.max_seq_len}; build it with a larger max_seq_len")
        return self.cos[:, :, :seq_len], self.sin[:, :, :seq_len]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``2 * cos.size(-1)`` dimensions of each head (all of them unless the
    model has ``rope_dims``); the rest pass through (partial RoPE: they carry no position)."""
    rotated = 2 * cos.size(-1)
    if rotated < x.size(-1):
        return torch.cat((apply_rotary(x[..., :rotated], cos, sin), x[..., rotated:]), dim=-1)
    # The tables take the dtype of x: fp32 tables would upcast bf16 queries and keys.
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class LoRABank(nn.Module):
    """One projection's low-rank adapters, one pair per virtual layer:
    ``delta_v(x) = s * ((x @ A_v) @ B_v)``, never materialising ``W + s * A_v B_v``.
    B starts at zero so a fresh adapter changes nothing; A is scaled so x @ A is O(1)."""

    def __init__(self, num_virtual: int, d_in: int, d_out: int, rank: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.A = nn.ParameterList(nn.Parameter(torch.randn(d_in, rank) / d_in**0.5) for _ in range(num_virtual))
        self.B = nn.ParameterList(nn.Parameter(torch.zeros(rank, d_out)) for _ in range(num_virtual))

    def add_to(self, v: int, x: Tensor, y: Tensor) -> Tensor:
        """``y + delta_v(x)`` with the scale and the sum done inside one GEMM (``addmm``), which
        saves two passes over a full activation per adapter: at small ranks those passes cost as
        much as the thin matmuls themselves (bench/lora_overhead.py, docs/LOG.md)."""
        xa = x @ self.A[v].to(x.dtype)
        out = torch.addmm(y.reshape(-1, y.size(-1)), xa.reshape(-1, xa.size(-1)), self.B[v].to(x.dtype), alpha=self.scale)
        return out.view(y.shape)


class Rows:
    """The rows of a control tensor one layer call uses: one row ``p[i]`` for the whole batch (an
    int ``i``: a plain view, no gather, no index tensor) or a row per batch row (``i`` an index
    tensor: a gather, given a broadcast axis for the sequence)."""

    def __init__(self, index: int | Tensor) -> None:
        self.index = index
        self.single = isinstance(index, int)

    def rows(self, p: Tensor) -> Tensor:
        """``p[i]``: one row, or (B, ...) with a row per batch row."""
        return p[self.index]

    def __call__(self, p: Tensor, dtype: torch.dtype) -> Tensor:
        """``p[i]`` cast to ``dtype``, shaped to broadcast over (B, T, ...) activations."""
        r = p[self.index].to(dtype)
        return r if self.single else r.unsqueeze(1)


FIRST_ROW = Rows(0)  # the final norm's single gain row


class LayerRows:
    """Which virtual layer each batch row of one :meth:`GPT.layer` call runs, and what that picks:
    ``attn_of`` and ``mlp_of`` (the stored sublayers, shared by every row), the control rows
    ``attn`` and ``mlp`` (per stored sublayer, or per virtual layer with ``per_layer_controls``),
    ``depth`` (the depth embedding rows) and ``runs`` ((virtual layer, first row, end row) for
    each block of rows at one layer, which LoRA runs separately).

    An int ``v`` (the training path) is the uniform case: every row at layer v, every pick a plain
    view. With a sequence (one layer per row) a pick that is the same for every row is still one
    view; only picks that differ between rows gather."""

    def __init__(self, model: GPT, v: int | Sequence[int], x: Tensor) -> None:
        plan, per_layer = model.plan, model.config.per_layer_controls
        if isinstance(v, int):
            self.first = v
            self.attn_of, self.mlp_of = plan.attn_of[v], plan.mlp_of[v]
            self.depth = Rows(v)
            self.attn, self.mlp = (self.depth, self.depth) if per_layer else (Rows(self.attn_of), Rows(self.mlp_of))
            self.runs = ((v, 0, x.size(0)),)
            self.ln = _ln_factor(v) if model.config.ln_scale else None
            return
        vs = [int(u) for u in v]
        self.first = vs[0]  # a layer of the call: every row's stored sublayers are its
        if len(vs) != x.size(0):
            raise ValueError(f"{len(vs)} virtual layers given for a batch of {x.size(0)} rows")
        self.attn_of, self.mlp_of = plan.attn_of[vs[0]], plan.mlp_of[vs[0]]
        if any((plan.attn_of[u], plan.mlp_of[u]) != (self.attn_of, self.mlp_of) for u in vs):
            raise ValueError("rows run in one call must share their stored attention and MLP sublayers")
        runs: list[tuple[int, int, int]] = []
        for i, u in enumerate(vs):
            if runs and runs[-1][0] == u:
                runs[-1] = (u, runs[-1][1], i + 1)
            else:
                runs.append((u, i, i + 1))
        if len({u for u, _, _ in runs}) != len(runs):
            raise ValueError("rows of one virtual layer must be contiguous")
        self.runs = tuple(runs)
        self.depth = Rows(vs[0]) if len(runs) == 1 else Rows(torch.tensor(vs, device=x.device))
        # Without per-layer controls every row shares its stored sublayers' control rows.
        self.attn, self.mlp = (self.depth, self.depth) if per_layer else (Rows(self.attn_of), Rows(self.mlp_of))
        self.ln: float | Tensor | None = None
        if model.config.ln_scale:
            self.ln = _ln_factor(vs[0]) if len(runs) == 1 else torch.tensor([_ln_factor(u) for u in vs], device=x.device, dtype=x.dtype).view(-1, 1, 1)

    def scaled(self, h: Tensor) -> Tensor:
        """A normed sublayer input times the layer's ``ln_scale`` factor (when the model has it)."""
        return h if self.ln is None else h * self.ln


def _ln_factor(v: int) -> float:
    """``ln_scale``'s factor for virtual layer v (openai/parameter-golf #315): 1/sqrt(v + 1), so
    deeper layers write smaller updates into a residual stream that has grown. It follows the
    virtual layer, not the stored block: a block shared by layers 2 and 5 reads its inputs at
    1/sqrt(3) at the first and 1/sqrt(6) at the second."""
    return 1.0 / math.sqrt(v + 1)


class Adapters:
    """What the virtual layers of one call add to the projections of the stored sublayers they
    run: their LoRA adapters (each layer's on its own rows), the projection biases (``bias``),
    which are control vectors picked like the other controls, and any attached adapters
    (:meth:`GPT.attach_lora`), added after the model's own."""

    def __init__(self, banks: nn.ModuleDict, biases: nn.ParameterDict, sel: LayerRows, attached: dict[str, LoRABank] | None = None) -> None:
        self.banks, self.biases, self.sel, self.attached = banks, biases, sel, attached or {}

    def __call__(self, target: str, x: Tensor, y: Tensor) -> Tensor:
        """``y`` (the shared projection of ``x``) plus the layers' bias and adapter for ``target``."""
        if target in self.biases:
            rows = self.sel.attn if target in ATTN_TARGETS else self.sel.mlp
            y = y + rows(self.biases[target], y.dtype)
        for banks in (self.banks, self.attached):
            if target in banks:
                bank, runs = banks[target], self.sel.runs
                y = bank.add_to(runs[0][0], x, y) if len(runs) == 1 else torch.cat([bank.add_to(u, x[i:j], y[i:j]) for u, i, j in runs])
        return y


def _no_adapter(target: str, x: Tensor, y: Tensor) -> Tensor:
    return y


class Attention(nn.Module):
    """Causal GQA self-attention with (optional) QK-norm and RoPE. The q gain is applied by the
    caller because it may belong to the virtual layer rather than to this stored sublayer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, kv = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qk_norm, self.xsa = cfg.qk_norm, cfg.xsa
        self.gate_window, self.gate_scale = cfg.gate_window, cfg.attn_gate_scale
        self.c_q = Linear(d, d)
        self.c_k = Linear(d, kv)
        self.c_v = Linear(d, kv)
        self.proj = Linear(d, d, zero_init=True)

    def project(self, x: Tensor, q_gain: Tensor, cos: Tensor | None, sin: Tensor | None, adapt=_no_adapter) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, H, T, hd) and keys and values (B, H_kv, T, hd), normed, rotated and gained:
        what attention reads, and what a KV cache keeps. ``q_gain`` is one row (H,) or one per
        batch row (B, H)."""
        b, t, _ = x.shape
        q = adapt("q", x, self.c_q(x)).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = adapt("k", x, self.c_k(x)).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = adapt("v", x, self.c_v(x)).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        if cos is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        g = q_gain.to(q.dtype)
        q = q * (g[None, :, None, None] if g.dim() == 1 else g[:, :, None, None])
        return q, k, v

    def forward(self, x: Tensor, q_gain: Tensor, cos: Tensor | None, sin: Tensor | None, adapt=_no_adapter, attend=None, gate: Tensor | None = None) -> Tensor:
        """``attend(q, k, v) -> (B, H, T, hd)`` replaces causal attention over this call's own
        tokens (a KV cache's attention over past and present keys, for one). ``gate``: the
        head-output gate's weights, (H, gate_window) or one per batch row (B, H, gate_window)."""
        b, t, _ = x.shape
        q, k, v = self.project(x, q_gain, cos, sin, adapt)
        y = causal_attention(q, k, v) if attend is None else attend(q, k, v)
        if self.xsa:
            y = exclude_own_value(y, v)
        if gate is not None:
            w = gate.to(x.dtype)
            window = x[..., : self.gate_window]
            logits = torch.einsum("btw,hw->bht", window, w) if w.dim() == 2 else torch.einsum("btw,bhw->bht", window, w)
            y = y * torch.sigmoid(self.gate_scale * logits).unsqueeze(-1)
        y = y.transpose(1, 2).reshape(b, t, -1)
        return adapt("o", y, self.proj(y))


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """Scaled dot-product attention with grouped key/value heads repeated to the query heads."""
    if k.size(1) != q.size(1):
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return attention(q, k, v, is_causal=True)


def exclude_own_value(y: Tensor, v: Tensor) -> Tensor:
    """Exclusive self-attention (XSA, openai/parameter-golf #478): each head's output ``y``
    (B, H, T, hd) minus its projection on the unit vector of the token's own value ``v``
    (B, H_kv, T, hd; a query head reads its group's value head), so attention carries only what
    the other tokens add and the residual stream keeps the token's own content."""
    b, h, t, hd = y.shape
    groups = v.size(1)
    yg = y.view(b, groups, h // groups, t, hd)
    unit = F.normalize(v, dim=-1).unsqueeze(2)
    return (yg - (yg * unit).sum(-1, keepdim=True) * unit).view(b, h, t, hd)


class MLP(nn.Module):
    """``proj(act(fc x))``, or gated ``proj(act(gate x) * fc x)`` (SwiGLU, GeGLU)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.hidden_dim
        self.act = cfg.mlp_act
        self.fc = Linear(cfg.model_dim, hidden)
        self.gate = Linear(cfg.model_dim, hidden) if cfg.gated else None
        self.proj = Linear(hidden, cfg.model_dim, zero_init=True)

    def forward(self, x: Tensor, adapt=_no_adapter) -> Tensor:
        u = adapt("mlp_in", x, self.fc(x))
        if self.act == "relu2":
            h = F.relu(u).square()
        elif self.act == "leaky_relu2":
            h = F.leaky_relu(u, LEAKY_SLOPE).square()
        elif self.act == "gelu":
            h = F.gelu(u, approximate="tanh")
        else:
            g = adapt("mlp_gate", x, self.gate(x))
            h = (F.silu(g) if self.act == "swiglu" else F.gelu(g, approximate="tanh")) * u
        return adapt("mlp_out", h, self.proj(h))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.plan = plan = cfg.depth_plan
        d, v_layers = cfg.model_dim, plan.num_virtual
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, d) if cfg.pos_emb == "learned" else None
        self.attn = nn.ModuleList(Attention(cfg) for _ in range(plan.num_attn))
        self.mlps = nn.ModuleList(MLP(cfg) for _ in range(plan.num_mlp))
        # Control tensors: one row per stored sublayer (strict sharing) or per virtual layer.
        n_attn_ctrl = v_layers if cfg.per_layer_controls else plan.num_attn
        n_mlp_ctrl = v_layers if cfg.per_layer_controls else plan.num_mlp
        self.attn_scale = nn.Parameter(torch.ones(n_attn_ctrl, d))
        self.mlp_scale = nn.Parameter(torch.ones(n_mlp_ctrl, d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(n_attn_ctrl, d), torch.zeros(n_attn_ctrl, d)], dim=1))
        self.q_gain = nn.Parameter(torch.full((n_attn_ctrl, cfg.num_heads), cfg.qk_gain_init))
        # Norm gains (and LayerNorm biases): before attention, before the MLP, and the final norm.
        # (1 + w) gains start at w = 0, the others at 1: every variant starts as the weightless norm.
        gain = 0.0 if cfg.norm == "rms_offset" else 1.0
        norm_rows = {"attn_norm": n_attn_ctrl, "mlp_norm": n_mlp_ctrl, "final_norm": 1}
        for name, rows in norm_rows.items():
            setattr(self, name, nn.Parameter(torch.full((rows, d), gain)) if cfg.norm != "rms" else None)
            setattr(self, f"{name}_bias", nn.Parameter(torch.zeros(rows, d)) if cfg.norm == "layer" else None)
        self.bias = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(n_attn_ctrl if t in ATTN_TARGETS else n_mlp_ctrl, cfg.lora_shape(t)[1])) for t in cfg.projections} if cfg.bias else {}
        )
        # U-Net skips pair the first half of the virtual layers with the second half (plan.skip_pairs).
        self.skip_weight = nn.Parameter(torch.ones(v_layers // 2, d)) if cfg.unet_skips else None
        # Gates start at zero: sigmoid(0) = 1/2, as in the record (a skip gate starts as the mean
        # of the skip and the residual; the head-output gate halves attention at first).
        self.skip_gate = nn.Parameter(torch.zeros(v_layers // 2, d)) if cfg.unet_skips and cfg.skip_gates else None
        self.attn_gate = nn.Parameter(torch.zeros(n_attn_ctrl, cfg.num_heads, cfg.gate_window)) if cfg.attn_gate else None
        # The smear starts off (lam = 0): the model begins as the baseline.
        self.smear_gate = nn.Parameter(torch.zeros(cfg.gate_window)) if cfg.smear_gate else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if cfg.smear_gate else None
        self.depth_emb = nn.Parameter(torch.zeros(v_layers, d)) if cfg.depth_embeddings else None
        # Two lanes: per MLP control row, how much each lane keeps of itself (lane_resid, the
        # record's 1.1) and how much attention and the MLP write into each lane (lane_post[src,
        # lane], 1); one learned mix of the lanes (lane_merge, 1/2: their mean, as the record's).
        self.lane_resid = nn.Parameter(torch.full((n_mlp_ctrl, 2), 1.1)) if cfg.parallel_lanes else None
        self.lane_post = nn.Parameter(torch.ones(n_mlp_ctrl, 2, 2)) if cfg.parallel_lanes else None
        self.lane_merge = nn.Parameter(torch.full((1,), 0.5)) if cfg.parallel_lanes else None
        self.lora = nn.ModuleDict(
            {t: LoRABank(v_layers, *cfg.lora_shape(t), cfg.lora_ranks[t], cfg.lora_scale(t)) for t in LORA_TARGETS if t in cfg.lora_ranks}
        )
        self.lm_head = None if cfg.tie_embeddings else Linear(d, cfg.vocab_size, zero_init=True)
        self.rotary = Rotary(cfg.rotary_dims, cfg.rope_base, cfg.max_seq_len) if cfg.pos_emb == "rope" else None
        # U-Net skips, fixed once from the full plan: decoder layer v adds encoder layer e's
        # output through skip_weight[row]. A progressive-recurrence stage that leaves e or v out
        # drops that pair; it never hands a row to another pair.
        pairs = plan.skip_pairs if cfg.unet_skips else ()
        self.skip_from = {dec: (row, enc) for row, (enc, dec) in enumerate(pairs)}
        self.skip_sources = frozenset(enc for enc, _ in pairs)
        if cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=cfg.tied_embed_init_std)
        self.stage: int | None = None  # progressive recurrence: None runs every virtual layer
        self.loops: int | None = None  # None: the trained loop count (see set_loops)
        self._schedule: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    @property
    def active_layers(self) -> tuple[int, ...]:
        """The virtual layers the forward pass runs, in order, at the current stage or loop
        count: each entry names the trained virtual layer whose parameters that step runs (a
        loop beyond training repeats the last trained pass's layers)."""
        if self._schedule is not None:
            return self._schedule[0]
        return self.plan.active_layers(self.stage)

    @property
    def active_passes(self) -> tuple[int, ...]:
        """The pass (0 for the first) each step of :attr:`active_layers` belongs to."""
        if self._schedule is not None:
            return self._schedule[1]
        return tuple(self.plan.loop_of[v] for v in self.active_layers)

    def set_stage(self, stage: int | None) -> None:
        """Run only passes 0..stage of the plan (progressive recurrence); None runs all."""
        if stage is not None and not 0 <= stage < self.plan.num_loops:
            raise ValueError(f"stage {stage} is outside this plan's {self.plan.num_loops} passes")
        if self.loops is not None and stage is not None:
            raise ValueError("a model run at a changed loop count has no recurrence stages; set_loops(None) first")
        self.stage = None if stage is None or stage == self.plan.num_loops - 1 else stage

    def attach_lora(self, banks: dict[str, LoRABank] | None) -> None:
        """Add ``banks`` (projection -> a :class:`LoRABank` with one adapter per virtual layer)
        to the projections, after the model's own adapters; None detaches them. They are held
        outside the module tree: not parameters of the model, not in its state dict or artifact
        (test-time training adapts them and throws them away)."""
        for target, bank in (banks or {}).items():
            if target not in self.config.projections:
                raise ValueError(f"cannot attach an adapter to {target!r}; this model's projections are {', '.join(self.config.projections)}")
            if len(bank.A) != self.plan.num_virtual:
                raise ValueError(f"the {target!r} adapters have {len(bank.A)} virtual layers; the model has {self.plan.num_virtual}")
        self.__dict__["attached_lora"] = dict(banks) if banks else None

    def set_loops(self, loops: int | None) -> None:
        """Run the plan's looped block(s) ``loops`` times instead of the trained count
        (``DepthPlan.schedule`` says which parameters each pass runs); None, or the trained
        count, runs the plan as trained. Refused for plans without loops (vanilla, explicit)."""
        if self.stage is not None and loops is not None:
            raise ValueError("a model in a progressive-recurrence stage cannot change its loop count; set_stage(None) first")
        if loops is None:
            self.loops, self._schedule = None, None
            return
        schedule = self.plan.schedule(loops)
        if loops == self.plan.num_loops:
            self.loops, self._schedule = None, None
        else:
            self.loops, self._schedule = loops, schedule

    def norm(self, x: Tensor, which: str, rows: Rows = FIRST_ROW) -> Tensor:
        """The ``which`` norm (attn_norm, mlp_norm, final_norm) with its gain (and bias) ``rows``:
        one row goes into the fused kernel (``F.rms_norm`` / ``F.layer_norm`` with a weight), a
        row per batch row multiplies the weightless norm."""
        cfg, shape = self.config, (x.size(-1),)
        if cfg.norm == "rms":
            return F.rms_norm(x, shape, eps=cfg.norm_eps)
        w = rows(getattr(self, which), x.dtype)
        if cfg.norm == "layer":
            b, eps = rows(getattr(self, f"{which}_bias"), x.dtype), 1e-5 if cfg.norm_eps is None else cfg.norm_eps
            return F.layer_norm(x, shape, w, b, eps=eps) if rows.single else F.layer_norm(x, shape, eps=eps) * w + b
        if cfg.norm == "rms_offset":
            w = 1.0 + w
        return F.rms_norm(x, shape, w, eps=cfg.norm_eps) if rows.single else F.rms_norm(x, shape, eps=cfg.norm_eps) * w

    def two_lanes(self, v: int) -> bool:
        """Whether virtual layer ``v`` runs two lanes (``parallel_lanes``: its stored MLP is at
        ``parallel_from`` or later, in every pass that runs it)."""
        cfg = self.config
        return cfg.parallel_lanes and self.plan.mlp_of[v] >= cfg.parallel_from

    def lane_state(self, v: int, x: Tensor) -> Tensor:
        """The residual ``x`` as virtual layer ``v`` takes it: both lanes side by side, (..., 2D),
        at a two-lane layer (one stream entering the first such layer becomes both lanes, as in
        the record), one stream elsewhere (lanes leaving for a one-stream layer merge first:
        :meth:`merge_lanes`)."""
        d, two = self.config.model_dim, self.two_lanes(v)
        if two and x.size(-1) == d:
            return torch.cat((x, x), dim=-1)
        return x if two else self.merge_lanes(x)

    def merge_lanes(self, x: Tensor) -> Tensor:
        """One stream from a residual that may hold two lanes: ``m * attention lane + (1 - m) *
        MLP lane``, ``m`` the learned ``lane_merge``; a one-stream residual as it is."""
        d = self.config.model_dim
        if x.size(-1) == d:
            return x
        m = self.lane_merge.to(x.dtype)
        return torch.lerp(x[..., d:], x[..., :d], m)

    def _enter(self, v: int | Sequence[int], x: Tensor, x0: Tensor) -> tuple[LayerRows, Tensor, Tensor, Callable[[str, Tensor, Tensor], Tensor]]:
        """What virtual layer(s) ``v`` do before attention: (their :class:`LayerRows`, the residual
        in the layer's form (:meth:`lane_state`) with the depth embedding added, attention's input
        before its norm (the residual, or its attention lane, mixed with x0), their adapters)."""
        sel = LayerRows(self, v, x)
        two = self.two_lanes(sel.first)
        x = self.lane_state(sel.first, x)
        if self.depth_emb is not None:
            e = sel.depth(self.depth_emb, x.dtype)
            x = x + (torch.cat((e, e), dim=-1) if two else e)  # both lanes get the layer's vector
        mix = sel.attn(self.resid_mix, x.dtype)  # (2, D), or (B, 1, 2, D) with a row per batch row
        read = mix[..., 0, :] * (x[..., : self.config.model_dim] if two else x) + mix[..., 1, :] * x0
        attached = self.__dict__.get("attached_lora")
        adapt = Adapters(self.lora, self.bias, sel, attached) if len(self.lora) or len(self.bias) or attached else _no_adapter
        return sel, x, read, adapt

    def layer(self, v: int | Sequence[int], x: Tensor, x0: Tensor, cos: Tensor | None, sin: Tensor | None, attend=None) -> Tensor:
        """Run virtual layer ``v`` over the batch, or with a sequence ``v`` (one virtual layer per
        batch row, all over the same stored sublayers, rows of one layer contiguous) each row at
        its own depth: the shared projections run once over every row and each row gets its own
        controls, norm gains, biases and adapters (:class:`LayerRows`). An int ``v`` is the case
        where every row is at the same layer. ``attend`` replaces causal attention (see
        :meth:`Attention.forward`). ``x`` may hold one stream or two lanes; the output is in the
        layer's own form (:meth:`lane_state`)."""
        sel, x, read, adapt = self._enter(v, x, x0)
        gate = None if self.attn_gate is None else sel.attn.rows(self.attn_gate)
        attn = self.attn[sel.attn_of](sel.scaled(self.norm(read, "attn_norm", sel.attn)), sel.attn.rows(self.q_gain), cos, sin, adapt, attend, gate)
        attn = sel.attn(self.attn_scale, x.dtype) * attn
        mlp = self.mlps[sel.mlp_of]
        if self.two_lanes(sel.first):
            return self._lane_update(sel, x, attn, mlp, adapt)
        h = read + attn
        parallel = self.config.parallel_from is not None and sel.mlp_of >= self.config.parallel_from  # the MLP reads what attention read
        return h + sel.mlp(self.mlp_scale, x.dtype) * mlp(sel.scaled(self.norm(read if parallel else h, "mlp_norm", sel.mlp)), adapt)

    def _lane_update(self, sel: LayerRows, x: Tensor, attn: Tensor, mlp: MLP, adapt: Callable[[str, Tensor, Tensor], Tensor]) -> Tensor:
        """A two-lane layer after attention (openai/parameter-golf #1530, the record's
        ``_parallel_block``): the MLP reads the MLP lane; then each lane keeps ``lane_resid`` of
        itself and takes ``lane_post[src, lane]`` of each sublayer's (scaled) output."""
        d = self.config.model_dim
        a, m = x[..., :d], x[..., d:]
        out = sel.mlp(self.mlp_scale, x.dtype) * mlp(sel.scaled(self.norm(m, "mlp_norm", sel.mlp)), adapt)
        keep, post = sel.mlp(self.lane_resid, x.dtype), sel.mlp(self.lane_post, x.dtype)  # (2,) / (2, 2), or per row (B, 1, ...)
        a = keep[..., 0:1] * a + post[..., 0, 0:1] * attn + post[..., 1, 0:1] * out
        m = keep[..., 1:2] * m + post[..., 0, 1:2] * attn + post[..., 1, 1:2] * out
        return torch.cat((a, m), dim=-1)

    def layer_kv(self, v: int | Sequence[int], x: Tensor, x0: Tensor, cos: Tensor | None, sin: Tensor | None) -> tuple[Tensor, Tensor]:
        """The keys and values virtual layer(s) ``v`` (as in :meth:`layer`) would cache for
        residual ``x``, without running attention or the MLP: what a token that exited early
        leaves for deeper layers."""
        sel, _, read, adapt = self._enter(v, x, x0)
        _, k, val = self.attn[sel.attn_of].project(sel.scaled(self.norm(read, "attn_norm", sel.attn)), sel.attn.rows(self.q_gain), cos, sin, adapt)
        return k, val

    def skip_in(self, v: int, x: Tensor, saved: dict[int, Tensor]) -> Tensor:
        """``x`` entering virtual layer ``v``: if v is a U-Net decoder layer whose encoder layer's
        output waits in ``saved``, that output (popped) is added through ``skip_weight``. At a
        changed loop count a layer run twice adds its skip once, the first time, from its encoder
        layer's latest output (``skip_out`` overwrites)."""
        row, enc = self.skip_from.get(v, (None, None))
        if enc not in saved:
            return x
        d = self.config.model_dim
        stream, rest = (x, None) if x.size(-1) == d else (x[..., :d], x[..., d:])  # two lanes: the skip joins the attention lane (the record's)
        skip = self.skip_weight[row].to(x.dtype) * saved.pop(enc)
        if self.skip_gate is None:
            stream = stream + skip
        else:
            # Gated skip (openai/parameter-golf #289): g * x + (1 - g) * skip, g = sigmoid(gate).
            stream = torch.lerp(skip, stream, torch.sigmoid(self.skip_gate[row].to(x.dtype)))
        return stream if rest is None else torch.cat((stream, rest), dim=-1)

    def skip_out(self, v: int, x: Tensor, saved: dict[int, Tensor]) -> None:
        """Keep ``x``, virtual layer ``v``'s output (its lanes merged), in ``saved`` if v is a U-Net
        skip source."""
        if v in self.skip_sources:
            saved[v] = self.merge_lanes(x)

    def embed(self, idx: Tensor, positions: Tensor | None = None, previous: Tensor | None = None) -> Tensor:
        """The input of the first virtual layer (also kept as x0 for the residual mixes).
        ``positions`` (shaped like ``idx``) places tokens that are not at 0..T-1 (a KV cache's);
        ``previous`` (shaped like ``idx``, -1 for none) gives the token before each one when it
        is not the previous column of ``idx`` (the smear gate reads it)."""
        x = self.token_embedding(idx)
        if self.smear_gate is not None:
            x = self.smear(idx, x, previous)
        if self.pos_emb is not None:
            if idx.size(1) > self.config.max_seq_len:
                raise ValueError(f"sequence of {idx.size(1)} tokens is longer than the model's max_seq_len={self.config.max_seq_len} learned positions")
            x = x + (self.pos_emb.weight[: idx.size(1)] if positions is None else self.pos_emb(positions))
        return rms_norm(x) if self.config.embed_norm else x

    def token_embedding(self, idx: Tensor) -> Tensor:
        x = self.tok_emb(idx)
        return x * self.config.embed_scale if self.config.embed_scale != 1.0 else x

    def smear(self, idx: Tensor, x: Tensor, previous: Tensor | None = None) -> Tensor:
        """SmearGate (openai/parameter-golf #1667, BOS fix #1855): each token embedding e_t gets
        ``lam * sigmoid(w . e_t[:gate_window]) * e_{t-1}``, a cheap bigram signal, except where
        t is a BOS (a document's first token must not see the previous document) or has no
        previous token (the first column, without ``previous``; or ``previous`` -1)."""
        if previous is None:
            prev = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1]), dim=1)
            has_prev = torch.ones_like(idx, dtype=torch.bool)
            has_prev[:, 0] = False
        else:
            has_prev = previous >= 0
            prev = self.token_embedding(previous.clamp(min=0))
        keep = (has_prev & (idx != self.config.smear_bos_id)).to(x.dtype).unsqueeze(-1)
        g = self.smear_lambda.to(x.dtype) * torch.sigmoid(x[..., : self.config.gate_window] @ self.smear_gate.to(x.dtype))
        return x + g.unsqueeze(-1) * prev * keep

    def hidden_states(self, idx: Tensor, exits: tuple[int, ...] = ()) -> list[Tensor]:
        """Final-normed hidden states (B, T, D) after each step of :attr:`active_layers` whose
        position is in ``exits`` (in order of depth) and after the last one (always last)."""
        cos, sin = self.rotary(idx.size(1)) if self.rotary is not None else (None, None)
        x = self.embed(idx)
        x0, outputs, states = x, {}, []
        for j, v in enumerate(self.active_layers):
            x = self.layer(v, self.skip_in(v, self.lane_state(v, x), outputs), x0, cos, sin)
            self.skip_out(v, x, outputs)
            if j in exits:
                states.append(self.norm(self.merge_lanes(x), "final_norm"))
        states.append(self.norm(self.merge_lanes(x), "final_norm"))
        return states

    def hidden(self, idx: Tensor) -> Tensor:
        """Final normalized hidden states (B, T, D)."""
        return self.hidden_states(idx)[-1]

    def head(self, h: Tensor) -> Tensor:
        """Logits (float32, soft-capped) of final-normed hidden states."""
        z = F.linear(h, self.tok_emb.weight.to(h.dtype)) if self.lm_head is None else self.lm_head(h)
        c = self.config.logit_softcap
        return z.float() if c is None else c * torch.tanh(z.float() / c)

    def logits(self, idx: Tensor) -> Tensor:
        return self.head(self.hidden(idx))

    def loop_exits(self) -> tuple[int, ...]:
        """Positions in :attr:`active_layers` of the last layer of every pass but the last:
        where early exit can read a prediction (for CYCLE K x B, K-1, 2K-1, ...)."""
        passes = self.active_passes
        return tuple(j for j in range(len(passes) - 1) if passes[j + 1] != passes[j])

    def loop_logits(self, idx: Tensor) -> list[Tensor]:
        """Logits after each pass of the plan, the full-depth logits last."""
        return [self.head(h) for h in self.hidden_states(idx, self.loop_exits())]

    def forward(self, idx: Tensor, targets: Tensor | None = None, reduction: str = "mean") -> Tensor:
        """Logits when ``targets`` is None, else the cross-entropy in nats (``reduction`` as in
        ``F.cross_entropy``)."""
        logits = self.logits(idx)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)


# ---------------------------------------------------------------- accounting


def unique_params(model: nn.Module) -> int:
    """Stored parameters: each tensor once, however many virtual layers use it."""
    return sum(p.numel() for p in model.parameters())


def _sublayer_params(cfg: ModelConfig) -> tuple[int, int]:
    """Matrix parameters of one stored attention and one stored MLP sublayer."""
    d, kv = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim
    return 2 * d * d + 2 * d * kv, (3 if cfg.gated else 2) * d * cfg.hidden_dim


def _control_params(cfg: ModelConfig, n_attn: int, n_mlp: int) -> int:
    """Control vectors for ``n_attn`` attention rows and ``n_mlp`` MLP rows: scales, residual
    mixes, q gains, norm gains and biases, projection biases."""
    d = cfg.model_dim
    per_attn, per_mlp = 3 * d + cfg.num_heads, d
    per_attn += cfg.num_heads * cfg.gate_window if cfg.attn_gate else 0
    per_mlp += 6 if cfg.parallel_lanes else 0  # lane_resid (2) and lane_post (2 x 2)
    norm_vectors = {"rms": 0, "rms_scaled": 1, "rms_offset": 1, "layer": 2}[cfg.norm]
    per_attn += norm_vectors * d
    per_mlp += norm_vectors * d
    if cfg.bias:
        per_attn += sum(cfg.lora_shape(t)[1] for t in ATTN_TARGETS)
        per_mlp += sum(cfg.lora_shape(t)[1] for t in cfg.projections if t not in ATTN_TARGETS)
    return n_attn * per_attn + n_mlp * per_mlp + norm_vectors * d  # + the final norm


def _model_wide_params(cfg: ModelConfig) -> int:
    """Embeddings, positions, head, skips (and their gates), depth embeddings, the smear gate,
    the lane mix."""
    d, v_layers = cfg.model_dim, cfg.depth_plan.num_virtual
    total = cfg.vocab_size * d
    total += cfg.max_seq_len * d if cfg.pos_emb == "learned" else 0
    total += 0 if cfg.tie_embeddings else cfg.vocab_size * d
    total += (v_layers // 2) * d * (2 if cfg.skip_gates else 1) if cfg.unet_skips else 0
    total += cfg.gate_window + 1 if cfg.smear_gate else 0
    total += v_layers * d if cfg.depth_embeddings else 0
    total += 1 if cfg.parallel_lanes else 0
    return total


def effective_params(model: GPT) -> int:
    """Executed parameters: what an unrolled copy with one private set of weights per virtual
    layer would hold (the count a vanilla model of the same virtual depth would have), plus the
    relaxation parameters, each of which runs once."""
    cfg = model.config
    v_layers = model.plan.num_virtual
    per_attn, per_mlp = _sublayer_params(cfg)
    return _model_wide_params(cfg) + v_layers * (per_attn + per_mlp) + _control_params(cfg, v_layers, v_layers) + lora_params(cfg)


def lora_params(cfg: ModelConfig) -> int:
    v_layers = cfg.depth_plan.num_virtual
    return sum(v_layers * r * sum(cfg.lora_shape(t)) for t, r in cfg.lora_ranks.items())


def unique_params_formula(cfg: ModelConfig) -> int:
    """Closed form of :func:`unique_params`, used by tests and the byte planner."""
    plan = cfg.depth_plan
    per_attn, per_mlp = _sublayer_params(cfg)
    n_a = plan.num_virtual if cfg.per_layer_controls else plan.num_attn
    n_m = plan.num_virtual if cfg.per_layer_controls else plan.num_mlp
    matrices = plan.num_attn * per_attn + plan.num_mlp * per_mlp
    return _model_wide_params(cfg) + matrices + _control_params(cfg, n_a, n_m) + lora_params(cfg)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, num_layers: int | None = None) -> int:
    """Forward FLOPs per token from the plan: 2 per multiply-add of every executed matrix
    (adapters included, as two thin matmuls), plus causal attention scores and values (average
    context (seq_len + 1) / 2). ``num_layers`` counts only that many virtual layers (a
    progressive-recurrence stage)."""
    v_layers = cfg.depth_plan.num_virtual if num_layers is None else num_layers
    d = cfg.model_dim
    per_layer = sum(_sublayer_params(cfg))
    per_layer += sum(r * sum(cfg.lora_shape(t)) for t, r in cfg.lora_ranks.items())
    matmul = v_layers * per_layer + d * cfg.vocab_size
    attention = v_layers * 2 * d * (seq_len + 1) / 2
    return int(2 * matmul + 2 * attention)

"""Muon for the block matrices, Adam for embeddings and control tensors (the baseline recipe).

Muon: SGD with Nesterov momentum whose update is orthogonalised by a 5-step Newton-Schulz
iteration and scaled by sqrt(max(1, rows/cols)). The iteration's coefficients are a schedule
(``OptimizerConfig.muon_ns``, :data:`NS_SCHEDULES`): ``standard`` repeats (3.4445, -4.7750,
2.0315) at every step; ``polar_express`` takes a different minimax-optimal tuple at each step
(Amsel et al. 2025, "The Polar Express", arXiv:2505.16932; openai/parameter-golf PR #1344, in
the record since PR #1787). The iteration runs in bfloat16 on CUDA and in float32 on CPU (bf16
matmul is ~100x slower there).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from loopgolf.config import OptimizerConfig
from loopgolf.model.roles import parameter_roles

NSCoeffs = tuple[float, float, float]  # (a, b, c) of one step: x <- a x + (b A + c A^2) x, A = x x^T

NS_COEFFS: NSCoeffs = (3.4445, -4.7750, 2.0315)
# Polar Express: per-step (a, b, c) chosen minimax-optimal for the singular values the previous
# steps leave (Amsel et al. 2025, arXiv:2505.16932), the tuples openai/parameter-golf PR #1344
# introduced and the record (PR #1787 onwards) trains with at 5 steps.
POLAR_EXPRESS_COEFFS: tuple[NSCoeffs, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# OptimizerConfig.muon_ns -> coefficient schedule. Step i uses entry i; steps beyond the list
# repeat its last entry (the record instead stops after its 5 tuples: the same at 5 steps).
NS_SCHEDULES: dict[str, tuple[NSCoeffs, ...]] = {"standard": (NS_COEFFS,), "polar_express": POLAR_EXPRESS_COEFFS}


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7, schedule: tuple[NSCoeffs, ...] = (NS_COEFFS,)) -> Tensor:
    """Approximately orthogonalise a 2-D matrix (the zeroth power of its singular values) with
    ``steps`` odd-polynomial steps, step i taking ``schedule[min(i, len(schedule) - 1)]``."""
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    x = x / (x.norm() + eps)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    for i in range(steps):
        a, b, c = schedule[min(i, len(schedule) - 1)]
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Muon. Under torch.distributed each rank orthogonalises every world_size-th matrix and the
    updates are summed across ranks, so the work is split rather than repeated. Gradients must
    already be averaged across ranks (``loopgolf.train.distributed.all_reduce_gradients``)."""

    def __init__(
        self,
        params,
        lr: float = 0.04,
        momentum: float = 0.95,
        backend_steps: int = 5,
        nesterov: bool = True,
        ns_schedule: tuple[NSCoeffs, ...] = (NS_COEFFS,),
        weight_decay: float = 0.0,
        row_normalize: bool = False,
    ):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov))
        # An attribute, not a param-group default: group defaults go into the optimizer's
        # state_dict, and checkpoints written before the schedule existed must still load. The
        # schedule comes from the run's config, which a resume cannot change.
        self.ns_schedule = ns_schedule
        self.weight_decay = weight_decay  # decoupled: w <- w * (1 - lr * wd) before the update
        self.row_normalize = row_normalize  # each row of the update to unit norm before Newton-Schulz

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        for group in self.param_groups:
            params: list[Tensor] = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=params[0].dtype)
            offset = 0
            for i, p in enumerate(params):
                # Every rank keeps every momentum buffer (cheap next to the orthogonalisation), so
                # the optimizer state is identical on all ranks: rank 0's checkpoint is complete
                # and a run can resume on any world size.
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                if i % world == rank:
                    g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                    if self.row_normalize:
                        g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-7)
                    g = newton_schulz(g, steps=group["backend_steps"], schedule=self.ns_schedule)
                    g = g * max(1.0, g.size(0) / g.size(1)) ** 0.5
                    flat[offset : offset + p.numel()] = g.reshape(-1).to(flat.dtype)
                offset += p.numel()
            if world > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                if self.weight_decay > 0:
                    p.mul_(1.0 - group["lr"] * self.weight_decay)
                p.add_(flat[offset : offset + p.numel()].view_as(p), alpha=-group["lr"])
                offset += p.numel()


# Optimizer group of each parameter role (loopgolf.model.roles).
GROUP_OF_ROLE = {
    "attn": "matrix",
    "mlp": "matrix",
    "embed": "embed",
    "head": "head",
    "pos": "scalar",
    "lora": "adapter",
    "control": "scalar",
    "depth": "scalar",
}


def split_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Assign every trainable parameter to one optimizer group by its role.

    matrix: the stored attention/MLP matrices (Muon); embed: token embedding; head: an untied
    output head; adapter: per-virtual-layer LoRA factors; scalar: control tensors, skip weights
    and depth embeddings."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in ("matrix", "embed", "head", "adapter", "scalar")}
    params = dict(model.named_parameters())
    for name, role in parameter_roles(model).items():
        if params[name].requires_grad:
            groups[GROUP_OF_ROLE[role]].append((name, params[name]))
    return groups


def build_optimizers(model: nn.Module, cfg: OptimizerConfig, tied: bool) -> list[torch.optim.Optimizer]:
    """Muon for block matrices, Adam for the rest. Each param group remembers its base lr in
    ``initial_lr`` so a schedule can scale it."""
    roles = split_parameters(model)
    fused = next(model.parameters()).is_cuda
    # With a weight decay the Adam groups run AdamW (decoupled decay, per group); without, plain
    # Adam as before (the same update, and the same optimizer state in checkpoints).
    decay = cfg.embed_weight_decay > 0 or cfg.adam_weight_decay > 0
    adam_groups: list[dict] = []
    if roles["embed"]:
        adam_groups.append(
            {
                "params": [p for _, p in roles["embed"]],
                "lr": cfg.embed_lr if tied else cfg.untied_embed_lr,
                **({"weight_decay": cfg.embed_weight_decay} if decay else {}),
            }
        )
    if roles["head"]:
        adam_groups.append({"params": [p for _, p in roles["head"]], "lr": cfg.head_lr, **({"weight_decay": cfg.adam_weight_decay} if decay else {})})
    if roles["scalar"]:
        adam_groups.append({"params": [p for _, p in roles["scalar"]], "lr": cfg.scalar_lr, **({"weight_decay": cfg.adam_weight_decay} if decay else {})})
    muon_groups = []
    if roles["matrix"]:
        muon_groups.append({"params": [p for _, p in roles["matrix"]], "lr": cfg.matrix_lr})
    if roles["adapter"]:
        # adapter_lr applies under either optimizer: under Muon the adapters are their own group.
        adapters = {
            "params": [p for _, p in roles["adapter"]],
            "lr": cfg.adapter_lr,
            **({"weight_decay": 0.0} if decay and cfg.adapter_optimizer == "adam" else {}),
        }
        (adam_groups if cfg.adapter_optimizer == "adam" else muon_groups).append(adapters)
    adam = torch.optim.AdamW if decay else torch.optim.Adam
    optimizers: list[torch.optim.Optimizer] = [adam(adam_groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused)]
    if muon_groups:
        optimizers.append(
            Muon(
                muon_groups,
                lr=cfg.matrix_lr,
                momentum=cfg.muon_momentum,
                backend_steps=cfg.muon_backend_steps,
                ns_schedule=NS_SCHEDULES[cfg.muon_ns],
                weight_decay=cfg.muon_weight_decay,
                row_normalize=cfg.muon_row_normalize,
            )
        )
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def muon_momentum_at(step: int, cfg: OptimizerConfig) -> float:
    """Muon momentum warms up linearly from the start value over the first steps."""
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum

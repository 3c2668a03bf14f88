"""How a model is trained: the training loop's settings and the optimizer's (:class:`TrainConfig`,
:class:`OptimizerConfig`). Plain data, checked when built; stored in a run's ``config.json`` as
its ``train`` part and compared field by field when a run resumes (the fields marked
:data:`MAY_CHANGE_ON_RESUME` may differ: the budget, the device, compilation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loopgolf.checks import check_range, check_types, from_dict
from loopgolf.model.gpt import MAX_SEQ_LEN

# Field metadata: a resumed run may give this field a new value (the budget, where it runs);
# every other field of a run's configuration is fixed by its first start.
MAY_CHANGE_ON_RESUME = {"on_resume": "may change"}


def may_change_on_resume(f: Any) -> bool:
    """Whether dataclass field ``f`` may take a new value when a run resumes."""
    return f.metadata.get("on_resume") == "may change"

@dataclass
class OptimizerConfig:
    """Learning rates and settings of the Muon + Adam optimizers (loopgolf.train.optim)."""

    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    embed_lr: float = 0.05  # tied embedding (it is also the output head)
    head_lr: float = 0.008  # untied output head
    untied_embed_lr: float = 0.6
    adapter_lr: float = 0.01  # per-virtual-layer LoRA factors (under either adapter_optimizer)
    adapter_optimizer: str = "adam"  # "adam" or "muon": per-depth LoRA diverged under Muon in a public report
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5

    def __post_init__(self) -> None:
        check_types(self, "optim")
        if self.adapter_optimizer not in ("adam", "muon"):
            raise ValueError(f"adapter_optimizer must be 'adam' or 'muon', got {self.adapter_optimizer!r}")
        for name in ("matrix_lr", "scalar_lr", "embed_lr", "head_lr", "untied_embed_lr", "adapter_lr"):
            check_range("optim", name, getattr(self, name), 0.0)
        for name in ("beta1", "beta2", "muon_momentum", "muon_momentum_warmup_start"):
            check_range("optim", name, getattr(self, name), 0.0, 1.0)
        check_range("optim", "adam_eps", self.adam_eps, 0.0, None, lo_open=True)
        check_range("optim", "muon_momentum_warmup_steps", self.muon_momentum_warmup_steps, 0)
        check_range("optim", "muon_backend_steps", self.muon_backend_steps, 1, 100)


MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit seed


@dataclass
class TrainConfig:
    seq_len: int = 1024
    batch_tokens: int = 524_288  # global tokens per optimizer step (all ranks, all micro-steps)
    micro_batch_tokens: int | None = None  # at most this many tokens per rank per forward; None = batch_tokens / world
    max_steps: int | None = field(default=20_000, metadata=MAY_CHANGE_ON_RESUME)
    time_budget: float | None = field(default=600.0, metadata=MAY_CHANGE_ON_RESUME)  # seconds of training (validation excluded)
    warmup_steps: int = 0  # linear lr warmup (the baseline uses none)
    warmdown_frac: float = 0.1  # linear decay to zero over the last fraction of the budget
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    grad_clip: float = 0.0
    recurrence_stages: list[float] = field(default_factory=list)  # progressive recurrence: training fraction at which each extra pass switches on
    val_every: int = 0  # steps between periodic validations (0 = only at the end)
    val_max_tokens: int | None = 65_536  # periodic validation scores a prefix this long
    log_every: int = 10
    seed: int = 1337
    compile: bool = field(default=False, metadata=MAY_CHANGE_ON_RESUME)  # torch.compile (inductor): CUDA, or CPU with a C++ compiler; compiled before the clock starts
    device: str = field(default="auto", metadata=MAY_CHANGE_ON_RESUME)  # auto | cpu | cuda

    def __post_init__(self) -> None:
        if isinstance(self.optim, dict):
            self.optim = from_dict(OptimizerConfig, self.optim, "optim")
        if isinstance(self.recurrence_stages, list):  # JSON writes 0.0 as 0.0 but a hand edit may write 0
            self.recurrence_stages = [float(f) if isinstance(f, int) and not isinstance(f, bool) else f for f in self.recurrence_stages]
        check_types(self, "train")
        check_range("train", "seq_len", self.seq_len, 1, MAX_SEQ_LEN)
        check_range("train", "seed", self.seed, 0, MAX_SEED)
        check_range("train", "warmup_steps", self.warmup_steps, 0)
        check_range("train", "grad_clip", self.grad_clip, 0.0)
        check_range("train", "val_every", self.val_every, 0)
        check_range("train", "log_every", self.log_every, 1)
        for name in ("micro_batch_tokens", "val_max_tokens"):
            if getattr(self, name) is not None:
                check_range("train", name, getattr(self, name), 1)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"train device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        if self.batch_tokens < self.seq_len or self.batch_tokens % self.seq_len:
            raise ValueError(f"batch_tokens {self.batch_tokens} must be a positive multiple of seq_len {self.seq_len}")
        if self.max_steps is None and self.time_budget is None:
            raise ValueError("training needs a stop: set max_steps and/or time_budget")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"time_budget must be positive seconds, got {self.time_budget}")
        if any(not 0.0 <= f < 1.0 for f in self.recurrence_stages) or self.recurrence_stages != sorted(self.recurrence_stages):
            raise ValueError(f"recurrence_stages must be increasing fractions in [0, 1), got {self.recurrence_stages}")
        if not 0.0 <= self.warmdown_frac <= 1.0:
            raise ValueError(f"warmdown_frac must be in [0, 1], got {self.warmdown_frac}")


def train_config_from_dict(d: dict[str, Any], *, required: bool = False) -> TrainConfig:
    """A TrainConfig from JSON-like data; unknown (and with ``required``, missing) fields are a
    ValueError naming them."""
    return from_dict(TrainConfig, d, "train config", required=required)

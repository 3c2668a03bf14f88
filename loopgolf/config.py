"""Run configuration and named presets.

A preset is a (ModelConfig, TrainConfig) pair derived from a base; command-line overrides are
applied on top. The model config is the only thing needed to rebuild a model (it travels inside
every artifact); the train config describes how it was trained and is stored in ``config.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from loopgolf.model.gpt import ModelConfig
from loopgolf.model.plan import PlanSpec
from loopgolf.train.optim import OptimizerConfig


@dataclass
class TrainConfig:
    seq_len: int = 1024
    batch_tokens: int = 524_288  # global tokens per optimizer step (all ranks, all micro-steps)
    micro_batch_tokens: int | None = None  # tokens per rank per forward; None = batch_tokens / world
    max_steps: int | None = 20_000
    time_budget: float | None = 600.0  # seconds of training (validation excluded)
    warmup_steps: int = 0  # linear lr warmup (the baseline uses none)
    warmdown_frac: float = 0.1  # linear decay to zero over the last fraction of the budget
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    grad_clip: float = 0.0
    val_every: int = 0  # steps between periodic validations (0 = only at the end)
    val_max_tokens: int | None = 65_536  # periodic validation scores a prefix this long
    log_every: int = 10
    seed: int = 1337
    compile: bool = False  # torch.compile (CUDA only)
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        if isinstance(self.optim, dict):
            self.optim = OptimizerConfig(**self.optim)
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
        if not 0.0 <= self.warmdown_frac <= 1.0:
            raise ValueError(f"warmdown_frac must be in [0, 1], got {self.warmdown_frac}")


@dataclass
class Preset:
    name: str
    description: str
    model: ModelConfig
    train: TrainConfig
    eval_batch_size: int = 8


def _cpu_train(**kw: Any) -> TrainConfig:
    base = dict(
        seq_len=256,
        batch_tokens=8_192,
        max_steps=None,
        time_budget=150.0,
        warmdown_frac=0.3,
        val_every=100,
        val_max_tokens=16_384,
        log_every=10,
        optim=OptimizerConfig(muon_momentum_warmup_steps=100),
    )
    base.update(kw)
    return TrainConfig(**base)


def _cpu_model(**kw: Any) -> ModelConfig:
    base = dict(model_dim=256, num_heads=4, num_kv_heads=2, mlp_mult=2, plan=PlanSpec("vanilla", layers=4))
    base.update(kw)
    return ModelConfig(**base)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "cpu",
            "default: 4 x 256 vanilla, seq 256, 150 s of training on CPU (the `loopgolf run` default)",
            _cpu_model(),
            _cpu_train(),
        ),
        Preset(
            "cpu-cycle",
            "2 unique 256-wide blocks looped 2 times (CYCLE K=2 B=2), same compute as `cpu`",
            _cpu_model(plan=PlanSpec("cycle", layers=2, loops=2)),
            _cpu_train(),
        ),
        Preset(
            "debug",
            "tiny 2 x 32 model, seq 32, 8 steps: for tests and smoke checks",
            ModelConfig(model_dim=32, num_heads=2, num_kv_heads=1, plan=PlanSpec("vanilla", layers=2)),
            TrainConfig(
                seq_len=32, batch_tokens=256, max_steps=8, time_budget=None, warmdown_frac=0.25,
                val_every=4, val_max_tokens=2048, log_every=1, optim=OptimizerConfig(muon_momentum_warmup_steps=4),
            ),
        ),
        Preset(
            "baseline",
            "the official Parameter Golf baseline: 9 x 512, 8/4 heads, seq 1024, 524,288 tokens/step, 600 s (GPU)",
            ModelConfig(),
            TrainConfig(warmdown_frac=0.087, val_every=1000, log_every=50),
            eval_batch_size=32,
        ),
        Preset(
            "baseline-cycle",
            "the baseline shape with 3 unique blocks looped 3 times (CYCLE K=3 B=3, 9 virtual layers), 600 s (GPU)",
            ModelConfig(plan=PlanSpec("cycle", layers=3, loops=3)),
            TrainConfig(warmdown_frac=0.087, val_every=1000, log_every=50),
            eval_batch_size=32,
        ),
    ]
}

DEFAULT_PRESET = "cpu"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    p = PRESETS[name]
    # Hand out copies so callers can override freely.
    return Preset(p.name, p.description, ModelConfig.from_dict(p.model.to_dict()), replace(p.train, optim=replace(p.train.optim)), p.eval_batch_size)


def apply_overrides(obj: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of a config dataclass with the given fields replaced (validated)."""
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown {type(obj).__name__} field(s) {sorted(unknown)}")
    return replace(obj, **overrides)


def train_config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)


def train_config_from_dict(d: dict[str, Any]) -> TrainConfig:
    return TrainConfig(**d)

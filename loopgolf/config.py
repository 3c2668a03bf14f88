"""Run configuration and named presets.

A preset is a (ModelConfig, TrainConfig) pair derived from a base; command-line overrides are
applied on top. The model config is the only thing needed to rebuild a model (it travels inside
every artifact); the train config describes how it was trained and is stored in ``config.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from loopgolf.model.gpt import ModelConfig, unique_params_formula
from loopgolf.model.plan import PlanSpec, build_plan
from loopgolf.train.config import OptimizerConfig, TrainConfig


@dataclass
class Preset:
    name: str
    description: str
    model: ModelConfig
    train: TrainConfig
    eval_batch_size: int = 8


# The default run stops at a fixed step count, not a wallclock budget, so its score does not
# depend on how busy the machine is: about what a quiet 2-core CPU reaches in the 150 s the default
# once trained for (246 steps in 150.6 s; 250 steps took 158-162 s; docs/LOG.md, 2026-12-04).
CPU_DEFAULT_STEPS = 250


def _cpu_train(**kw: Any) -> TrainConfig:
    base = dict(
        seq_len=128,
        batch_tokens=4_096,
        max_steps=CPU_DEFAULT_STEPS,
        time_budget=None,
        warmdown_frac=0.3,
        val_every=200,
        val_max_tokens=16_384,
        log_every=10,
        optim=OptimizerConfig(muon_momentum_warmup_steps=100),
    )
    base.update(kw)
    return TrainConfig(**base)


def _pg_train(**kw: Any) -> TrainConfig:
    # 65,536 tokens per forward: 8 accumulation micro-steps on one GPU, 1 on eight, as the
    # official script does (the whole 524,288-token batch in one forward would not fit in 80 GB).
    base = dict(warmdown_frac=0.087, val_every=1000, log_every=50, micro_batch_tokens=65_536)
    base.update(kw)
    return TrainConfig(**base)


@dataclass(frozen=True)
class Scale:
    """One size of the preset family: the vanilla model every variant is compared with."""

    prefix: str
    width: int
    depth: int  # virtual layers of the vanilla model (and of the shared variants)
    loops: int  # B for the shared variants (K = depth // loops)
    heads: int
    kv_heads: int
    train: Callable[..., TrainConfig]
    note: str
    eval_batch_size: int
    mini_loop: PlanSpec
    mini_stages: list[float]


SCALES = (
    Scale(
        "cpu", 256, 6, 3, 4, 2, lambda: _cpu_train(max_steps=None, time_budget=600.0), "CPU scale, 600 s on 2 cores", 8,
        PlanSpec("mini-loop", layers=4, loops=1, loop_start=1, loop_end=2), [0.35],
    ),
    Scale(
        "pg", 512, 9, 3, 8, 4, _pg_train, "Parameter Golf scale, 600 s on one GPU", 32,
        PlanSpec("mini-loop", layers=9, loops=2, loop_start=3, loop_end=5), [0.35, 0.5],
    ),
)


def widest_matching(base: ModelConfig, plan: PlanSpec, step: int = 128, **kw: Any) -> ModelConfig:
    """The widest model (width a multiple of ``step``, 64-wide heads, half as many KV heads)
    on ``plan`` whose unique parameters do not exceed ``base``'s: the bytes saved by sharing
    reinvested in width."""
    budget = unique_params_formula(base)
    best = None
    width = step
    while True:
        heads = width // 64
        cfg = ModelConfig(**{**base.to_dict(), "model_dim": width, "num_heads": heads, "num_kv_heads": max(1, heads // 2), "plan": plan.to_dict(), **kw})
        if unique_params_formula(cfg) > budget:
            break
        best, width = cfg, width + step
    if best is None:
        raise ValueError(f"no width fits the budget of {budget:,} parameters on {plan}")
    return best


def _family(scale: Scale) -> list[Preset]:
    """The seed hypothesis's variants at one scale, all with the vanilla model's virtual depth."""
    base = ModelConfig(model_dim=scale.width, num_heads=scale.heads, num_kv_heads=scale.kv_heads, plan=PlanSpec("vanilla", layers=scale.depth))
    k, b = scale.depth // scale.loops, scale.loops

    def model(plan: PlanSpec, **kw: Any) -> ModelConfig:
        return ModelConfig(**{**base.to_dict(), "plan": plan.to_dict(), **kw})

    shared = PlanSpec("cycle", layers=k, loops=b)
    all_lora = ("q", "k", "v", "o", "mlp_in", "mlp_out")
    variants: list[tuple[str, str, ModelConfig, dict[str, Any]]] = [
        ("vanilla", f"{scale.depth} x {scale.width} unique layers", base, {}),
        ("shared", f"strict full-block sharing: {k} blocks x {b} loops (CYCLE)", model(shared), {}),
        ("shared-scales", f"{k} blocks x {b} loops + unshared per-layer scales, mixes and q gains (the K={k} few-block point)", model(shared, per_layer_controls=True), {}),
        ("shared-depth", f"{k} blocks x {b} loops + per-layer scales + depth embeddings", model(shared, per_layer_controls=True, depth_embeddings=True), {}),
        ("shared-lora4", f"{k} blocks x {b} loops + per-layer scales + rank-4 LoRA on every projection", model(shared, per_layer_controls=True, lora_ranks={t: 4 for t in all_lora}), {}),
        ("shared-lora16", f"{k} blocks x {b} loops + per-layer scales + rank-16 LoRA on every projection", model(shared, per_layer_controls=True, lora_ranks={t: 16 for t in all_lora}), {}),
        ("mlp-share", f"MLP-heavy sharing: {k} MLPs x {b} loops, attention unique per layer", model(PlanSpec("cycle", layers=k, loops=b, share="mlp"), per_layer_controls=True), {}),
        ("attn-share", f"attention sharing: {k} attention sublayers x {b} loops, MLPs unique per layer", model(PlanSpec("cycle", layers=k, loops=b, share="attn"), per_layer_controls=True), {}),
        *[
            (
                f"k{n}",
                f"{'single' if n == 1 else 'few'}-block recurrence: {n} block(s) x {scale.depth // n} loops + per-layer scales",
                model(PlanSpec("cycle", layers=n, loops=scale.depth // n), per_layer_controls=True),
                {},
            )
            for n in (1, 2, 3)
            if n != k  # K = k is the shared-scales preset
        ],
        (
            "mini-loop",
            f"mini-loop: {build_plan(scale.mini_loop).describe()}, extra passes switched on at {scale.mini_stages} of training",
            model(scale.mini_loop, per_layer_controls=True),
            {"recurrence_stages": scale.mini_stages},
        ),
    ]
    wide = widest_matching(base, shared, per_layer_controls=True)
    variants.append(("wide", f"wide recurrent: {k} blocks x {b} loops at width {wide.model_dim}, unique params matched to vanilla's", wide, {}))
    presets = []
    for name, desc, cfg, train_kw in variants:
        train = scale.train()
        presets.append(Preset(f"{scale.prefix}-{name}", f"{desc} ({scale.note})", cfg, TrainConfig(**{**asdict(train), **train_kw}), scale.eval_batch_size))
    return presets


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "cpu",
            f"default: 4 x 256 vanilla, seq 128, {CPU_DEFAULT_STEPS} steps (about 160 s on 2 quiet CPU cores; the `loopgolf run` default)",
            ModelConfig(model_dim=256, num_heads=4, num_kv_heads=2, plan=PlanSpec("vanilla", layers=4)),
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
            "the official Parameter Golf baseline: 9 x 512, 8/4 heads, seq 1024, 524,288 tokens/step, 600 s (GPU); same as pg-vanilla",
            ModelConfig(),
            _pg_train(),
            eval_batch_size=32,
        ),
        *[p for scale in SCALES for p in _family(scale)],
    ]
}

DEFAULT_PRESET = "cpu"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    p = PRESETS[name]
    # Hand out copies so callers can override freely.
    return Preset(p.name, p.description, ModelConfig.from_dict(p.model.to_dict()), replace(p.train, optim=replace(p.train.optim)), p.eval_batch_size)

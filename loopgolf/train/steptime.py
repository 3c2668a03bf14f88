"""Measured training step time: a few real optimizer steps of a configuration on this device.

The byte planner's matmul estimate (3 x forward FLOPs / a matmul rate) ignores everything but
the matmuls: attention's softmax, norms, Muon's Newton-Schulz, per-layer controls, Python. On a
small CPU model those are most of the step. :func:`step_time` builds the model, runs the real
optimizers on synthetic tokens for ``warmup`` steps and ``steps`` timed steps at each progressive-
recurrence stage (each stage runs at its own depth), and keeps the median per stage. It sets up
the allocator as training does (:func:`loopgolf.train.trainer.keep_freed_memory`): without that
and with one warm-up step, a CPU step measured 12-36% slower than the same step in a run.

Results are cached as JSON under ``<cache>/steptime/`` (``$LOOPGOLF_CACHE``, else
``~/.cache/loopgolf``), keyed by everything that changes the time: the model configuration, the
training shape and optimizer (and whether a weight average is kept: its update is part of each
step), the device (CPU model, vector instruction set and thread count, or the GPU's name), and the
torch version. A second plan of the same candidates is instant; a shape change measures anew.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch

from loopgolf.checks import without_added_defaults
from loopgolf.config import OptimizerConfig, TrainConfig
from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.train.ema import WeightEMA
from loopgolf.train.optim import build_optimizers
from loopgolf.train.trainer import accumulation_steps, keep_freed_memory, run_step
from loopgolf.util import atomic_write_json, cache_dir

STEPTIME_FORMAT = 2  # bump when what is measured changes: old cache entries are ignored (2: the trainer's malloc tuning)


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step at each progressive-recurrence stage (one entry without stages),
    and the fraction of the training budget at which each stage starts."""

    stage_seconds: list[float]
    stage_starts: list[float]  # [0.0, *recurrence_stages]
    device: str
    cached: bool = False

    def steps_in(self, seconds: float) -> int:
        """Optimizer steps a wallclock budget of ``seconds`` gives: each stage runs its share of
        the budget at its own step time (stages switch on the budget's fraction, as in training)."""
        if not seconds > 0:
            raise ValueError(f"a time budget must be positive, got {seconds!r}")
        ends = [*self.stage_starts[1:], 1.0]
        return int(sum((end - start) * seconds / t for start, end, t in zip(self.stage_starts, ends, self.stage_seconds)))

    def mean_seconds(self) -> float:
        """Seconds per step averaged over the budget's stages (time-weighted)."""
        ends = [*self.stage_starts[1:], 1.0]
        steps = sum((end - start) / t for start, end, t in zip(self.stage_starts, ends, self.stage_seconds))
        return 1.0 / steps


def cpu_name() -> str:
    """The CPU's model name: Linux's /proc/cpuinfo, else what ``platform`` knows (on Linux
    ``platform.processor()`` is often empty, which left only "x86_64")."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_key(device: torch.device) -> str:
    """What makes one machine's step times another's: the CPU model, the vector instructions
    torch runs on it and the thread count, or the GPU. A virtual machine may name its CPU only
    by vendor ("AMD EPYC"), and two 2-core boxes that both reported "x86_64" here ran the same
    models 1.8-2.2x apart in step time (the slower one has AVX2 and no AVX-512); the model name
    and instruction set are what a cache key can see of that."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{cpu_name()}:{torch.backends.cpu.get_cpu_capability()}:{torch.get_num_threads()} threads"


def cache_key(model_cfg: ModelConfig, train_cfg: TrainConfig, device: torch.device, steps: int) -> str:
    train = asdict(train_cfg)
    shape = {k: train[k] for k in ("seq_len", "batch_tokens", "micro_batch_tokens", "optim", "grad_clip", "recurrence_stages", "compile")}
    # Optimizer and model fields added later are left out at their defaults (which time as
    # before), so the entries measured before them keep their keys.
    shape["optim"] = without_added_defaults(shape["optim"], OptimizerConfig)
    if train_cfg.ema_decay is not None:  # the average's update is part of the step; its decay does not change the time
        shape["ema"] = True
    blob = {
        "format": STEPTIME_FORMAT,
        "model": without_added_defaults(model_cfg.to_dict(), ModelConfig),
        "train": shape,
        "device": device_key(device),
        "torch": torch.__version__,
        "steps": steps,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:32]


# Three warm-up and five timed steps: measured on this CPU, one warm-up and two timed steps of a
# 1 x 64 model read 0.094 s against 0.079 s after three warm-ups and 0.076 s in a 300 s run.
MEASURE_WARMUP, MEASURE_STEPS = 3, 5


def measure(model_cfg: ModelConfig, train_cfg: TrainConfig, device: torch.device, *, steps: int = MEASURE_STEPS, warmup: int = MEASURE_WARMUP) -> list[float]:
    """Median seconds per optimizer step at each stage, measured now (no cache)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps} and {warmup}")
    if device.type != "cuda":
        keep_freed_memory()  # as training does: without it each CPU step faults its activations in again (measured 8-11% slower)
    torch.manual_seed(0)
    model = GPT(model_cfg).to(device)
    model.train()
    optimizers = build_optimizers(model, train_cfg.optim, tied=model_cfg.tie_embeddings)
    ema = None if train_cfg.ema_decay is None else WeightEMA(model, train_cfg.ema_decay)
    accum, _ = accumulation_steps(train_cfg, 1)
    rows = train_cfg.batch_tokens // train_cfg.seq_len
    gen = torch.Generator().manual_seed(0)
    xs = torch.randint(0, model_cfg.vocab_size, (rows, train_cfg.seq_len), generator=gen)
    ys = torch.randint(0, model_cfg.vocab_size, (rows, train_cfg.seq_len), generator=gen)
    if device.type == "cpu":
        xs, ys = xs.to(device), ys.to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    stages: list[int | None] = list(range(len(train_cfg.recurrence_stages) + 1)) if train_cfg.recurrence_stages else [None]
    out = []
    for stage in stages:
        model.set_stage(stage)
        times = []
        for i in range(warmup + steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            loss = run_step(model, model, optimizers, xs, ys, accum=accum, amp=amp, world_size=1, grad_clip=train_cfg.grad_clip, device=device, ema=ema)
            float(loss)  # wait for the step
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        out.append(statistics.median(times))
    model.set_stage(None)
    return out


def step_time(
    model_cfg: ModelConfig, train_cfg: TrainConfig, device: torch.device, *, steps: int = MEASURE_STEPS, warmup: int = MEASURE_WARMUP, use_cache: bool = True
) -> StepTime:
    """The step time of a configuration on ``device``: from the cache, else measured and cached."""
    starts = [0.0, *train_cfg.recurrence_stages]
    key = cache_key(model_cfg, train_cfg, device, steps)
    path = cache_dir() / "steptime" / f"{key}.json"
    if use_cache and path.is_file():
        try:
            entry = json.loads(path.read_text())
            seconds = entry["stage_seconds"]
            if len(seconds) == len(starts) and all(isinstance(t, float) and t > 0 for t in seconds):
                return StepTime(seconds, starts, entry["device"], cached=True)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged entry is measured again and overwritten
    seconds = measure(model_cfg, train_cfg, device, steps=steps, warmup=warmup)
    entry: dict[str, Any] = {"stage_seconds": seconds, "device": device_key(device), "torch": torch.__version__, "measured_at": time.time()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, entry)
    except OSError:
        pass  # an unwritable cache costs a later plan the measurement again, nothing else
    return StepTime(seconds, starts, entry["device"])

"""The training loop: wallclock and/or step budget, warmdown timed against the budget, gradient
accumulation, bf16 autocast and optional torch.compile on CUDA, float32 on CPU, a progress bar,
``log.jsonl`` records and periodic validation."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from loopgolf.config import TrainConfig
from loopgolf.data.shards import TokenLoader
from loopgolf.train.optim import build_optimizers, muon_momentum_at
from loopgolf.util import append_jsonl


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available on this machine")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda[:N]")
    return torch.device(name)


def training_progress(step: int, elapsed: float, cfg: TrainConfig) -> float:
    """Fraction of the budget used: the larger of the step fraction and the wallclock fraction,
    so whichever budget binds times the schedules."""
    progress = 0.0
    if cfg.max_steps is not None:
        progress = max(progress, step / cfg.max_steps)
    if cfg.time_budget is not None:
        progress = max(progress, elapsed / cfg.time_budget)
    return progress


def lr_multiplier(step: int, elapsed: float, cfg: TrainConfig) -> float:
    """1 until the last ``warmdown_frac`` of the budget, then linear to 0 (after an optional
    linear warmup)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.warmdown_frac <= 0:
        return warm
    return warm * max(0.0, min(1.0, (1.0 - training_progress(step, elapsed, cfg)) / cfg.warmdown_frac))


def recurrence_stage(step: int, elapsed: float, cfg: TrainConfig) -> int:
    """Progressive recurrence: stage k (passes 0..k of the plan) starts at ``recurrence_stages[k-1]``."""
    progress = training_progress(step, elapsed, cfg)
    return sum(1 for start in cfg.recurrence_stages if progress >= start)


def accumulation_steps(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro-steps per optimizer step, tokens per rank per micro-step) for a global batch that
    does not depend on the world size."""
    per_rank = cfg.batch_tokens // world_size
    if per_rank * world_size != cfg.batch_tokens:
        raise ValueError(f"batch_tokens {cfg.batch_tokens} is not divisible by world size {world_size}")
    micro = cfg.micro_batch_tokens or per_rank
    if micro % cfg.seq_len or per_rank % micro:
        raise ValueError(
            f"micro_batch_tokens {micro} must be a multiple of seq_len {cfg.seq_len} and divide the per-rank batch {per_rank}"
        )
    return per_rank // micro, micro


@dataclass
class TrainResult:
    steps: int
    train_tokens: int
    train_seconds: float
    tokens_per_second: float
    final_train_loss: float
    losses: list[float] = field(default_factory=list)
    val_history: list[dict] = field(default_factory=list)
    stage_steps: list[int] = field(default_factory=list)  # step at which each recurrence stage began


def train(
    model: nn.Module,
    loader: TokenLoader,
    cfg: TrainConfig,
    *,
    device: torch.device,
    tied_embeddings: bool = True,
    log_path: Path | None = None,
    validate: Callable[[nn.Module], dict] | None = None,
    on_step: Callable[[int, float, nn.Module], None] | None = None,
    progress: bool = True,
    world_size: int = 1,
) -> TrainResult:
    """Train ``model`` in place until the step or time budget runs out.

    ``on_step(step, progress, model)`` runs before every optimizer step (``progress`` is the
    fraction of the budget used); schedules that change the model during training, such as
    quantization-aware training over the last part of the budget, hook in here."""
    model.train()
    staged = bool(cfg.recurrence_stages)
    if staged:
        loops = model.plan.num_loops
        if len(cfg.recurrence_stages) != loops - 1:
            raise ValueError(
                f"recurrence_stages has {len(cfg.recurrence_stages)} start fractions but the plan has "
                f"{loops - 1} extra pass(es) to switch on ({model.plan.describe()})"
            )
    optimizers = build_optimizers(model, cfg.optim, tied=tied_embeddings)
    accum, micro_tokens = accumulation_steps(cfg, world_size)
    step_fn: nn.Module = model
    if cfg.compile:
        if device.type != "cuda":
            raise ValueError("torch.compile is supported on CUDA only here; drop --compile on CPU")
        step_fn = torch.compile(model, dynamic=False)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def log(record: dict) -> None:
        if log_path is not None:
            append_jsonl(log_path, record)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = cfg.max_steps if cfg.time_budget is None else None
        bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)

    losses: list[float] = []
    val_history: list[dict] = []
    elapsed = 0.0  # training seconds, validation excluded
    step = 0
    tokens = 0
    loss_value = float("nan")
    stage_steps: list[int] = []
    try:
        while True:
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            if cfg.time_budget is not None and elapsed >= cfg.time_budget:
                break
            if staged:
                stage = recurrence_stage(step, elapsed, cfg)
                while len(stage_steps) <= stage:  # a stage can be skipped if a step jumps past it
                    stage_steps.append(step)
                    model.set_stage(len(stage_steps) - 1)
                    log({"event": "stage", "stage": len(stage_steps) - 1, "step": step, "virtual_layers": len(model.active_layers)})
            if on_step is not None:
                on_step(step, training_progress(step, elapsed, cfg), model)
            t0 = time.perf_counter()
            mul = lr_multiplier(step, elapsed, cfg)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * mul
                    if "momentum" in group:
                        group["momentum"] = muon_momentum_at(step, cfg.optim)
            loss_sum = torch.zeros((), device=device)
            # One read per step, split into micro-batches: the step sees the same tokens
            # whatever the accumulation or world size.
            xs, ys = loader.next_batch(accum * micro_tokens)
            for x, y in zip(xs.chunk(accum), ys.chunk(accum)):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with amp:
                    loss = step_fn(x, y)
                (loss / accum).backward()
                loss_sum += loss.detach()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            step += 1
            tokens += cfg.batch_tokens
            log_now = step % cfg.log_every == 0 or step == 1 or (cfg.max_steps is not None and step == cfg.max_steps)
            loss_value = float(loss_sum) / accum  # one host sync per step, after the update
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss became {loss_value} at step {step}; lower the learning rates")
            losses.append(loss_value)
            elapsed += time.perf_counter() - t0
            tok_s = tokens / max(elapsed, 1e-9)
            if log_now:
                log({"event": "train", "step": step, "loss": loss_value, "lr_mul": mul, "tokens": tokens, "elapsed": elapsed, "tokens_per_second": tok_s})
            if bar is not None:
                eta = _eta(step, elapsed, cfg)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}", eta=f"{eta:.0f}s")
                bar.update(1)
            if validate is not None and cfg.val_every and step % cfg.val_every == 0:
                record = {"step": step, **validate(model)}
                val_history.append(record)
                log({"event": "val", **record})
                if bar is not None:
                    bar.write(f"step {step}: val_loss {record['val_loss']:.4f} val_bpb {record['val_bpb']:.4f}")
    finally:
        if bar is not None:
            bar.close()
        if staged:
            # The exported model runs every pass; say so if training ended before the last stage.
            if len(stage_steps) < model.plan.num_loops:
                log({"event": "warning", "message": f"training ended in recurrence stage {len(stage_steps) - 1}; later passes are untrained"})
            model.set_stage(None)
    return TrainResult(
        steps=step,
        train_tokens=tokens,
        train_seconds=elapsed,
        tokens_per_second=tokens / max(elapsed, 1e-9),
        final_train_loss=loss_value,
        losses=losses,
        val_history=val_history,
        stage_steps=stage_steps,
    )


def _eta(step: int, elapsed: float, cfg: TrainConfig) -> float:
    per_step = elapsed / max(step, 1)
    remaining = math.inf
    if cfg.max_steps is not None:
        remaining = (cfg.max_steps - step) * per_step
    if cfg.time_budget is not None:
        remaining = min(remaining, max(cfg.time_budget - elapsed, 0.0))
    return remaining

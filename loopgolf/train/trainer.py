"""The training loop: wallclock and/or step budget, warmdown timed against the budget, gradient
accumulation, data parallelism across ranks, bf16 autocast on CUDA, optional torch.compile,
float32 on CPU, a progress bar, ``log.jsonl`` records, periodic validation and checkpoints for
exact resume.

Host syncs. On CUDA a step never waits for the GPU: losses stay on the device and are read, with
the clock, every ``log_every`` steps (and at validations, checkpoints and the end of the budget).
In between, the schedules (learning rate, recurrence stage, the stop) read a clock extrapolated
from the last sync, which every rank computes identically, so ranks never disagree about the step
they are in. On CPU a sync is free and happens every step, which makes the clock exact.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loopgolf.config import LoopSampler, TrainConfig, check_recurrence_stages
from loopgolf.data.shards import TokenLoader
from loopgolf.train.checkpoint import CheckpointPolicy, TrainState, restore_checkpoint, restore_ema, save_checkpoint
from loopgolf.train.distributed import all_reduce_gradients, all_reduce_mean, broadcast_parameters, current_world
from loopgolf.train.ema import WeightEMA
from loopgolf.train.optim import build_optimizers, muon_momentum_at
from loopgolf.util import append_jsonl

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest value glibc accepts on 64-bit systems
_malloc_tuned = False


def keep_freed_memory() -> bool:
    """Let glibc reuse freed blocks (up to 32 MiB) instead of returning them to the kernel.

    A CPU training step allocates and frees the same activation buffers every time. By default
    glibc serves each large block with a fresh mmap and unmaps it on free, so every step faults
    every page of every activation in again (about 14,000 page faults per step for the ``cpu``
    preset, a kernel zeroing each page). Keeping those blocks on the heap removes the faults;
    the arithmetic is untouched. Process-wide, Linux/glibc only; returns whether it applied."""
    global _malloc_tuned
    if _malloc_tuned or not sys.platform.startswith("linux"):
        return _malloc_tuned
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 2**30) == 1 and ok
    _malloc_tuned = ok
    return ok


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
    """1 until the last ``warmdown_frac`` of the budget, then linear down to ``min_lr_frac``
    (0 by default; the floor holds to the end), after an optional linear warmup."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.warmdown_frac <= 0:
        return warm
    return warm * max(cfg.min_lr_frac, min(1.0, (1.0 - training_progress(step, elapsed, cfg)) / cfg.warmdown_frac))


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
    # micro_batch_tokens is a cap: a rank whose share of the batch is smaller runs it in one go
    # (the official script's 8 // world_size micro-steps: 8 on one GPU, 1 on eight).
    micro = min(cfg.micro_batch_tokens or per_rank, per_rank)
    if micro % cfg.seq_len or per_rank % micro:
        raise ValueError(f"micro_batch_tokens {micro} must be a multiple of seq_len {cfg.seq_len} and divide the per-rank batch {per_rank}")
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
    resumed_from: int | None = None  # step of the checkpoint this run continued from


class StepClock:
    """Training seconds as the schedules see them, equal on every rank.

    ``synced`` is the measured clock at the last sync (averaged over ranks); between syncs the
    clock advances by the mean step time of the last synced window, a value every rank shares.
    """

    def __init__(self, step: int, elapsed: float) -> None:
        self.synced_step, self.synced = step, elapsed
        self.per_step = 0.0

    def at(self, step: int) -> float:
        return self.synced + (step - self.synced_step) * self.per_step

    def sync(self, step: int, elapsed: float) -> None:
        if step > self.synced_step:
            self.per_step = max(elapsed - self.synced, 0.0) / (step - self.synced_step)
        self.synced_step, self.synced = step, elapsed


def compile_model(model: Callable[..., torch.Tensor], backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """``torch.compile`` the training forward (a model, or a forward such as ``QAT.forward``, that
    maps (inputs, targets) to the loss): one full graph per recurrence
    stage, fixed shapes. Inductor fuses the elementwise work between the matmuls (norms, residual
    mixes, rotary, the logit soft-cap and the cross-entropy) on CUDA and on CPU (where it needs a
    C++ compiler). Tests pass ``backend="eager"`` to check graphs and guards cheaply."""
    return torch.compile(model, dynamic=False, fullgraph=True, backend=backend)


def warm_up_compiled(
    step_fn: Callable[..., torch.Tensor],
    model: nn.Module,
    stages: list[int | None],
    x: torch.Tensor,
    amp: AbstractContextManager,
    set_depth: Callable[[int | None], None] | None = None,
) -> None:
    """Compile every recurrence stage's graph (forward and backward) before the clock starts, so
    switching stages during training reuses a cached graph instead of compiling on the budget.
    ``set_depth`` (default ``model.set_stage``) puts the model at each entry of ``stages``
    (``model.set_loops`` for depth-sampled training). Gradients are discarded; parameters are
    untouched."""
    # Inputs and targets are distinct tensors, as in training: passing one tensor twice would
    # guard the graph on that aliasing and recompile at the first real step.
    y = x.clone()
    set_depth = model.set_stage if set_depth is None else set_depth
    for stage in stages:
        if stages != [None]:
            set_depth(stage)
        with amp:
            loss = step_fn(x, y)
        loss.backward()
        model.zero_grad(set_to_none=True)


def run_step(
    step_fn: Callable[..., torch.Tensor],
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    xs: torch.Tensor,
    ys: torch.Tensor,
    *,
    accum: int,
    amp: AbstractContextManager,
    world_size: int,
    grad_clip: float,
    device: torch.device,
    ema: WeightEMA | None = None,
) -> torch.Tensor:
    """One optimizer step over a batch split into ``accum`` micro-batches (then the weight
    average's update, with ``ema``); returns the sum of the micro-batch losses as a device
    tensor. Nothing in here waits for the GPU."""
    loss_sum = torch.zeros((), device=device)
    if device.type == "cuda":  # pinned memory lets the copy run without blocking the host
        xs, ys = xs.pin_memory().to(device, non_blocking=True), ys.pin_memory().to(device, non_blocking=True)
    for x, y in zip(xs.chunk(accum), ys.chunk(accum)):
        with amp:
            loss = step_fn(x, y)
        (loss / accum).backward()
        loss_sum += loss.detach()
    if world_size > 1:
        all_reduce_gradients(model.parameters(), world_size)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for opt in optimizers:
        opt.step()
    if ema is not None:
        ema.update()
    model.zero_grad(set_to_none=True)
    return loss_sum


def _truncate(path: Path, size: int) -> None:
    """Cut ``log.jsonl`` back to where a checkpoint was taken: records written after it (by the
    run that was interrupted) describe steps the resumed run repeats."""
    if path.exists() and path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)


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
    forward: Callable[..., torch.Tensor] | None = None,
    progress: bool = True,
    checkpoint: CheckpointPolicy | None = None,
    resume: dict | None = None,
) -> TrainResult:
    """Train ``model`` in place until the step or time budget runs out.

    ``on_step(step, progress, model)`` runs before every optimizer step (``progress`` is the
    fraction of the budget used); schedules that change the model during training, such as
    quantization-aware training over the last part of the budget, hook in here. A hook with
    ``state_dict()``/``load_state_dict()`` methods is checkpointed with the run. ``forward``
    replaces ``model(inputs, targets)`` as the training loss (e.g. ``QAT.forward``); evaluation
    and everything else use the model itself. A ``forward`` with a ``log_values()`` method (such
    as ``loopgolf.train.distill.TrainingObjective``) adds its loss parts to each log record.

    Under torch.distributed (torchrun) every rank calls this with its rank's loader; gradients
    are averaged across ranks and rank 0 alone logs, validates, shows progress and checkpoints.
    ``checkpoint`` says when to write checkpoints; ``resume`` is a checkpoint read with
    :func:`loopgolf.train.checkpoint.read_checkpoint` to continue from.

    With ``cfg.ema_decay`` a moving average of the weights (:mod:`loopgolf.train.ema`) is kept
    after every step and, when the budget ends, copied into ``model``: what the caller scores
    and exports is the average. Periodic validation and checkpoints see the live weights (the
    checkpoint holds the averages beside them).
    """
    rank, world = current_world()
    if (loader.rank, loader.world_size) != (rank, world):
        raise ValueError(f"the loader was built for rank {loader.rank} of {loader.world_size} but this process is rank {rank} of {world}")
    main = rank == 0
    model.train()
    staged = bool(cfg.recurrence_stages)
    check_recurrence_stages(cfg.recurrence_stages, model.plan)
    sampler = None if cfg.loop_sampling is None else LoopSampler.parse(cfg.loop_sampling)
    if sampler is not None:
        model.plan.schedule(sampler.high)  # a plan without loops is refused here, before any step
    optimizers = build_optimizers(model, cfg.optim, tied=tied_embeddings)
    accum, micro_tokens = accumulation_steps(cfg, world)
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    if not cuda:
        keep_freed_memory()

    def log(record: dict) -> None:
        if log_path is not None and main:
            append_jsonl(log_path, record)

    state = TrainState()
    if resume is not None:
        state = restore_checkpoint(resume, model=model, optimizers=optimizers, loader=loader)
        if on_step is not None and hasattr(on_step, "load_state_dict") and resume.get("hook") is not None:
            on_step.load_state_dict(resume["hook"])
        if staged and state.stage_steps:
            model.set_stage(len(state.stage_steps) - 1)
        if log_path is not None and main and state.log_bytes is not None:
            _truncate(log_path, state.log_bytes)
        log({"event": "resume", "step": state.step, "elapsed": state.elapsed, "tokens": state.tokens, "world_size": world})
    if world > 1:
        broadcast_parameters(model)
    ema = None
    if cfg.ema_decay is not None:
        ema = WeightEMA(model, cfg.ema_decay)  # a fresh run averages from the weights it starts from
        if resume is not None:
            restore_ema(resume, ema)

    step_fn: Callable[..., torch.Tensor] = model if forward is None else forward
    log_parts = getattr(forward, "log_values", None)
    if cfg.compile:
        step_fn = compile_model(step_fn)
        stages: list[int | None] = list(range(model.plan.num_loops)) if staged else [None]
        if sampler is not None:  # one graph per loop count the sampler can draw
            stages = list(range(sampler.low, sampler.high + 1))
        # Each stage is one cached graph of the same function: dynamo must be allowed to keep them all.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(stages) + 1)
        dummy = torch.zeros(micro_tokens // cfg.seq_len, cfg.seq_len, dtype=torch.long, device=device)
        try:
            warm_up_compiled(step_fn, model, stages, dummy, amp, set_depth=model.set_loops if sampler is not None else None)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            raise ValueError(
                f"torch.compile failed ({type(e.inner_exception).__name__}; on CPU it needs a working C++ compiler); train without compile=true"
            ) from e
        if staged:
            model.set_stage(len(state.stage_steps) - 1 if state.stage_steps else 0)

    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        total = cfg.max_steps if cfg.time_budget is None else None
        bar = tqdm(total=total, initial=state.step, desc="train", unit="step", dynamic_ncols=True)

    # A sync reads the losses and the clock: every step on CPU (free there), every log_every
    # steps on CUDA, where reading a value would stall the GPU queue.
    sync_every = cfg.log_every if cuda else 1
    clock = StepClock(state.step, state.elapsed)
    elapsed = state.elapsed  # this rank's measured training seconds, exact at syncs
    pending: list[torch.Tensor] = []  # loss sums of steps not read yet
    loss_value = state.losses[-1] if state.losses else float("nan")
    saved_at = state.step if resume is not None else None
    step = state.step
    try:
        while True:
            now = clock.at(step)
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            if cfg.time_budget is not None and now >= cfg.time_budget:
                break
            if staged:
                stage = recurrence_stage(step, now, cfg)
                while len(state.stage_steps) <= stage:  # a stage can be skipped if a step jumps past it
                    state.stage_steps.append(step)
                    model.set_stage(len(state.stage_steps) - 1)
                    log({"event": "stage", "stage": len(state.stage_steps) - 1, "step": step, "virtual_layers": len(model.active_layers)})
            if sampler is not None:
                model.set_loops(sampler.draw(cfg.seed, step))
            if on_step is not None:
                on_step(step, training_progress(step, now, cfg), model)
            t0 = time.perf_counter()
            mul = lr_multiplier(step, now, cfg)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * mul
                    if "momentum" in group:
                        group["momentum"] = muon_momentum_at(step, cfg.optim)
            # One read per step, split into micro-batches: the step sees the same tokens
            # whatever the accumulation or world size.
            xs, ys = loader.next_batch(accum * micro_tokens)
            loss_sum = run_step(step_fn, model, optimizers, xs, ys, accum=accum, amp=amp, world_size=world, grad_clip=cfg.grad_clip, device=device, ema=ema)
            step += 1
            state.tokens += cfg.batch_tokens
            pending.append(loss_sum)

            # The last step of the budget (as far as the clock can tell without a sync) syncs, so
            # the stop is decided on a measured clock.
            last = (cfg.max_steps is not None and step >= cfg.max_steps) or (cfg.time_budget is not None and clock.at(step) >= cfg.time_budget)
            # Whether to sync must not depend on the rank: a sync is a collective under torchrun.
            log_now = step % cfg.log_every == 0 or step == 1 or last
            val_due = validate is not None and bool(cfg.val_every) and step % cfg.val_every == 0
            ckpt_now = checkpoint is not None and checkpoint.every > 0 and step % checkpoint.every == 0
            if step % sync_every == 0 or log_now or val_due or ckpt_now:
                if cuda:
                    torch.cuda.synchronize(device)  # the queued steps' GPU time belongs to this window
                elapsed += time.perf_counter() - t0
                values = torch.stack(pending)
                pending.clear()
                if world > 1:  # one collective: every rank's loss sums and its clock, averaged
                    values = all_reduce_mean(torch.cat([values, values.new_tensor([elapsed])]), world)
                host = values.tolist()
                if world > 1:
                    elapsed, host = host[-1], host[:-1]
                for s in host:
                    loss_value = s / accum
                    if not math.isfinite(loss_value):
                        raise FloatingPointError(f"training loss became {loss_value} by step {step}; lower the learning rates")
                    state.losses.append(loss_value)
                clock.sync(step, elapsed)
            else:
                elapsed += time.perf_counter() - t0
            state.step, state.elapsed = step, clock.at(step)
            tok_s = state.tokens / max(state.elapsed, 1e-9)
            if log_now:
                record = {
                    "event": "train",
                    "step": step,
                    "loss": loss_value,
                    "lr_mul": mul,
                    "tokens": state.tokens,
                    "elapsed": state.elapsed,
                    "tokens_per_second": tok_s,
                }
                if sampler is not None:  # the loop count this step drew
                    record["loops"] = model.loops or model.plan.num_loops
                if log_parts is not None:  # the parts of the last micro-batch's loss (distillation, exit losses)
                    record["parts"] = log_parts()
                log(record)
            if bar is not None:
                eta = _eta(step, state.elapsed, cfg)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}", eta=f"{eta:.0f}s")
                bar.update(1)
            if val_due and main:  # the other ranks go on and wait for rank 0 at the next collective
                if sampler is not None:  # validate at the trained loop count; the next step draws again
                    model.set_loops(None)
                record = {"step": step, **validate(model)}
                state.val_history.append(record)
                log({"event": "val", **record})
                if bar is not None:
                    bar.write(f"step {step}: val_loss {record['val_loss']:.4f} val_bpb {record['val_bpb']:.4f}")
            if ckpt_now:
                _save(checkpoint, model, optimizers, loader, state, on_step, log_path, main, ema)
                saved_at = step
        if checkpoint is not None and checkpoint.final and saved_at != step:
            _save(checkpoint, model, optimizers, loader, state, on_step, log_path, main, ema)
        if ema is not None:
            # After the final checkpoint, which keeps the live weights a resume continues from.
            ema.copy_to(model)
            log({"event": "ema", "step": step, "decay": cfg.ema_decay, "message": "the weight averages replaced the live weights"})
    finally:
        if bar is not None:
            bar.close()
        if staged:
            # The exported model runs every pass; say so if training ended before the last stage.
            if len(state.stage_steps) < model.plan.num_loops:
                log({"event": "warning", "message": f"training ended in recurrence stage {len(state.stage_steps) - 1}; later passes are untrained"})
            model.set_stage(None)
        if sampler is not None:
            model.set_loops(None)
    return TrainResult(
        steps=step,
        train_tokens=state.tokens,
        train_seconds=state.elapsed,
        tokens_per_second=state.tokens / max(state.elapsed, 1e-9),
        final_train_loss=loss_value,
        losses=state.losses,
        val_history=state.val_history,
        stage_steps=state.stage_steps,
        resumed_from=None if resume is None else int(resume["train"]["step"]),
    )


def _save(
    policy: CheckpointPolicy,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    loader: TokenLoader,
    state: TrainState,
    on_step: Callable | None,
    log_path: Path | None,
    main: bool,
    ema: WeightEMA | None = None,
) -> None:
    """Rank 0 writes the checkpoint (optimizer states and weight averages are the same on every
    rank). The log record goes first, so the saved log length includes it."""
    if not main:
        return
    if log_path is not None:
        append_jsonl(log_path, {"event": "checkpoint", "step": state.step, "path": str(policy.path)})
        state.log_bytes = log_path.stat().st_size
    hook_state = on_step.state_dict() if on_step is not None and hasattr(on_step, "state_dict") else None
    ema_state = None if ema is None else ema.state_dict()
    save_checkpoint(
        policy.path, model=model, optimizers=optimizers, loader=loader, state=state, config=policy.config, hook_state=hook_state, ema_state=ema_state
    )


def _eta(step: int, elapsed: float, cfg: TrainConfig) -> float:
    per_step = elapsed / max(step, 1)
    remaining = math.inf
    if cfg.max_steps is not None:
        remaining = (cfg.max_steps - step) * per_step
    if cfg.time_budget is not None:
        remaining = min(remaining, max(cfg.time_budget - elapsed, 0.0))
    return remaining

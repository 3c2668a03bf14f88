"""`loopgolf bench train`: training throughput and model FLOPs utilisation.

The benchmark runs the real trainer (loader, micro-steps, optimizers, logging) on synthetic tokens,
first for a few warm-up steps (allocations, compilation), then for the measured steps, and
reports tokens/s, step time, memory and MFU:

    MFU = model FLOPs per token x tokens/s / peak FLOP/s

Model FLOPs per token are 3 x the forward FLOPs the depth plan executes (forward + backward,
``loopgolf.model.gpt.forward_flops_per_token``); optimizer work (Muon's Newton-Schulz) and
elementwise operations are not model FLOPs. The peak is measured in the same process on the same
device: large float32 matmuls on CPU (training runs in float32 there), bf16 matmuls on CUDA
(training runs under bf16 autocast). Progressive recurrence is switched off so the full plan runs.
"""

from __future__ import annotations

import json
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopgolf.config import TrainConfig, get_preset
from loopgolf.data.shards import TokenLoader, write_shard
from loopgolf.device import matmul_peak, resolve_device
from loopgolf.model.gpt import GPT, ModelConfig, forward_flops_per_token
from loopgolf.train.trainer import train
from loopgolf.util import read_jsonl

# Synthetic shards wrap around, so they need not hold every step's tokens.
MAX_SHARD_TOKENS = 4_000_000


def _synthetic_shard(directory: Path, cfg: TrainConfig, vocab_size: int, steps: int) -> Path:
    tokens = min(cfg.batch_tokens * steps + 1, MAX_SHARD_TOKENS)
    tokens = max(tokens, cfg.batch_tokens + 1)
    path = directory / "fineweb_train_000000.bin"
    write_shard(path, np.random.default_rng(0).integers(0, vocab_size, size=tokens, dtype=np.int64), vocab_size=vocab_size)
    return path


def _memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    # ru_maxrss is in KiB on Linux: the process's peak resident memory so far.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"


def bench_train(
    preset: str = "cpu",
    *,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    steps: int = 10,
    warmup: int = 3,
    device: str | None = None,
    peak_size: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Measure training throughput and MFU for a preset (with overrides) on synthetic tokens.
    ``threads`` sets torch's CPU thread count for the training and the peak alike."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    p = get_preset(preset)
    model_cfg = ModelConfig.from_dict({**p.model.to_dict(), **(model_overrides or {})})
    train_cfg = TrainConfig(**{**asdict(p.train), **(train_overrides or {})})
    dev = resolve_device(device or train_cfg.device)
    # Full depth, step budget only, no validation. On CUDA a log record is a host sync: keep them
    # to the first and last step; on CPU they are free and give per-step times.
    log_every = 1 if dev.type == "cpu" else max(steps, 1)
    train_cfg = replace(train_cfg, recurrence_stages=[], max_steps=steps, time_budget=None, val_every=0, log_every=log_every, device=str(dev))

    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg).to(dev)
    with tempfile.TemporaryDirectory(prefix="loopgolf-bench-") as tmp:
        shard = _synthetic_shard(Path(tmp), train_cfg, model_cfg.vocab_size, steps + warmup)
        loader = TokenLoader([shard], train_cfg.seq_len, seed=0)
        if warmup:
            train(model, loader, replace(train_cfg, max_steps=warmup), device=dev, tied_embeddings=model_cfg.tie_embeddings, progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        log_path = Path(tmp) / "train_records.jsonl"
        cpu0 = time.process_time()
        result = train(
            model, loader, replace(train_cfg, max_steps=steps), device=dev, tied_embeddings=model_cfg.tie_embeddings, log_path=log_path, progress=False
        )
        cpu_seconds = time.process_time() - cpu0
        records = [r for r in read_jsonl(log_path) if r.get("event") == "train"]
    memory, memory_kind = _memory_bytes(dev)
    peak = matmul_peak(dev, size=peak_size)

    step_seconds = result.train_seconds / result.steps
    elapsed = [0.0] + [r["elapsed"] for r in records]
    steps_at = [0] + [r["step"] for r in records]
    per_step = [(b - a) / (sb - sa) for a, b, sa, sb in zip(elapsed, elapsed[1:], steps_at, steps_at[1:]) if sb > sa]
    flops_per_token = 3 * forward_flops_per_token(model_cfg, train_cfg.seq_len)
    tokens_per_second = result.tokens_per_second
    achieved = flops_per_token * tokens_per_second
    cpu_side: dict[str, Any] = {}
    if dev.type == "cpu":
        # On a machine shared with other work, wall-clock rates fall with the load. FLOPs per
        # second of this process's CPU time, here and for the peak, do much less (exactly so
        # with one thread): their ratio estimates the MFU an unshared machine would see.
        cpu_side = {
            "cpu_seconds_per_step": cpu_seconds / result.steps,
            "peak_cpu_time_flops": peak.cpu_time_flops,
            "mfu_cpu_time": flops_per_token * train_cfg.batch_tokens * result.steps / max(cpu_seconds, 1e-9) / peak.cpu_time_flops,
        }
    return {
        "preset": p.name,
        "plan": model.plan.describe(),
        "virtual_layers": model.plan.num_virtual,
        "model_dim": model_cfg.model_dim,
        "seq_len": train_cfg.seq_len,
        "batch_tokens": train_cfg.batch_tokens,
        "micro_batch_tokens": train_cfg.micro_batch_tokens,
        "compile": train_cfg.compile,
        "steps": result.steps,
        "warmup_steps": warmup,
        "tokens_per_second": tokens_per_second,
        "step_seconds": step_seconds,
        "step_seconds_median": statistics.median(per_step) if per_step else step_seconds,
        "model_flops_per_token": flops_per_token,
        "achieved_flops": achieved,
        "peak_flops": peak.flops,
        "peak_dtype": peak.dtype,
        "peak_matmul_size": peak.size,
        "mfu": achieved / peak.flops,
        "memory_bytes": memory,
        "memory_kind": memory_kind,
        **cpu_side,
        "final_train_loss": result.final_train_loss,
        "device": str(dev) if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})",
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }


def format_bench(r: dict[str, Any]) -> str:
    rows = [
        ("preset / plan", f"{r['preset']} / {r['plan']}"),
        ("batch", f"{r['batch_tokens']:,} tokens/step, seq {r['seq_len']}" + (", compiled" if r["compile"] else "")),
        ("steps (after warm-up)", f"{r['steps']} (+{r['warmup_steps']})"),
        ("step time mean / median", f"{r['step_seconds'] * 1e3:.1f} ms / {r['step_seconds_median'] * 1e3:.1f} ms"),
        ("tokens per second", f"{r['tokens_per_second']:,.0f}"),
        ("model FLOPs per token", f"{r['model_flops_per_token']:,} (3 x forward, from the plan)"),
        ("achieved model FLOP/s", f"{r['achieved_flops'] / 1e9:,.1f} G"),
        ("measured peak", f"{r['peak_flops'] / 1e9:,.1f} GFLOP/s ({r['peak_dtype']} {r['peak_matmul_size']}^3 matmul)"),
        ("MFU", f"{100 * r['mfu']:.1f}%" + (f" (by CPU time: {100 * r['mfu_cpu_time']:.1f}%)" if "mfu_cpu_time" in r else "")),
        ("memory", f"{r['memory_bytes'] / 2**20:,.0f} MiB ({r['memory_kind']})"),
        ("device", f"{r['device']}, {r['threads']} threads"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def bench_json(r: dict[str, Any]) -> str:
    """One line, so scripts can take the last line of the output."""
    return json.dumps(r)

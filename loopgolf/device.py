"""The torch device a command runs on (``auto``: CUDA when present, ``cpu`` or ``cuda[:N]``), and
its measured matmul peak (what MFU and step-time estimates divide by)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available on this machine")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda[:N]")
    return torch.device(name)


@dataclass
class Peak:
    flops: float  # FLOP/s of the best timed batch of matmuls
    dtype: str
    size: int  # n of the n x n matmuls
    cpu_time_flops: float | None = None  # CPU only: FLOPs per second of process CPU time (all threads)


def matmul_peak(device: torch.device, size: int | None = None, reps: int = 4, trials: int = 5) -> Peak:
    """Best observed n x n matmul throughput: float32 on CPU, bf16 on CUDA (the dtypes training
    computes in)."""
    cuda = device.type == "cuda"
    n = size or (8192 if cuda else 2048)
    if n < 1:
        raise ValueError(f"peak matmul size must be positive, got {n}")
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    torch.mm(a, b, out=out)  # first call: library initialisation, not throughput
    sync()
    best = best_cpu = float("inf")
    for _ in range(trials):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        sync()
        best = min(best, (time.perf_counter() - t0) / reps)
        best_cpu = min(best_cpu, (time.process_time() - c0) / reps)
    flops = 2 * n**3
    return Peak(flops=flops / best, dtype=str(dtype).removeprefix("torch."), size=n, cpu_time_flops=None if cuda else flops / max(best_cpu, 1e-9))

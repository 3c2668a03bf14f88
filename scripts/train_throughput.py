"""Training throughput and MFU of several presets (the `loopgolf bench train` measurement, in a
table). Default: the `cpu` preset on CPU; on a GPU the official 9 x 512 baseline (seq 1024,
524,288 tokens/step), compiled, for comparison with the published baseline's per-GPU rate
(13,780 steps of 524,288 tokens in 600 s on 8 x H100: about 12M tokens/s, 1.5M per GPU; the
baseline record's README in openai/parameter-golf, docs/background.md).

    python scripts/train_throughput.py [--presets cpu,cpu-cycle] [--steps 10] [--warmup 3] [--compile] [--json]
"""

from __future__ import annotations

import argparse
import json

import torch

from loopgolf.bench.train import bench_train

BASELINE_TOKENS_PER_SECOND_PER_GPU = 524_288 / 0.0435 / 8  # 13,780 steps at 43.5 ms on 8 x H100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", help="comma-separated presets (default: cpu on CPU, baseline on CUDA)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile (inductor)")
    ap.add_argument("--micro-batch-tokens", type=int, help="gradient accumulation micro-batch (tokens per forward)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 gives steadier numbers on a shared machine")
    ap.add_argument("--json", action="store_true", help="one JSON line per preset")
    args = ap.parse_args()
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    presets = args.presets.split(",") if args.presets else (["baseline"] if cuda else ["cpu"])
    overrides = {"compile": True} if args.compile else {}
    if args.micro_batch_tokens:
        overrides["micro_batch_tokens"] = args.micro_batch_tokens
    rows = []
    for name in presets:
        r = bench_train(name, train_overrides=overrides, steps=args.steps, warmup=args.warmup, device=args.device, threads=args.threads)
        rows.append(r)
        if args.json:
            print(json.dumps(r), flush=True)
    if args.json:
        return
    # MFU by CPU time (CPU only): this process's FLOPs per CPU-second against the peak's, which a
    # shared machine disturbs much less than wall-clock rates.
    print(f"{'preset':<16} {'tok/s':>12} {'step ms':>9} {'GFLOP/s':>9} {'peak':>9} {'MFU':>6} {'by CPU t':>9} {'mem MiB':>8}  device")
    for r in rows:
        by_cpu = f"{100 * r['mfu_cpu_time']:>8.1f}%" if "mfu_cpu_time" in r else f"{'-':>9}"
        print(
            f"{r['preset']:<16} {r['tokens_per_second']:>12,.0f} {r['step_seconds'] * 1e3:>9.1f} {r['achieved_flops'] / 1e9:>9.1f} "
            f"{r['peak_flops'] / 1e9:>9.0f} {100 * r['mfu']:>5.1f}% {by_cpu} {r['memory_bytes'] / 2**20:>8,.0f}  {r['device']}"
        )
        if cuda:
            print(f"{'':<16} {r['tokens_per_second'] / BASELINE_TOKENS_PER_SECOND_PER_GPU:>11.2f}x the official baseline's per-GPU rate")


if __name__ == "__main__":
    main()

"""LoRA overhead per virtual layer against its FLOPs.

For a CYCLE model at fixed width, time a training step (forward + backward) with per-virtual-layer
LoRA on every projection at ranks 0 (strict sharing), 4, 16 and 64, and compare the measured
extra time with the extra FLOPs the plan predicts. The adapters run as two thin matmuls
(x @ A) @ B and never materialise W + BA, so their cost should track their FLOPs; thin matmuls
are less efficient than the big shared ones, so the time overhead is expected to exceed the FLOP
overhead somewhat.

    python scripts/lora_overhead.py [--width 256] [--plan cycle:2x3] [--seq 128] [--batch 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from loopgolf.model.gpt import GPT, LORA_TARGETS, ModelConfig, forward_flops_per_token
from loopgolf.model.plan import parse_plan


def step_seconds(model: GPT, x: torch.Tensor, reps: int) -> float:
    times = []
    for i in range(reps + 2):
        t0 = time.perf_counter()
        loss = model(x, x)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--plan", default="cycle:2x3")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ranks", default="0,4,16,64")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    heads = args.width // 64
    x = torch.randint(0, 1024, (args.batch, args.seq))
    rows = []
    for rank in (int(r) for r in args.ranks.split(",")):
        lora = dict.fromkeys(LORA_TARGETS, rank) if rank else {}
        cfg = ModelConfig(
            model_dim=args.width, num_heads=heads, num_kv_heads=max(1, heads // 2), plan=parse_plan(args.plan), per_layer_controls=True, lora_ranks=lora
        )
        rows.append({"rank": rank, "seconds": step_seconds(GPT(cfg), x, args.reps), "flops": 3 * forward_flops_per_token(cfg, args.seq) * x.numel()})
    base = rows[0]
    v = parse_plan(args.plan)
    for r in rows:
        r["time_overhead"] = r["seconds"] / base["seconds"] - 1
        r["flop_overhead"] = r["flops"] / base["flops"] - 1
        r["tokens_per_second"] = x.numel() / r["seconds"]
    if args.json:
        print(json.dumps({"plan": args.plan, "width": args.width, "seq": args.seq, "batch": args.batch, "rows": rows}))
        return
    print(f"plan {args.plan} ({v.kind}), width {args.width}, {x.numel()} tokens/step, LoRA on {', '.join(LORA_TARGETS)} of every virtual layer")
    print(f"{'rank':>5} {'step s':>8} {'tok/s':>9} {'time +%':>8} {'FLOPs +%':>9}")
    for r in rows:
        print(f"{r['rank']:>5} {r['seconds']:>8.3f} {r['tokens_per_second']:>9,.0f} {100 * r['time_overhead']:>7.1f}% {100 * r['flop_overhead']:>8.1f}%")


if __name__ == "__main__":
    main()

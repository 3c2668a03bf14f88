"""Recursion overhead: training step time against virtual depth.

A CYCLE plan with one stored block run V times (cycle:1xV) executes the same matrices as a
vanilla stack of V layers, so its step time should grow linearly with V and match the vanilla
stack's: sharing weights should cost no time. For V = 1..8 at a fixed width this measures the
full trainer step (loader, forward, backward, optimizers) of both and reports

- the step time of cycle:1xV and of vanilla:V, and their ratio (the cost of sharing);
- a least-squares line t(V) = a + b V through the cycle times, and each point's deviation from it
  (proportional to depth within 10% means every deviation is under 10%);
- model FLOPs per token and MFU per point.

    python scripts/recursion_overhead.py [--preset cpu] [--depths 1,2,3,4,5,6,7,8] [--steps 6] [--threads 1] [--json]
    python scripts/recursion_overhead.py --preset baseline --compile   # one GPU (the preset runs 65,536 tokens per forward)
"""

from __future__ import annotations

import argparse
import json

from loopgolf.bench.train import bench_train
from loopgolf.model.plan import parse_plan


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", help="width, heads, batch and sequence come from this preset (default cpu)")
    ap.add_argument("--depths", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--micro-batch-tokens", type=int, help="gradient accumulation micro-batch (e.g. 65536 for the baseline on one GPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 gives steadier numbers on a shared machine")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    depths = [int(v) for v in args.depths.split(",")]
    train: dict = {"compile": True} if args.compile else {}
    if args.micro_batch_tokens:
        train["micro_batch_tokens"] = args.micro_batch_tokens
    rows = []
    for v in depths:
        row = {"virtual_layers": v}
        for kind, plan in (("cycle", f"cycle:1x{v}"), ("vanilla", f"vanilla:{v}")):
            r = bench_train(
                args.preset,
                model_overrides={"plan": parse_plan(plan).to_dict()},
                train_overrides=train,
                steps=args.steps,
                warmup=args.warmup,
                device=args.device,
                threads=args.threads,
            )
            row[f"{kind}_step_seconds"] = r["step_seconds_median"]
            row[f"{kind}_mfu"] = r["mfu"]
            row["model_flops_per_token"] = r["model_flops_per_token"]
            row["device"] = r["device"]
        rows.append(row)
    a, b = fit_line([float(r["virtual_layers"]) for r in rows], [r["cycle_step_seconds"] for r in rows])
    for r in rows:
        fitted = a + b * r["virtual_layers"]
        r["fit_deviation"] = r["cycle_step_seconds"] / fitted - 1
        r["cycle_over_vanilla"] = r["cycle_step_seconds"] / r["vanilla_step_seconds"]
        r["seconds_per_virtual_layer"] = r["cycle_step_seconds"] / r["virtual_layers"]
    if args.json:
        print(json.dumps({"fit": {"intercept_seconds": a, "seconds_per_layer": b}, "rows": rows}))
        return
    print(f"preset {args.preset}, median step time over {args.steps} steps after {args.warmup} warm-up, {rows[0]['device']}")
    print(f"{'V':>3} {'cycle ms':>9} {'vanilla ms':>11} {'cycle/van':>10} {'fit dev':>8} {'ms/layer':>9} {'MFU':>6}")
    for r in rows:
        print(
            f"{r['virtual_layers']:>3} {r['cycle_step_seconds'] * 1e3:>9.1f} {r['vanilla_step_seconds'] * 1e3:>11.1f} "
            f"{r['cycle_over_vanilla']:>10.3f} {100 * r['fit_deviation']:>7.1f}% {r['seconds_per_virtual_layer'] * 1e3:>9.1f} {100 * r['cycle_mfu']:>5.1f}%"
        )
    print(f"fit: t(V) = {a * 1e3:.1f} ms + {b * 1e3:.1f} ms x V; largest deviation {100 * max(abs(r['fit_deviation']) for r in rows):.1f}%")


if __name__ == "__main__":
    main()

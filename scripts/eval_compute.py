"""The evaluation-compute benchmark of docs/results/eval-compute.md: what loops and score-first
test-time training buy at evaluation, and what they cost in evaluation seconds.

    taskset -c 0 python scripts/eval_compute.py --corpus embedded DEFAULT_RUN FIXED_B3_RUN SAMPLED_B3_RUN... \\
        --corpus man-pages DEFAULT_RUN FIXED_B3_RUN SAMPLED_B3_RUN... --json out.json [--md docs/results/eval-compute.md]

Each RUN is a finished `loopgolf run` directory: the default `cpu` model, a B = 3 recursive model
(`cpu-shared-scales`, 2 blocks x 3 loops + per-layer controls) trained at its fixed depth, and the
same trained with `--loop-sampling` (one or more distributions, read from each run's config). Every score is of the run's roundtrip artifact on
its own validation split. On the default model: non-overlapping windows, stride 64, and a grid of
TTT settings; on the recursive models: loops 1..6 (and TTT at the trained depth). Run it on one
pinned core with nothing else running: the seconds are the point.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from loopgolf.evaluate import evaluate_bpb
from loopgolf.sources.open import open_data, open_model
from loopgolf.ttt import TTTSpec, evaluate_ttt

TTT_GRID = (
    "rank=4,lr=0.003",
    "rank=8,lr=0.001",
    "rank=8,lr=0.003",
    "rank=8,lr=0.01",
    "rank=16,lr=0.003",
    "rank=8,lr=0.003,steps=2",
    "rank=8,lr=0.01,reset=doc,chunk=32",
)
LOOP_COUNTS = (1, 2, 3, 4, 5, 6)


def plain(model, ds, seq_len: int, stride: int | None = None) -> dict:
    t0 = time.perf_counter()
    with torch.inference_mode():
        r = evaluate_bpb(model, ds.val_tokens(), ds.tables, seq_len, stride=stride, batch_size=8)
    return {"val_bpb": r.val_bpb, "seconds": time.perf_counter() - t0}


def ttt(model, ds, seq_len: int, spec: str) -> dict:
    r = evaluate_ttt(model, ds.val_tokens(), ds.tables, seq_len, TTTSpec.parse(spec), batch_size=8)
    return {
        "given": spec,
        "spec": str(r.spec),
        "val_bpb": r.adapted.val_bpb,
        "without": r.base.val_bpb,
        "gain": r.gain,
        "seconds": r.seconds,
        "tokens_adapted": r.tokens_adapted,
    }


def bench_corpus(name: str, default_run: Path, fixed_run: Path, sampled_runs: list[Path]) -> dict:
    from loopgolf.rundir import RunDir

    out: dict = {"corpus": name, "runs": {"default": str(default_run), "fixed": str(fixed_run), "sampled": [str(p) for p in sampled_runs]}}
    opened = open_model(default_run)
    ds = open_data(opened, None, None)
    m, seq_len = opened.model, opened.seq_len
    print(f"[{name}] default model {default_run}", flush=True)
    out["default"] = {"non_overlapping": plain(m, ds, seq_len), "stride64": plain(m, ds, seq_len, 64), "ttt": []}
    for spec in TTT_GRID:
        out["default"]["ttt"].append(ttt(m, ds, seq_len, spec))
        print("  ttt", out["default"]["ttt"][-1], flush=True)
    out["sampled"] = []
    for key, run in [("fixed", fixed_run)] + [("sampled", p) for p in sampled_runs]:
        opened = open_model(run)
        m = opened.model
        print(f"[{name}] {key} B=3 model {run}", flush=True)
        rows = []
        for n in LOOP_COUNTS:
            m.set_loops(n)
            rows.append({"loops": n, **plain(m, ds, opened.seq_len)})
            print("  loops", rows[-1], flush=True)
        m.set_loops(None)
        entry = {"loop_sampling": RunDir(run).read_config().train.loop_sampling, "loops": rows, "ttt": ttt(m, ds, opened.seq_len, "rank=8,lr=0.003")}
        print("  ttt", entry["ttt"], flush=True)
        if key == "fixed":
            out["fixed"] = entry
        else:
            out["sampled"].append(entry)
    return out


def markdown(results: list[dict], command: str) -> str:
    lines = [
        "# Compute at evaluation: loops and score-first test-time training",
        "",
        "What spending evaluation compute buys at CPU scale, and what it costs. Every figure is the",
        "roundtrip (int8 artifact) val_bpb on the run's own validation split, scored on one pinned",
        "core with nothing else running; seconds are evaluation wall time (for TTT: scoring plus",
        "adapting; the no-TTT scoring it also does for the gain is timed apart). How TTT and loops",
        "work: [../evaluation.md](../evaluation.md#compute-at-evaluation).",
        "",
        "Made by:",
        "",
        "```",
        command,
        "```",
        "",
    ]
    for r in results:
        d = r["default"]
        base = d["non_overlapping"]
        lines += [
            f"## {r['corpus']}",
            "",
            f"Runs: default `{r['runs']['default']}`, fixed B = 3 `{r['runs']['fixed']}`, depth-sampled B = 3 "
            + ", ".join(f"`{p}`" for p in r["runs"]["sampled"])
            + ".",
            "",
            "### Default `cpu` model (4 x 256 vanilla, 250 steps)",
            "",
            "| evaluation | val_bpb | vs non-overlapping | eval seconds |",
            "|---|---:|---:|---:|",
            f"| non-overlapping windows | {base['val_bpb']:.4f} | | {base['seconds']:.1f} |",
            f"| stride 64 | {d['stride64']['val_bpb']:.4f} | {d['stride64']['val_bpb'] - base['val_bpb']:+.4f} | {d['stride64']['seconds']:.1f} |",
        ]
        for t in d["ttt"]:
            lines.append(
                f"| TTT `{t['given']}` | {t['val_bpb']:.4f} | {t['val_bpb'] - base['val_bpb']:+.4f} (vs its own no-TTT {t['without']:.4f}: {-t['gain']:+.4f}) | {t['seconds']:.1f} |"
            )
        lines += [
            "",
            "### B = 3 recursive model (`cpu-shared-scales`, 300 steps): loops at evaluation",
            "",
            "| loops | fixed depth: val_bpb | " + " | ".join(f"sampled `{e['loop_sampling']}`: val_bpb" for e in r["sampled"]) + " | eval s (fixed) |",
            "|---:|---:|" + "---:|" * len(r["sampled"]) + "---:|",
        ]
        for i, a in enumerate(r["fixed"]["loops"]):
            mark = " (trained)" if a["loops"] == 3 else ""
            cells = " | ".join(f"{e['loops'][i]['val_bpb']:.4f}" for e in r["sampled"])
            lines.append(f"| {a['loops']}{mark} | {a['val_bpb']:.4f} | {cells} | {a['seconds']:.1f} |")
        for e in [r["fixed"], *r["sampled"]]:
            t = e["ttt"]
            what = "fixed-depth" if e["loop_sampling"] is None else f"`{e['loop_sampling']}`"
            lines.append("")
            lines.append(
                f"TTT `{t['given']}` on the {what} model at 3 loops: {t['without']:.4f} -> {t['val_bpb']:.4f} ({-t['gain']:+.4f}), {t['seconds']:.1f} s."
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", nargs="+", action="append", metavar="NAME DEFAULT_RUN FIXED_RUN SAMPLED_RUN", required=True)
    ap.add_argument("--json", required=True, help="raw results")
    ap.add_argument("--md", help="write the results page here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for c in args.corpus:
        if len(c) < 4:
            ap.error(f"--corpus takes NAME DEFAULT_RUN FIXED_RUN SAMPLED_RUN..., got {c}")
    results = [bench_corpus(name, Path(a), Path(b), [Path(p) for p in rest]) for name, a, b, *rest in args.corpus]
    Path(args.json).write_text(json.dumps(results, indent=1))
    if args.md:
        command = (
            "taskset -c 0 python scripts/eval_compute.py " + " ".join(f"--corpus {' '.join(c)}" for c in args.corpus) + f" --json {args.json} --md {args.md}"
        )
        Path(args.md).write_text(markdown(results, command))


if __name__ == "__main__":
    main()

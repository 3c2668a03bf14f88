"""`loopgolf sweep` (a ledger's variants x seeds as run directories, resumable and parallel),
`loopgolf runs` (query the results store, or add runs to it) and `loopgolf report` (a ledger's
runs -> a markdown report with significance tests and plots). The work lives in
:mod:`loopgolf.lab`."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
from pathlib import Path

DESCRIPTION: dict[str, str] = {}
DEFAULT_STORE = Path("runs") / "loopgolf.sqlite"
DEFAULT_COLUMNS = ("ledger", "variant", "seed", "status", "val_bpb_post", "artifact_bytes", "unique_params", "steps", "tokens_per_second", "run_dir")


def store_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get("LOOPGOLF_STORE") or DEFAULT_STORE)


def _list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _seeds(text: str | None) -> list[int] | None:
    items = _list(text)
    if items is None:
        return None
    try:
        seeds = [int(s) for s in items]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, got {text!r}") from None
    from loopgolf.config import MAX_SEED

    if any(s < 0 or s > MAX_SEED for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct integers from 0 to 2**63 - 1, got {text!r:.80}")
    return seeds


def cmd_sweep(args: argparse.Namespace) -> int:
    from loopgolf.lab.ledger import load_ledger, resolve
    from loopgolf.lab.sweep import plan_runs, run_sweep

    ledger = load_ledger(args.ledger)
    out = Path(args.out) if args.out else Path("runs") / "sweeps" / ledger.name
    variants, seeds = _list(args.variants), _seeds(args.seeds)
    if args.list:
        for r in plan_runs(ledger, out, data=args.data, variants=variants, seeds=seeds, device=args.device):
            rv = resolve(ledger, ledger.variant(r.variant))
            budget = f"{rv.max_steps} steps" if rv.max_steps is not None else f"{rv.time_budget:g} s"
            print(f"{'done' if r.finished else 'todo'}  {r.variant:16s} seed {r.seed:<4d} {budget:>12s}  {r.out}")
        return 0
    res = run_sweep(
        ledger,
        out,
        store_path(args.store),
        jobs=args.jobs,
        threads=args.threads,
        data=args.data,
        variants=variants,
        seeds=seeds,
        device=args.device,
        progress=not args.quiet,
    )
    for run_dir, why in res.elsewhere:
        print(f"{why}: {run_dir} (another process holds or finished it; not run here)", file=sys.stderr)
    for run_dir, tail in res.failed:
        print(f"failed: {run_dir} (see {run_dir}/sweep.log)\n  " + tail.replace("\n", "\n  "), file=sys.stderr)
    return 1 if res.failed else 0


def cmd_runs(args: argparse.Namespace) -> int:
    from loopgolf.lab.store import Store

    if args.runs_command == "add":
        with Store(store_path(args.store)) as store:
            for row in store.add_all([Path(d) for d in args.run_dirs], ledger=args.ledger, variant=args.variant):
                print(f"added {row.run_dir} (ledger {row.ledger}, variant {row.variant}, seed {row.seed})")
        return 0
    with Store(store_path(args.store), readonly=True) as store:
        where = []
        for item in args.where:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--where takes KEY=VALUE, got {item!r}")
            where.append((key, value))
        rows = store.query(ledger=args.ledger, where=where, sort=args.sort)
    columns = _list(args.columns) or list(DEFAULT_COLUMNS)
    table = [[_cell(r.value(c)) for c in columns] for r in rows]
    if args.csv:
        w = csv.writer(sys.stdout)
        w.writerow(columns)
        w.writerows(table)
        return 0
    if not rows:
        print("no runs match")
        return 0
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    return 0


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def cmd_report(args: argparse.Namespace) -> int:
    from loopgolf.lab.frontier import is_frontier
    from loopgolf.lab.ledger import load_ledger
    from loopgolf.lab.report import write_report
    from loopgolf.lab.store import Store

    ledger = load_ledger(args.ledger)
    with Store(store_path(args.store), readonly=True) as store:
        rows = store.rows(args.store_ledger or ledger.name)
    command = args.command_note or ("loopgolf " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if len(sys.argv) > 1 else None)
    path = write_report(ledger, rows, Path(args.out), command=command)
    plots = "bpb_vs_bytes.png, bpb_vs_flops.png, loss_curves.png" + (", bpb_vs_cap.png" if is_frontier(ledger) else "")
    print(f"loopgolf report: {path} (+ {plots})")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from loopgolf.budget import fit_file
    from loopgolf.lab.lossfit import fit_store
    from loopgolf.lab.store import Store
    from loopgolf.lossmodel import load_fit
    from loopgolf.util import atomic_write_json

    include = [(path, load_fit(path)) for path in args.include or []]
    path = store_path(args.store)
    if include and args.store is None and not path.exists():
        rows = []  # only the included files' runs: no store named, and none at the default path
    else:
        with Store(path, readonly=True) as store:
            rows = store.rows(args.ledger) if args.ledger else store.rows()
    result, tokens_from = fit_store(rows, args.data, args.quant, args.unique_tokens, include)
    out = Path(args.out) if args.out else fit_file(args.data, args.quant)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result.to_dict())
    if args.json:
        print(json.dumps({**result.to_dict(), "path": str(out), "unique_tokens_from": tokens_from}, indent=2))
        return 0
    p = result.params
    if p.get("R_star") is not None:
        data = f"D' (D repeated: U = {result.unique_tokens:,.0f} unique tokens ({tokens_from}), R* = {p['R_star']:.3g} repeats)"
    elif result.unique_tokens:
        data = f"D (no run went past the {result.unique_tokens:,.0f} unique tokens: no repetition term)"
    else:
        data = f"D (unique tokens unknown: {tokens_from}; no repetition term; give --unique-tokens)"
    if p.get("C") is None:
        one_layer = "no term (the runs are not both one-layer and deeper models, or a run's layer count is unknown)"
    else:
        one_layer = f"+ {p['C']:.4f} bpb (C) for a model of one virtual layer"
    print(
        f"loopgolf fit: {out}\n  dataset {result.dataset}, quant {result.quant or 'int8'}, {len(result.runs)} runs\n"
        f"  val_bpb = {p['E']:.4f} + {p['A']:.4g} / P^{p['alpha']:.3f} + {p['B']:.4g} / D^{p['beta']:.3f},  "
        f"P = N^{1 - p['gamma']:.3f} x M^{p['gamma']:.3f}  (N stored, M effective params)\n"
        f"  tokens: {data}\n"
        f"  one-layer models: {one_layer}\n"
        f"  in-fit RMSE {result.rmse:.4f}; left-out error: mean {result.loo_mae:.4f}, max {result.loo_max:.4f} bpb"
    )
    for r in sorted(result.runs, key=lambda r: -abs(r["bpb"] - r["left_out_predicted"]))[:5]:
        print(f"  worst left out: {r['name']}: {r['bpb']:.4f} measured, {r['left_out_predicted']:.4f} predicted without it")
    return 0


def register(name: str, p: argparse.ArgumentParser) -> None:
    store_help = f"results store (default $LOOPGOLF_STORE or {DEFAULT_STORE.as_posix()})"
    if name == "sweep":
        _sweep(p, store_help)
    elif name == "runs":
        _runs(p, store_help)
    elif name == "fit":
        _fit(p, store_help)
    else:
        _report(p, store_help)


def _fit(p: argparse.ArgumentParser, store_help: str) -> None:
    from loopgolf.commands.args import positive_float
    from loopgolf.data.default_corpus import DEFAULT_DATA_NAME

    p.description = (
        "Fit val_bpb = E + A / P^alpha + B / D'^beta (+ C for one-layer models), P = N^(1-gamma) M^gamma (N stored and M "
        "effective parameters, D' the training tokens with repeated ones counted for less, as in data-constrained scaling) "
        "on the finished runs of one "
        "dataset in the results store (roundtrip bpb, one quantization policy), and save "
        "it as JSON with each run's residual and the error on runs left out of the fit; `loopgolf budget --time S` predicts "
        "with it. Needs scipy (the lab extra)."
    )
    p.add_argument("--store", help=store_help)
    p.add_argument("--data", default=DEFAULT_DATA_NAME, help="the dataset's name as runs record it (default: the embedded corpus)")
    p.add_argument("--quant", default="", help="the runs' quantization policy (default: the int8 baseline)")
    p.add_argument("--ledger", help="only runs of this ledger (default: every run of the dataset)")
    p.add_argument(
        "--unique-tokens",
        type=positive_float,
        help="the dataset's training tokens, for the repetition term (default: from the manifest in the runs' data directory)",
    )
    p.add_argument(
        "--include",
        action="append",
        metavar="FIT",
        help="an earlier fit file (same dataset and quant) whose runs join the store's; repeatable. Without --store and "
        "with no store at the default path, the fit is of the included runs alone",
    )
    p.add_argument("--out", help="fit file (default: the loopgolf cache's fits/<dataset>.json, where budget looks)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fit)


def _sweep(p: argparse.ArgumentParser, store_help: str) -> None:
    from loopgolf.lab.ledger import builtin_ledgers

    p.description = (
        f"Run every (variant, seed) of LEDGER (a TOML file or a built-in name: {', '.join(sorted(builtin_ledgers()))}) as a normal "
        "run directory OUT/<variant>/seed<N>. Finished runs are skipped; failed or killed ones are redone. Runs go in "
        "parallel worker processes, each pinned to its own cores, never more jobs x threads than cores."
    )
    p.add_argument("ledger", metavar="LEDGER")
    p.add_argument("--out", help="sweep directory (default runs/sweeps/<ledger name>)")
    p.add_argument("--store", help=store_help)
    p.add_argument("--data", help="dataset directory for every run (default: the ledger's data, usually the embedded corpus)")
    p.add_argument("--jobs", type=int, help="parallel runs (default: cores // threads; 1 on CUDA)")
    p.add_argument("--threads", type=int, default=1, help="threads (cores) per run (default 1)")
    p.add_argument("--variants", help="comma-separated variants to run (default: all)")
    p.add_argument("--seeds", help="comma-separated seeds, replacing the ledger's (e.g. 1,2,3 for the best variants)")
    p.add_argument("--device", help="cpu, cuda, ... (default: each run's default)")
    p.add_argument("--list", action="store_true", help="list the runs and whether each is done; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)


def _runs(r: argparse.ArgumentParser, store_help: str) -> None:
    r.add_argument("--store", help=store_help)
    r.add_argument("--ledger", help="only this ledger's runs (with `add`: the ledger to file them under)")
    r.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep rows whose field equals VALUE (a column, summary key or dotted config path); repeatable",
    )
    r.add_argument("--sort", help="sort by this field (--sort=-KEY for descending)")
    r.add_argument("--columns", help=f"comma-separated fields to show (default {','.join(DEFAULT_COLUMNS)})")
    r.add_argument("--csv", action="store_true", help="CSV on stdout")
    rsub = r.add_subparsers(dest="runs_command", metavar="add")
    a = rsub.add_parser("add", help="add finished run directories to the store")
    a.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    a.add_argument("--ledger", default=argparse.SUPPRESS, help="the ledger to file them under")
    a.add_argument("--store", default=argparse.SUPPRESS, help=store_help)
    a.add_argument("--variant", help="variant name to file them under (default: the run's preset)")
    r.set_defaults(func=cmd_runs)


def _report(q: argparse.ArgumentParser, store_help: str) -> None:
    q.add_argument("ledger", metavar="LEDGER")
    q.add_argument("--out", required=True, help="report directory (report.md and the PNGs)")
    q.add_argument("--store", help=store_help)
    q.add_argument("--store-ledger", help="read the store's runs filed under this name (default: the ledger's name)")
    q.add_argument("--command-note", help="the command to print in the report (default: this one)")
    q.set_defaults(func=cmd_report)

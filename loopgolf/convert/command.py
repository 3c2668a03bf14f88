"""`loopgolf convert`: a source model -> a recursive (relaxed) model in a directory that
`loopgolf train --init-from DIR` (or `run --init-from`) uptrains. (The parser is in cli.py, so
that a plain `loopgolf run` loads none of loopgolf.convert.)

The directory holds ``config.json`` (the model config and how it was made), ``checkpoint.pt``
(weights only, in the verified checkpoint format) and ``convert.json`` (the per-layer report).
Everything is computed before anything is written, so a failed conversion leaves ``--out`` as
it was.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loopgolf.util import atomic_write_json


def cmd_convert(args: argparse.Namespace) -> int:
    from loopgolf.convert.recursive import convert
    from loopgolf.sources.load import as_vanilla, load_source
    from loopgolf.model.plan import parse_plan
    from loopgolf.train.checkpoint import CHECKPOINT_NAME, save_weights

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ValueError(f"--out {out} exists and is not empty (pass --force to overwrite)")
    if args.lora_rank is not None and args.lora_ranks is not None:
        raise ValueError("give --lora-rank or --lora-ranks, not both")
    plan = parse_plan(args.plan)
    source = as_vanilla(load_source(args.source))
    if args.lora_ranks is not None:
        ranks = args.lora_ranks
    elif args.lora_rank:
        ranks = {t: args.lora_rank for t in source.config.projections}
    else:
        ranks = {}
    controls = {"per-layer": True, "shared": False, "auto": None}[args.controls]
    cfg, state, report = convert(source.config, source.state, plan, args.init, ranks, per_layer_controls=controls,
                                 lora_alpha=args.lora_alpha, seed=args.seed)
    made = {"source": str(source.path), "origin": source.origin, "plan": args.plan, "init": args.init, "lora_ranks": ranks,
            "lora_alpha": args.lora_alpha, "per_layer_controls": cfg.per_layer_controls, "seed": args.seed}
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("config.json", CHECKPOINT_NAME, "convert.json"):
        (out / stale).unlink(missing_ok=True)
    save_weights(out / CHECKPOINT_NAME, state, {"model": cfg.to_dict()})
    atomic_write_json(out / "convert.json", {**made, **report.to_dict()})
    atomic_write_json(out / "config.json", {"model": cfg.to_dict(), "convert": made})  # last: a directory with it is complete
    if args.json:
        print(json.dumps({**made, **report.to_dict(), "out": str(out)}, indent=2))
    else:
        print(f"loopgolf convert: {source.origin} {source.path} -> {cfg.depth_plan.describe()}")
        print(report.format())
        print(f"  wrote {out}/config.json, {CHECKPOINT_NAME}, convert.json; next: loopgolf train --init-from {out} [--distill-from {source.path}]")
    return 0

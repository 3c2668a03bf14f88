"""`loopgolf convert`: a source model -> a recursive (relaxed) model in a directory that
`loopgolf train --init-from DIR` (or `run --init-from`) uptrains and `loopgolf eval DIR` scores.

The directory holds ``config.json`` (the model config and how it was made), ``checkpoint.pt``
(weights only, in the verified checkpoint format) and ``convert.json`` (the per-layer report),
written by :meth:`loopgolf.rundir.RunDir.write_convert`. Everything is computed before anything is
written, so a failed conversion leaves ``--out`` as it was.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loopgolf.commands.args import lora_ranks, non_negative_int

DESCRIPTION = {
    "convert": "Convert a trained vanilla model (a loopgolf run directory or artifact, or a Hugging Face Llama/SmolLM/"
    "TinyLlama, Gemma or GPT-2 directory with safetensors) into a CYCLE or SEQUENCE recursive model, optionally "
    "relaxed by per-virtual-layer LoRA initialised from the truncated SVD of what the tying lost."
}


def check_ranks(ranks: dict[str, int], config) -> None:
    """A LoRA rank above min(in, out) of its projection stores more than the full-rank update and
    can represent nothing more: refuse it, naming the full rank."""
    for target, rank in ranks.items():
        if target not in config.projections:
            raise ValueError(f"LoRA target {target!r} is not a projection of this model ({', '.join(config.projections)})")
        full = min(config.lora_shape(target))
        if rank > full:
            raise ValueError(
                f"LoRA rank {rank} on {target!r} is above its full rank {full} (a {config.lora_shape(target)[0]} x "
                f"{config.lora_shape(target)[1]} projection): rank {full} already reproduces the source exactly"
            )


def cmd_convert(args: argparse.Namespace) -> int:
    from loopgolf.convert.recursive import INITS, as_vanilla, convert
    from loopgolf.model.plan import parse_plan
    from loopgolf.rundir import RunDir
    from loopgolf.sources.load import load_source

    assert args.init in INITS
    out = RunDir(Path(args.out))
    if out.path.exists() and not out.path.is_dir():
        raise ValueError(f"--out {out.path} is a file, not a directory")
    if not out.is_empty() and not args.force:
        raise ValueError(f"--out {out.path} exists and is not empty (pass --force to overwrite)")
    if args.lora_rank is not None and args.lora_ranks is not None:
        raise ValueError("give --lora-rank or --lora-ranks, not both")
    plan = parse_plan(args.plan)
    source = as_vanilla(load_source(args.source))
    if args.lora_ranks is not None:
        ranks = {t: r for t, r in args.lora_ranks.items() if r > 0}  # rank 0: no adapter on that projection
    elif args.lora_rank:
        ranks = dict.fromkeys(source.config.projections, args.lora_rank)
    else:
        ranks = {}  # --lora-rank 0 (or none): strict recursion, no adapters
    check_ranks(ranks, source.config)
    if not ranks and args.lora_alpha is not None:
        raise ValueError("--lora-alpha scales LoRA adapters, and this conversion has none (--lora-rank 0 or no rank given: strict recursion)")
    controls = {"per-layer": True, "shared": False, "auto": None}[args.controls]
    cfg, state, report = convert(source.config, source.state, plan, args.init, ranks, per_layer_controls=controls, lora_alpha=args.lora_alpha, seed=args.seed)
    made = {
        "source": str(source.path.resolve()),  # absolute: `eval DIR` follows it from any working directory
        "origin": source.origin,
        "plan": args.plan,
        "init": args.init,
        "lora_ranks": ranks,
        "lora_alpha": args.lora_alpha,
        "per_layer_controls": cfg.per_layer_controls,
        "seed": args.seed,
    }
    out.write_convert(cfg, state, made, report.to_dict())
    if args.json:
        print(json.dumps({**made, **report.to_dict(), "out": str(out.path)}, indent=2))
    else:
        print(f"loopgolf convert: {source.origin} {source.path} -> {cfg.depth_plan.describe()}" + ("" if ranks else " (strict: no LoRA)"))
        print(report.format())
        print(
            f"  wrote {out.path}: config.json, checkpoint.pt, convert.json; score it with `loopgolf eval {out.path} --data DIR`, "
            f"uptrain it with `loopgolf train --init-from {out.path} [--distill-from {source.path}]`"
        )
    return 0


def register(name: str, p: argparse.ArgumentParser) -> None:
    from loopgolf.convert.recursive import INITS

    p.add_argument("--from", dest="source", required=True, metavar="SOURCE", help="run directory, artifact, or Hugging Face model directory")
    p.add_argument("--plan", required=True, help="cycle:KxB or sequence:KxB with K * B = the source's layers")
    p.add_argument("--init", choices=INITS, default="stepwise", help="shared-block initialisation (default stepwise)")
    p.add_argument(
        "--lora-rank",
        type=non_negative_int,
        metavar="R",
        help="LoRA rank on every projection of the model (0: strict recursion, no LoRA; at most min(in, out) of each projection)",
    )
    p.add_argument("--lora-ranks", type=lora_ranks, metavar="RANKS", help="per-projection ranks, e.g. q=8,v=8,mlp_in=32 (0: no adapter there)")
    p.add_argument("--lora-alpha", type=float, help="LoRA scale alpha / r (default: scale 1); the SVD factors are divided by it")
    p.add_argument(
        "--controls",
        choices=("auto", "per-layer", "shared"),
        default="auto",
        help="norm gains, biases and scales per virtual layer or per stored block (auto: per layer when relaxed)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh init (Random blocks, adapter A factors)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_convert)

"""`loopgolf convert`: a source model -> a recursive (relaxed) model in a directory that
`loopgolf train --init-from DIR` (or `run --init-from`) uptrains.

The directory holds ``config.json`` (the model config and how it was made), ``checkpoint.pt``
(weights only, in the verified checkpoint format) and ``convert.json`` (the per-layer report).
Everything is computed before anything is written, so a failed conversion leaves ``--out`` as
it was.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loopgolf.util import atomic_write_json

from loopgolf.convert.recursive import INITS


def parse_ranks(text: str) -> dict[str, int]:
    """'q=8,v=8,mlp_in=32' -> {target: rank}."""
    ranks = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"expected TARGET=RANK items with ranks >= 1, got {item!r}")
        ranks[name.strip()] = int(value)
    return ranks


def cmd_convert(args: argparse.Namespace) -> int:
    from loopgolf.convert.recursive import convert
    from loopgolf.convert.sources import as_vanilla, load_source
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


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="tie a trained model's layers into a recursive one (Stepwise/Average/... init, SVD LoRA)",
        description="Convert a trained vanilla model (a loopgolf run directory or artifact, or a Hugging Face Llama/SmolLM/"
        "TinyLlama, Gemma or GPT-2 directory with safetensors) into a CYCLE or SEQUENCE recursive model, optionally "
        "relaxed by per-virtual-layer LoRA initialised from the truncated SVD of what the tying lost.",
    )
    p.add_argument("--from", dest="source", required=True, metavar="SOURCE", help="run directory, artifact, or Hugging Face model directory")
    p.add_argument("--plan", required=True, help="cycle:KxB or sequence:KxB with K * B = the source's layers")
    p.add_argument("--init", choices=INITS, default="stepwise", help="shared-block initialisation (default stepwise)")
    p.add_argument("--lora-rank", type=int, metavar="R", help="LoRA rank on every projection (0: strict recursion)")
    p.add_argument("--lora-ranks", type=parse_ranks, metavar="RANKS", help="per-projection ranks, e.g. q=8,v=8,mlp_in=32")
    p.add_argument("--lora-alpha", type=float, help="LoRA scale alpha / r (default: scale 1); the SVD factors are divided by it")
    p.add_argument("--controls", choices=("auto", "per-layer", "shared"), default="auto",
                   help="norm gains, biases and scales per virtual layer or per stored block (auto: per layer when relaxed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh init (Random blocks, adapter A factors)")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_convert)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: loopgolf convert ...")

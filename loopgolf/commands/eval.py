"""`loopgolf eval`: the official val_bpb of a model on a dataset's validation split, optionally
with early exit after each pass of a recursive plan."""

from __future__ import annotations

import argparse
import json

from loopgolf.commands.args import positive_int
from loopgolf.serve.exits import CRITERION_SYNTAX

DESCRIPTION = {
    "eval": "Score a model on a dataset's validation split with the official val_bpb. MODEL is an artifact (what a finished "
    "run scores: the int roundtrip), a run directory (its artifact, or its checkpoint before export), a `loopgolf convert` "
    "directory (the converted weights before uptraining) or a checkpoint file. --data defaults to the data the run trained on."
}


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from loopgolf.device import resolve_device
    from loopgolf.evaluate import evaluate_bpb
    from loopgolf.sources.open import open_data, open_model

    criterion = None
    if args.early_exit:
        from loopgolf.serve.exits import check_fires, parse_criterion

        if args.stride is not None:
            raise ValueError("--early-exit scores non-overlapping windows only; leave out --stride")
        criterion = parse_criterion(args.early_exit)
    opened = open_model(args.model, resolve_device(args.device or "auto"))
    if criterion is not None:
        check_fires(criterion, opened.model)
    ds = open_data(opened, args.data, args.tokenizer, verify=not args.no_verify_data)
    seq_len = args.seq_len or opened.seq_len
    where = {"model": str(args.model), "origin": opened.origin, "data": str(ds.root)}
    if opened.origin == "artifact":
        where.update(artifact=str(opened.path), artifact_file_bytes=opened.file_bytes, codec=opened.codec)
    with torch.inference_mode():
        if criterion is None:
            r = evaluate_bpb(
                opened.model,
                ds.val_tokens(),
                ds.tables,
                seq_len,
                stride=args.stride if args.stride is not None else opened.eval_stride,
                batch_size=args.batch_size,
                max_tokens=args.max_tokens,
                device=next(opened.model.parameters()).device,
                progress=not args.json,
            )
        else:
            from loopgolf.serve.scoring import evaluate_early_exit

            r = evaluate_early_exit(
                opened.model, ds.val_tokens(), ds.tables, seq_len, criterion, batch_size=args.batch_size, max_tokens=args.max_tokens, progress=not args.json
            )
    out = {**r.to_dict(), **where}
    if args.json:
        print(json.dumps(out, indent=2))
    elif criterion is None:
        print(
            f"val_bpb {r.val_bpb:.6f}  val_loss {r.val_loss:.6f}  targets {r.num_targets:,}  bytes {r.target_bytes:,}  (seq_len {r.seq_len}, stride {r.stride})"
        )
    else:
        print(
            f"val_bpb {r.val_bpb:.6f}  val_loss {r.val_loss:.6f}  early exit {r.criterion}: mean passes/token {r.mean_loops:.3f} of {r.full_loops}  "
            f"(per pass {r.loop_histogram})  targets {r.num_targets:,}  bytes {r.target_bytes:,}"
        )
    return 0


def register(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="artifact file, run directory, `loopgolf convert` directory or checkpoint")
    p.add_argument("--data", help="dataset directory with fineweb_val_*.bin (default: the data the model's run trained on)")
    p.add_argument("--tokenizer", help="SentencePiece model (default: found next to the data)")
    p.add_argument("--seq-len", type=positive_int, help="evaluation window (default: the training seq_len)")
    p.add_argument("--stride", type=positive_int, help="sliding-window stride (default: the stride the model's run scored with, else non-overlapping windows)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--no-verify-data", action="store_true", help="skip checking the validation shards against the dataset's manifest")
    p.add_argument("--max-tokens", type=positive_int, help="score only this many validation tokens (a cheaper estimate; the official score uses all)")
    p.add_argument(
        "--early-exit",
        metavar="CRITERION",
        help=f"score with early exit after each pass of a recursive plan, token by token through the KV cache: {CRITERION_SYNTAX}; "
        "reports val_bpb and the mean passes per token (non-overlapping windows)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

"""`loopgolf eval`: the official val_bpb of a model on a dataset's validation split, optionally
with early exit after each pass of a recursive plan."""

from __future__ import annotations

import argparse
import json
import time

from loopgolf.commands.args import LOOPS_HELP, TTT_HELP, int_list, positive_float, positive_int
from loopgolf.serve.exits import CRITERION_SYNTAX, EXIT_STATE_HELP, EXIT_STATES

DESCRIPTION = {
    "eval": "Score a model on a dataset's validation split with the official val_bpb. MODEL is an artifact (what a finished "
    "run scores: the int roundtrip), a run directory (its artifact, or its checkpoint before export), a `loopgolf convert` "
    "directory (the converted weights before uptraining) or a checkpoint file. --data defaults to the data the run trained on."
}


def _loop_counts(text: str) -> list[int]:
    counts = int_list(text)
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"a loop count is repeated in {text!r}")
    return counts


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from loopgolf.device import resolve_device
    from loopgolf.evaluate import evaluate_bpb
    from loopgolf.sources.open import open_data, open_model

    criterion = ttt = None
    if args.early_exit:
        from loopgolf.serve.exits import check_fires, parse_criterion

        if args.stride is not None:
            raise ValueError("--early-exit scores non-overlapping windows only; leave out --stride")
        if args.ttt:
            raise ValueError("--early-exit and --ttt cannot be combined")
        criterion = parse_criterion(args.early_exit)
    elif args.exit_state is not None:
        raise ValueError("--exit-state says what an exited token leaves behind; it needs --early-exit")
    if args.ttt:
        from loopgolf.ttt import TTTSpec, evaluate_ttt

        ttt = TTTSpec.parse(args.ttt)
    elif args.eval_time is not None:
        raise ValueError("--eval-time bounds test-time training; it needs --ttt")
    opened = open_model(args.model, resolve_device(args.device or "auto"))
    model = opened.model
    counts = args.loops or [None]
    for n in counts:  # refuse a bad count before any data is read
        model.set_loops(n)
    model.set_loops(None)
    if criterion is not None:
        check_fires(criterion, model)
    ds = open_data(opened, args.data, args.tokenizer, verify=not args.no_verify_data)
    seq_len = args.seq_len or opened.seq_len
    stride = args.stride if args.stride is not None else opened.eval_stride
    device = next(model.parameters()).device
    where = {"model": str(args.model), "origin": opened.origin, "data": str(ds.root)}
    if opened.origin == "artifact":
        where.update(artifact=str(opened.path), artifact_file_bytes=opened.file_bytes, codec=opened.codec)
    results = []
    for n in counts:
        model.set_loops(n)
        loops = {"loops": n if n is not None else model.plan.num_loops} if args.loops else {}
        if ttt is not None:
            r = evaluate_ttt(
                model, ds.val_tokens(), ds.tables, seq_len, ttt, stride=stride, batch_size=args.batch_size, max_tokens=args.max_tokens,
                device=device, eval_time=args.eval_time, progress=not args.json,
            )  # fmt: skip
            out = {**r.to_dict(), **loops}
            line = (
                f"val_bpb {r.adapted.val_bpb:.6f} with TTT, {r.base.val_bpb:.6f} without (gain {r.gain:+.6f})  eval {r.seconds:.1f}s "
                f"(without TTT {r.base_seconds:.1f}s)  tokens adapted {r.tokens_adapted:,} in {r.updates:,} steps"
                + (f", adapting stopped at token {r.adapting_stopped_at:,} (--eval-time)" if r.adapting_stopped_at is not None else "")
                + f"  targets {r.adapted.num_targets:,}  bytes {r.adapted.target_bytes:,}  [ttt {r.spec}]"
            )
        elif criterion is None:
            t0 = time.perf_counter()
            with torch.inference_mode():
                r = evaluate_bpb(
                    model, ds.val_tokens(), ds.tables, seq_len, stride=stride, batch_size=args.batch_size, max_tokens=args.max_tokens, device=device,
                    progress=not args.json,
                )  # fmt: skip
            out = {**r.to_dict(), "eval_seconds": time.perf_counter() - t0, **loops}
            line = f"val_bpb {r.val_bpb:.6f}  val_loss {r.val_loss:.6f}  targets {r.num_targets:,}  bytes {r.target_bytes:,}  (seq_len {r.seq_len}, stride {r.stride})"
        else:
            from loopgolf.serve.exits import DEFAULT_EXIT_STATE
            from loopgolf.serve.scoring import evaluate_early_exit

            t0 = time.perf_counter()
            with torch.inference_mode():
                r = evaluate_early_exit(
                    model, ds.val_tokens(), ds.tables, seq_len, criterion, exit_state=args.exit_state or DEFAULT_EXIT_STATE, batch_size=args.batch_size,
                    max_tokens=args.max_tokens, progress=not args.json,
                )  # fmt: skip
            out = {**r.to_dict(), "eval_seconds": time.perf_counter() - t0, **loops}
            line = (
                f"val_bpb {r.val_bpb:.6f}  val_loss {r.val_loss:.6f}  early exit {r.criterion} ({r.exit_state}): mean passes/token {r.mean_loops:.3f} of {r.full_loops}  "
                f"(per pass {r.loop_histogram})  targets {r.num_targets:,}  bytes {r.target_bytes:,}"
            )
        results.append({**out, **where})
        if not args.json:
            print((f"loops {loops['loops']}: " if loops else "") + line, flush=True)
    model.set_loops(None)
    if args.json:
        print(json.dumps(results if args.loops and len(results) > 1 else results[0], indent=2))
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
    p.add_argument("--exit-state", choices=EXIT_STATES, help=f"with --early-exit: {EXIT_STATE_HELP}")
    p.add_argument(
        "--loops",
        type=_loop_counts,
        metavar="N[,N...]",
        help=f"run the looped block(s) of a recursive plan N times instead of the trained count; a list scores each count ({LOOPS_HELP})",
    )
    p.add_argument("--ttt", metavar="SPEC", help=f"{TTT_HELP}; reports val_bpb with and without it")
    p.add_argument("--eval-time", type=positive_float, metavar="S", help="with --ttt: stop adapting (and keep scoring) after S seconds of evaluation")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

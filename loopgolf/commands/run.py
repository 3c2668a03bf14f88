"""`loopgolf run` (data -> train -> export -> roundtrip eval -> summary) and `loopgolf train`
(data -> train -> checkpoint)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loopgolf.commands.args import EXIT_OVER_CAP, LOOPS_HELP, TTT_HELP, add_model_overrides, kv, model_overrides, non_negative_int, positive_float, positive_int
from loopgolf.config import CODE_FORMS, LOOP_SAMPLING_SYNTAX

DESCRIPTION = {
    "run": "Train a model, export it under the byte cap and score it before and after the roundtrip. Under torchrun, trains data-parallel on every rank.",
    "train": "Train only: the options of `run`, stopping after training with DIR/checkpoint.pt. `loopgolf run --resume DIR` then exports and scores it (or trains on with --steps/--time).",
}


def step_budget(text: str) -> int:
    """``--steps``: a positive step count; 0 is refused with the command that scores a model
    without training it."""
    if text.strip().lstrip("+-").isdigit() and int(text) == 0:
        raise argparse.ArgumentTypeError(
            "must be a positive integer, got 0; to score a model without training it, use `loopgolf eval MODEL` "
            "(a run or `loopgolf convert` directory, a checkpoint or an artifact)"
        )
    return positive_int(text)


def run_options(args: argparse.Namespace, train_only: bool = False):
    """The :class:`~loopgolf.run.RunOptions` the parsed flags ask for (``None``: not given)."""
    from loopgolf.run import RunOptions

    train_set = dict(args.train_set)
    if args.seq_len is not None:
        train_set["seq_len"] = args.seq_len
    if args.batch_tokens is not None:
        train_set["batch_tokens"] = args.batch_tokens
    path = lambda value: Path(value) if value else None
    return RunOptions(
        preset=args.preset,
        data=path(args.data),
        out=path(args.out),
        cap_bytes=args.cap,
        seed=args.seed,
        time_budget=args.time,
        max_steps=args.steps,
        codec=args.codec,
        code_form=args.code_form,
        quant=args.quant,
        qat=args.qat,
        qat_start=args.qat_start,
        stride=args.stride,
        loops=args.loops,
        ttt=args.ttt,
        eval_time=args.eval_time,
        loop_sampling=args.loop_sampling,
        device=args.device,
        model_overrides=model_overrides(args),
        train_overrides=train_set,
        progress=not args.json and not args.quiet,
        force=args.force,
        checkpoint_every=args.checkpoint_every,
        resume=path(args.resume),
        train_only=train_only,
        verify_data=not args.no_verify_data,
        init_from=path(args.init_from),
        distill_from=path(args.distill_from),
        distill_weight=args.distill_weight,
        distill_temp=args.distill_temp,
        exit_loss_weight=args.exit_loss_weight,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from loopgolf.run import format_summary, run
    from loopgolf.rundir import RunSummary

    outcome = run(run_options(args))
    s = outcome.summary
    if not isinstance(s, RunSummary):  # torchrun: rank 0 reports
        return 0
    print(outcome.to_json() if args.json else format_summary(s, outcome.run_dir))
    if not s.fits:
        print(
            f"loopgolf run: artifact is {s.artifact_bytes:,} bytes, over the {s.cap_bytes:,}-byte cap "
            f"by {-s.headroom_bytes:,} (report written to {outcome.run_dir})",
            file=sys.stderr,
        )
        return EXIT_OVER_CAP
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from loopgolf.run import format_train_summary, run

    outcome = run(run_options(args, train_only=True))
    if outcome.rank != 0:
        return 0
    print(outcome.to_json() if args.json else format_train_summary(outcome.summary))
    return 0


def register(name: str, p: argparse.ArgumentParser) -> None:
    from loopgolf.config import DEFAULT_PRESET, PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS), help=f"configuration to start from (default {DEFAULT_PRESET})")
    p.add_argument("--data", help="dataset directory (shards + tokenizer); default: the embedded Python-docs corpus")
    p.add_argument("--out", help="run directory (default runs/<preset>-<timestamp>)")
    p.add_argument("--cap", type=positive_int, help="artifact byte cap (default 16,000,000)")
    p.add_argument(
        "--time",
        type=float,
        help="training wallclock budget in seconds; on a preset that stops on steps alone (the default cpu: 250 steps) "
        "it replaces that stop, elsewhere the preset's step cap stays; with --steps, whichever comes first",
    )
    p.add_argument("--steps", type=step_budget, help="training step budget (the default preset: 250)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--seq-len", type=positive_int, help="training/eval sequence length")
    p.add_argument("--batch-tokens", type=positive_int, help="global tokens per optimizer step")
    p.add_argument("--codec", help="artifact compression: auto (smallest, default), zlib, lzma, zstd, brotli")
    p.add_argument(
        "--code-form",
        choices=CODE_FORMS,
        help="the form of train_gpt.py whose bytes count against the cap (and that `submission` writes): plain (default), "
        "minify (python-minifier) and either wrapped in a self-extracting lzma or brotli stub",
    )
    p.add_argument("--quant", metavar="POLICY", help="quantization policy, e.g. int6 or attn=6,mlp=5,embed=8,gptq (default: the int8 baseline)")
    p.add_argument("--qat", choices=("off", "ste", "noise"), help="loop-aware QAT on the shared block matrices over the end of training (default off)")
    p.add_argument("--qat-start", type=float, help="fraction of the budget after which QAT is on (default 0.85)")
    p.add_argument("--stride", type=positive_int, help="sliding-window stride for the final scores (default: non-overlapping)")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--train", dest="train_set", type=kv, action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig field")
    p.add_argument(
        "--loop-sampling",
        metavar="DIST",
        help=f"depth-sampled training: each step runs a recursive plan's loop a drawn number of times: {LOOP_SAMPLING_SYNTAX}",
    )
    e = p.add_argument_group("compute at evaluation (the final scores of the roundtrip model)")
    e.add_argument("--loops", type=positive_int, metavar="N", help=f"run a recursive plan's loop N times at evaluation ({LOOPS_HELP})")
    e.add_argument("--ttt", metavar="SPEC", help=TTT_HELP)
    e.add_argument("--eval-time", type=positive_float, metavar="S", help="with --ttt: stop adapting after S seconds of evaluation")
    add_model_overrides(p)
    u = p.add_argument_group("uptraining (after `loopgolf convert`)")
    u.add_argument(
        "--init-from", metavar="SOURCE", help="start from this model: a `loopgolf convert` or run directory, an artifact, or a Hugging Face directory"
    )
    u.add_argument("--distill-from", metavar="SOURCE", help="teacher for forward-KL distillation (any source `loopgolf convert` reads)")
    u.add_argument("--distill-weight", type=float, metavar="W", help="loss = (1 - W) CE + W T^2 KL(teacher || student) (default 0.5)")
    u.add_argument("--distill-temp", type=float, metavar="T", help="distillation temperature (default 1)")
    u.add_argument("--exit-loss-weight", type=float, metavar="W", help="weight of the intermediate-loop losses that prepare early exit (e.g. 0.1)")
    g = p.add_argument_group("checkpoints and resume")
    g.add_argument(
        "--checkpoint-every",
        type=non_negative_int,
        metavar="N",
        help="write DIR/checkpoint.pt every N steps and when the budget ends (0: none; `train` always writes the final one)",
    )
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint, with its config.json (--steps/--time extend the budget)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bars)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty run directory (its old summary, artifact and checkpoint are removed first)")
    p.add_argument("--no-verify-data", action="store_true", help="skip checking the shards against the dataset's manifest (sizes and sha256)")
    p.set_defaults(func=cmd_train if name == "train" else cmd_run)

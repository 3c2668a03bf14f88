"""`loopgolf budget` (formerly `loopgolf plan`): a configuration's predicted artifact bytes before
training, and the widest configurations of a preset family that fit a cap."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loopgolf.commands.args import add_model_overrides, int_list, model_overrides, positive_float, positive_int

DESCRIPTION = {
    "budget": "Byte budget: a configuration's artifact size before training, and the configurations of a preset "
    "family that fit a cap, with each one's forward FLOPs per token and an estimated training step time on this "
    "machine. Predictions come from compression rates measured on real exports, for a trained model by default "
    "(docs/LOG.md has the measured errors). `loopgolf plan` is an old name of this command."
}


def cmd_budget(args: argparse.Namespace) -> int:
    from loopgolf.budget import budget_report, format_budget_report
    from loopgolf.export.quantize import parse_policy

    policies = list({p.describe(): p for p in (parse_policy(q) for q in (args.quant or [""]))}.values())  # each policy once
    # A loss fit: the one --fit names, for every policy; else each policy's own fit for --data.
    fit, fit_missing = None, []
    if args.time is not None or args.steps is not None or args.flops is not None or args.fit is not None:
        from loopgolf.budget import fit_file
        from loopgolf.lossmodel import load_fit

        if args.fit:
            fit = load_fit(Path(args.fit))  # a named file must be readable
        else:
            fits, default = {}, parse_policy("").describe()
            for p in policies:
                path = fit_file(args.data, p.describe())
                if path.is_file():
                    fits[p.describe()] = load_fit(path)
                elif p.describe() == default:
                    fit_missing.append(
                        f"no loss fit for dataset {args.data!r} (looked for {path}); make one with `loopgolf sweep calibration` then `loopgolf fit --data {args.data}`"
                    )
                else:
                    fit_missing.append(
                        f"no loss fit for dataset {args.data!r} with quant {p.describe()} (looked for {path}); a fit is made on runs exported with "
                        f"that policy (`loopgolf run --quant ...`, then `loopgolf runs add`): `loopgolf fit --data {args.data} --quant {p.describe()}`"
                    )
            fit = fits or None
    if args.code_bytes is not None and args.code_form is not None:
        raise ValueError("--code-bytes gives the code's size outright; --code-form counts a generated script's form: give one")

    out = budget_report(
        args.cap,
        preset=args.preset,
        family=args.family,
        policy=policies,
        codec=args.codec,
        weights=args.weights,
        code_bytes=args.code_bytes,
        code_form=args.code_form or "plain",
        overrides=model_overrides(args),
        layers=args.layers,
        loops=args.loops,
        width_step=args.width_step,
        head_dim=args.head_dim,
        top=args.top,
        matmul_flops=args.matmul_flops,
        step_time=args.step_time,
        time_budget=args.time,
        steps_budget=args.steps,
        flops_budget=args.flops,
        progress=not args.json,
        fit=fit,
    )
    if fit_missing:
        out["fit_missing"] = "; ".join(fit_missing)
    print(json.dumps(out, indent=2) if args.json else format_budget_report(out))
    return 0


def register(name: str, p: argparse.ArgumentParser) -> None:
    from loopgolf.budget import STEP_TIME_SOURCES, WEIGHTS
    from loopgolf.config import CODE_FORMS, PRESETS
    from loopgolf.data.default_corpus import DEFAULT_DATA_NAME
    from loopgolf.export.artifact import CODECS
    from loopgolf.export.pack import DEFAULT_CAP_BYTES

    p.add_argument("--cap", type=positive_int, default=DEFAULT_CAP_BYTES, help="artifact byte cap, code included (default 16,000,000)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="predict this preset (with the overrides) and search its widths")
    p.add_argument(
        "--family",
        help="search these presets instead: cpu, pg, all, or names separated by commas "
        "(default: --preset, else the family that suits this machine: pg with CUDA, cpu without)",
    )
    p.add_argument(
        "--quant",
        action="append",
        help="quantization policy, e.g. int6 or attn=6,mlp=5,embed=8,gptq (default int8); give it more than once to search several policies together",
    )
    p.add_argument("--codec", default="auto", choices=("auto", *CODECS), help="auto (smallest, default), " + ", ".join(CODECS))
    p.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="trained",
        help="predict a trained model (default) or freshly initialised, Gaussian-like weights, which code a few percent larger",
    )
    p.add_argument("--code-form", choices=CODE_FORMS, help="count the generated train_gpt.py in this form (as `run --code-form`; default plain)")
    p.add_argument("--code-bytes", type=int, help="code bytes counted against the cap (default: the size of the train_gpt.py a run of the preset generates)")
    p.add_argument("--layers", type=int_list, help="also try these unique-layer counts (the plan's `layers`), e.g. 2,3,4")
    p.add_argument("--loops", type=int_list, help="also try these loop counts, e.g. 2,3,4")
    p.add_argument("--width-step", type=positive_int, help="width granularity (default: head size x query/KV ratio)")
    p.add_argument("--head-dim", type=positive_int, help="head size of the searched widths (default: the preset's); a smaller one reaches narrower widths")
    p.add_argument("--top", type=positive_int, default=10, help="candidates to list (default 10)")
    p.add_argument("--matmul-flops", type=positive_float, help="FLOP/s to estimate step times with (default: measured here in well under a second)")
    p.add_argument(
        "--step-time",
        choices=STEP_TIME_SOURCES,
        help="measure: time a few real training steps of each candidate here (cached per device, the default); "
        "estimate: 3 x forward FLOPs / a matmul rate, instant (the default when --matmul-flops is given)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--time",
        type=positive_float,
        metavar="S",
        help="training seconds: list the optimizer steps each candidate gets in S seconds here and, with a loss fit for --data, "
        "its predicted val_bpb, best first",
    )
    budget.add_argument("--steps", type=positive_int, metavar="N", help="as --time, but every candidate trains N optimizer steps")
    budget.add_argument(
        "--flops",
        type=positive_float,
        metavar="F",
        help="as --time, but every candidate trains on F training FLOPs (3 x forward FLOPs per token x tokens, as ledgers count them)",
    )
    p.add_argument(
        "--data",
        default=DEFAULT_DATA_NAME,
        help="the dataset whose loss fit predicts val_bpb with --time (its name as runs record it; default the embedded corpus)",
    )
    p.add_argument("--fit", metavar="FILE", help="a loss fit file from `loopgolf fit` (default: the one `loopgolf fit --data` saved for --data)")
    add_model_overrides(p)
    p.add_argument("--json", action="store_true", help='print {"config": ..., "candidates": [...]}')
    p.set_defaults(func=cmd_budget)

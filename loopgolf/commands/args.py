"""Argument types and option groups more than one command shares."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

EXIT_BAD_INPUT = 2  # a user mistake or a bad file: one line on stderr
LOOPS_HELP = "a pass beyond training repeats the last trained pass's per-layer parameters; docs/evaluation.md#more-loops-at-evaluation"
# loopgolf.ttt.TTT_SYNTAX, written out so that a command's help does not import the TTT code
# (a test keeps the two equal).
TTT_HELP = (
    "score-first test-time training of per-virtual-layer LoRA adapters: rank=R,lr=LR[,targets=q+v+...|all][,reset=none|doc][,steps=N][,chunk=T][,seed=S], "
    "e.g. rank=8,lr=0.003 (docs/evaluation.md#score-first-test-time-training)"
)
EXIT_OVER_CAP = 3  # the run finished and wrote its report, but code + model exceed the cap


def kv(text: str) -> tuple[str, Any]:
    """Parse KEY=VALUE with a JSON value (bare words stay strings)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        return key.strip(), value


def _number(text: str, kind: type, lowest: float, inclusive: bool, what: str) -> Any:
    """``text`` as a finite ``kind`` at least (or above) ``lowest``; an ArgumentTypeError naming
    ``what`` otherwise (``nan``, ``inf`` and ``1e999`` included)."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text[:40]!r}{'...' if len(text) > 40 else ''}") from None
    if not math.isfinite(value) or value < lowest or (value == lowest and not inclusive):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, 1, True, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, 0, True, "a non-negative integer")


def positive_float(text: str) -> float:
    """A finite number > 0 (``nan``, ``inf`` and ``-1`` are refused)."""
    return _number(text, float, 0.0, False, "a positive, finite number")


def non_negative_float(text: str) -> float:
    return _number(text, float, 0.0, True, "a finite number >= 0")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def lora_ranks(text: str) -> dict[str, int]:
    """'all=8' or 'q=4,v=4' -> {target: rank}."""
    from loopgolf.model.gpt import LORA_TARGETS, UNGATED_TARGETS

    ranks: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected TARGET=RANK items, got {item!r}")
        targets = UNGATED_TARGETS if name == "all" else (name,)  # a gated MLP's mlp_gate is named
        for t in targets:
            if t not in LORA_TARGETS:
                raise argparse.ArgumentTypeError(f"unknown LoRA target {t!r}; valid: all, {', '.join(LORA_TARGETS)}")
            ranks[t] = int(value)
    return ranks


def add_model_overrides(p: argparse.ArgumentParser) -> None:
    from loopgolf.model.plan import PLAN_SYNTAX

    g = p.add_argument_group("model overrides (on top of the preset)")
    g.add_argument("--plan", help="depth plan: " + PLAN_SYNTAX)
    g.add_argument("--dim", type=positive_int, help="model width")
    g.add_argument("--heads", type=positive_int, help="attention heads")
    g.add_argument("--kv-heads", type=positive_int, help="key/value heads (GQA)")
    g.add_argument("--mlp-mult", type=positive_int, help="MLP hidden = mlp_mult * width")
    g.add_argument("--per-layer-controls", action="store_true", default=None, help="unshared scales/mixes/q gains per virtual layer")
    g.add_argument("--depth-emb", action="store_true", default=None, help="a learned embedding added at the start of each virtual layer")
    g.add_argument(
        "--lora",
        type=lora_ranks,
        metavar="RANKS",
        help="per-virtual-layer LoRA: 'all=8' or 'q=4,v=4,mlp_in=16' (targets q,k,v,o,mlp_in,mlp_out, and mlp_gate for gated MLPs; all = the first six)",
    )
    g.add_argument("--lora-alpha", type=float, help="LoRA scale alpha/r (default: alpha = r)")
    g.add_argument("--model", dest="model_set", type=kv, action="append", default=[], metavar="KEY=VALUE", help="any ModelConfig field")


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from loopgolf.model.plan import parse_plan

    out: dict[str, Any] = dict(args.model_set)
    if args.plan:
        out["plan"] = parse_plan(args.plan).to_dict()
    for flag, key in (
        ("dim", "model_dim"),
        ("heads", "num_heads"),
        ("kv_heads", "num_kv_heads"),
        ("mlp_mult", "mlp_mult"),
        ("per_layer_controls", "per_layer_controls"),
        ("depth_emb", "depth_embeddings"),
        ("lora", "lora_ranks"),
        ("lora_alpha", "lora_alpha"),
    ):
        if getattr(args, flag) is not None:
            out[key] = getattr(args, flag)
    return out

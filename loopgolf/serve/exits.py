"""Early-exit criteria: when a token may stop after a pass of a recursive plan.

Spelled on the command line as ``never``, ``maxprob:P`` (the head's top probability at least P),
``agree`` (the top token equals the previous pass's top token) or ``after:N`` (always stop after
pass N; ``after:1`` runs only the first pass)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

CRITERION_SYNTAX = "never | maxprob:P (0 < P <= 1) | agree | after:N (N >= 1)"

# What an exited token leaves in the deeper layers' KV cache entries, which later tokens read:
# ``fill`` computes each deeper layer's keys and values from the token's exit residual (its own
# norm, mix, controls and adapters; a third of a layer per deeper layer); ``share`` reuses the
# entry the token left at its last run of the same attention block (recursion-wise sharing, as
# Mixture-of-Recursions does: a copy, no compute), computing only for blocks it never ran.
EXIT_STATES = ("fill", "share")
DEFAULT_EXIT_STATE = "share"
EXIT_STATE_HELP = (
    "what an exited token leaves for deeper layers' attention: fill (keys/values computed from its exit state) or "
    f"share (the keys/values it left at its last run of the same block; no compute). Default {DEFAULT_EXIT_STATE}"
)


def check_exit_state(name: str) -> str:
    if name not in EXIT_STATES:
        raise ValueError(f"unknown exit state {name!r}; expected one of {', '.join(EXIT_STATES)}")
    return name


@dataclass(frozen=True)
class ExitCriterion:
    kind: str  # never, maxprob, agree, after
    value: float = 0.0

    @property
    def fires(self) -> bool:
        """Whether it can ever stop a token early."""
        return self.kind != "never"

    def __str__(self) -> str:
        if self.kind == "maxprob":
            return f"maxprob:{self.value:g}"
        if self.kind == "after":
            return f"after:{int(self.value)}"
        return self.kind

    def should_exit(self, logits: Tensor, prev_preds: list[int | None], passes_done: list[int]) -> list[bool]:
        """One decision per row of ``logits`` (N, V) read after pass ``passes_done`` (1-based) of
        each row; ``prev_preds`` are the rows' top tokens after the pass before (None after the first)."""
        if self.kind == "never":
            return [False] * logits.size(0)
        if self.kind == "maxprob":
            top = torch.softmax(logits.float(), dim=-1).amax(dim=-1)
            return (top >= self.value).tolist()
        if self.kind == "agree":
            pred = logits.argmax(dim=-1).tolist()
            return [prev is not None and prev == p for prev, p in zip(prev_preds, pred)]
        return [n >= self.value for n in passes_done]


def parse_criterion(text: str) -> ExitCriterion:
    """``never``, ``maxprob:0.9``, ``agree``, ``after:1`` -> ExitCriterion; ValueError otherwise."""
    kind, _, arg = text.strip().partition(":")
    kind = kind.lower()
    if kind in ("never", "agree"):
        if arg:
            raise ValueError(f"exit criterion {kind!r} takes no argument, got {text!r} (expected {CRITERION_SYNTAX})")
        return ExitCriterion(kind)
    if kind == "maxprob":
        try:
            p = float(arg)
        except ValueError:
            raise ValueError(f"maxprob needs a probability, got {text!r} (expected {CRITERION_SYNTAX})") from None
        if not (math.isfinite(p) and 0 < p <= 1):
            raise ValueError(f"maxprob threshold must be in (0, 1], got {text!r} (expected {CRITERION_SYNTAX})")
        return ExitCriterion("maxprob", p)
    if kind == "after":
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"after needs a pass count >= 1, got {text!r} (expected {CRITERION_SYNTAX})")
        return ExitCriterion("after", int(arg))
    raise ValueError(f"unknown exit criterion {text!r}; expected {CRITERION_SYNTAX}")


def check_fires(criterion: ExitCriterion, model) -> None:
    """Refuse a criterion that can never stop a token on ``model`` (a GPT): early exit reads a
    prediction after each pass but the last, so a plan of B passes has exit points after passes
    1..B-1. ``agree`` compares a pass with the one before, so it needs B >= 3; ``after:N`` needs
    N < B. ``never`` is always accepted (it is the full-depth reference)."""
    if not criterion.fires:
        return
    passes = len(model.loop_exits()) + 1
    plan = model.plan.describe()
    if passes == 1:
        raise ValueError(f"the model's plan ({plan}) has a single pass: there is nowhere to exit early")
    if criterion.kind == "agree" and passes < 3:
        raise ValueError(
            f"`agree` compares a pass's prediction with the previous pass's, so it can first stop a token after pass 2, "
            f"and a plan of {passes} passes ({plan}) exits only after pass 1: it would never fire. Use maxprob:P or after:1"
        )
    if criterion.kind == "after" and criterion.value >= passes:
        raise ValueError(
            f"`{criterion}` stops a token after pass {int(criterion.value)}, but the plan ({plan}) has {passes} passes: "
            f"it would never stop one early. Use after:N with N < {passes}"
        )

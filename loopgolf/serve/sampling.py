"""Choosing the next token from logits: greedy (temperature 0), temperature, top-k, top-p; and
the log-probabilities a completion reports.

Numerically safe at every value :class:`SamplingParams` accepts: the logits are shifted so their
maximum is 0 and divided by the temperature in float64, so a tiny temperature (1e-45, or a
denormal 5e-324) sends the others to -inf instead of overflowing the maximum to inf (softmax would
give NaN); top-p always keeps the most likely token, whatever the mass asked for. Logits that are
NaN or +inf (a broken model) raise :class:`ValueError`, which the engine turns into an error for
that one request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_TEMPERATURE = 100.0
LOGPROB_FLOOR = -9999.0  # a token of probability 0 reports this (as OpenAI's API), JSON has no -inf


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # nucleus mass kept; 1: all
    seed: int | None = None  # None: a fresh random stream

    def __post_init__(self) -> None:
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        if not (number(self.temperature) and math.isfinite(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE):
            raise ValueError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: no limit), got {self.top_k!r}")
        if not (number(self.top_p) and math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def _checked(logits: Tensor) -> Tensor:
    """``logits`` (V,) as float64 on the CPU; ValueError when no token can be chosen from them."""
    x = logits.detach().to("cpu", torch.float64).reshape(-1)
    if x.numel() == 0 or bool(torch.isnan(x).any()) or bool(torch.isposinf(x).any()):
        raise ValueError("the model gave non-finite logits (NaN or +inf) for this sequence")
    if bool(torch.isneginf(x).all()):
        raise ValueError("the model gave every token probability 0 for this sequence")
    return x


def sample(logits: Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """One token id from ``logits`` (V,)."""
    x = _checked(logits)
    if params.greedy:
        return int(x.argmax())
    # Shift first: the maximum becomes 0 and stays 0 under any temperature > 0; the rest go to
    # -inf when the division overflows. Nothing here can become NaN.
    x = (x - x.max()) / params.temperature
    if 0 < params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p; the top token always stays
        drop = sorted_p.cumsum(0) - sorted_p >= params.top_p
        drop[0] = False
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def token_logprobs(logits: Tensor, token_id: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token_id`` under ``logits`` (the model's own distribution: no
    temperature, top-k or top-p) and the ``top_n`` most likely tokens with theirs, best first.
    Both come from one float64 log-softmax, so a token that is the most likely one reports exactly
    the top value."""
    x = _checked(logits)
    lp = torch.log_softmax(x, dim=-1)
    if not 0 <= token_id < lp.numel():
        raise ValueError(f"token id {token_id} is outside the vocabulary of {lp.numel()}")
    floor = lambda v: max(float(v), LOGPROB_FLOOR)
    top: list[tuple[int, float]] = []
    if top_n > 0:
        values, ids = torch.topk(lp, min(top_n, lp.numel()))
        top = [(int(i), floor(v)) for v, i in zip(values.tolist(), ids.tolist())]
    return floor(lp[token_id]), top

"""A generation request and what happens to it: tokens out, text out, when it stops, its timings.

The completion's text is the decoded prompt + generated tokens minus the decoded prompt (not the
generated tokens decoded alone: SentencePiece drops the leading space of the first piece it
decodes, so "Return the" + "▁last" would read "last" instead of " last"). Streamed deltas hold
back a trailing incomplete character and a trailing part of a stop string, so they always add up
to the final text.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loopgolf.serve.sampling import SamplingParams

_ids = itertools.count()

FINISH_REASONS = ("length", "stop", "cancelled", "error")
MAX_LOGPROBS = 20  # alternatives per token a request may ask for
MAX_STOP_CHARS = 1024  # a stop string's length (the streamed text holds back up to this many characters)

Decode = Callable[[list[int]], str]


def common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of ``a`` and ``b``."""
    if b.startswith(a):
        return len(a)
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # a[:lo] == b[:lo] holds; bisect on the first difference
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def stop_holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string (they are
    not streamed until the next tokens tell)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def token_texts(decode: Decode, ids: list[int], first: int, text: str, begin: int) -> list[str]:
    """The text of each token ``ids[first:]`` within ``text[begin:]``, where ``text`` is the
    decoded ``ids`` (or a prefix of it: cut at a stop string, or streamed so far) and ``begin``
    is where ``ids[first]`` starts in it. Token i ends where decoding ``ids[: i + 1]`` stops
    agreeing with ``text``, so the texts add up to ``text[begin:]`` (a token that only starts a
    multi-byte character gets "", the one that completes it gets the character); the last covers
    the rest."""
    last, out = begin, []
    for i in range(first, len(ids)):
        end = max(last, common_prefix(decode(ids[: i + 1]), text))
        out.append(text[last:end])
        last = end
    if out:
        out[-1] += text[last:]
    return out


@dataclass
class TokenEvent:
    """One generated token: its id, the text it adds (may be empty while a multi-piece character
    is incomplete, or cut at a stop string), and how many passes of the plan it ran. An event with
    token id -1 carries no token: the request ended (``finish_reason``) without one."""

    token_id: int
    text: str
    loops: int
    finish_reason: str | None = None  # set on the request's last event


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 16
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    on_event: Callable[[TokenEvent], None] | None = None  # called on the engine's thread
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (None: none)
    score_prompt: bool = False  # also report the prompt tokens' log-probabilities (needs logprobs)
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = 0.0  # seconds after the start of an offline run (benchmarks)
    # what happened
    generated: list[int] = field(default_factory=list)
    loops: list[int] = field(default_factory=list)
    text: str = ""
    prompt_text: str | None = None  # the decoded prompt, as far as it reads the same in the decoded whole
    finish_reason: str | None = None
    error: str | None = None
    submitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    # log-probabilities (with ``logprobs``): per prompt token (the first has none) and per generated one
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    _rng: Any = None
    _streamed: str = ""  # the text sent in events so far
    _decoded_prompt: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.score_prompt and self.logprobs is None:
            raise ValueError("scoring the prompt needs logprobs (0 or more alternatives)")
        least = 0 if self.score_prompt else 1
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < least:
            raise ValueError(f"max_new_tokens must be an integer >= {least}, got {self.max_new_tokens!r}")
        if any(not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings of at most {MAX_STOP_CHARS} characters")
        if self.score_prompt:
            self.prompt_logprobs = [None] * len(self.prompt_ids)
            self.prompt_top_logprobs = [None] * len(self.prompt_ids)
        self._rng = self.sampling.generator()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        """Cache positions this request may need."""
        return len(self.prompt_ids) + self.max_new_tokens

    def latency(self) -> float | None:
        if self.finished_at is None or self.submitted_at is None:
            return None
        return self.finished_at - self.submitted_at

    def _completion(self, decode: Decode) -> str:
        """decode(prompt + generated) minus decode(prompt); where the prompt ends inside a
        character that a generated token completes, the character belongs to the completion."""
        if self._decoded_prompt is None:
            self._decoded_prompt = decode(self.prompt_ids)
        full = decode(self.prompt_ids + self.generated)
        k = common_prefix(self._decoded_prompt, full)
        self.prompt_text = full[:k]
        return full[k:]

    def emit(self, token_id: int, loops: int, decode: Decode | None) -> TokenEvent:
        """Record a generated token; decides whether the request is done (length or stop)."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.generated.append(token_id)
        self.loops.append(loops)
        delta, reason = "", None
        if decode is not None:
            full = self._completion(decode)
            cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                full, reason = full[:cut], "stop"
            self.text = full
        if reason is None and len(self.generated) >= self.max_new_tokens:
            reason = "length"
        if decode is not None:
            # Byte-fallback pieces of one character decode to U+FFFD until the character is
            # complete, and text that may begin a stop string may yet be cut: hold both back so
            # the streamed deltas add up to ``text``.
            if reason is not None:
                ready = self.text
            else:
                ready = self.text[: len(self.text) - stop_holdback(self.text, self.stop)].rstrip("\ufffd")
            if ready.startswith(self._streamed):
                delta = ready[len(self._streamed) :]
                self._streamed = ready
        event = TokenEvent(token_id, delta, loops, reason)
        if reason is not None:
            self.finish(reason, at=now)
        if self.on_event is not None:
            self.on_event(event)
        return event

    def end_without_tokens(self, decode: Decode | None) -> None:
        """Finish a request that generates nothing (``max_new_tokens`` 0: the prompt scored)."""
        if decode is not None:
            self.text = self._completion(decode)
        self.finish("length")
        if self.on_event is not None:
            self.on_event(TokenEvent(-1, "", 0, "length"))

    def finish(self, reason: str, at: float | None = None, error: str | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error
            self.finished_at = time.perf_counter() if at is None else at

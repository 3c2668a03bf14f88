"""A generation request and what happens to it: tokens out, text out, when it stops, its timings."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loopgolf.serve.sampling import SamplingParams

_ids = itertools.count()

FINISH_REASONS = ("length", "stop", "cancelled", "error")


@dataclass
class TokenEvent:
    """One generated token: its id, the text it adds (may be empty while a multi-piece character
    is incomplete, or cut at a stop string), and how many passes of the plan it ran."""

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
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = 0.0  # seconds after the start of an offline run (benchmarks)
    # what happened
    generated: list[int] = field(default_factory=list)
    loops: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    submitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    _rng: Any = None
    _streamed: str = ""  # the text sent in events so far

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
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

    def emit(self, token_id: int, loops: int, decode: Callable[[list[int]], str] | None) -> TokenEvent:
        """Record a generated token; decides whether the request is done (length or stop)."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.generated.append(token_id)
        self.loops.append(loops)
        delta, reason = "", None
        if decode is not None:
            full = decode(self.generated)
            cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                full, reason = full[:cut], "stop"
            self.text = full
        if reason is None and len(self.generated) >= self.max_new_tokens:
            reason = "length"
        if decode is not None:
            # Byte-fallback pieces of one character decode to U+FFFD until the character is
            # complete: hold a trailing run back so the streamed deltas add up to ``text``.
            ready = self.text if reason is not None else self.text.rstrip("\ufffd")
            if ready.startswith(self._streamed):
                delta = ready[len(self._streamed) :]
                self._streamed = ready
        event = TokenEvent(token_id, delta, loops, reason)
        if reason is not None:
            self.finish(reason, at=now)
        if self.on_event is not None:
            self.on_event(event)
        return event

    def finish(self, reason: str, at: float | None = None, error: str | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error
            self.finished_at = time.perf_counter() if at is None else at

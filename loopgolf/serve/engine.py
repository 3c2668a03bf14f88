"""Serving engines: a pool of requests in cache slots, stepped by one thread.

Three schedules over the same :class:`~loopgolf.serve.runner.LayerRunner`:

- ``static``: take up to ``slots`` waiting requests, run them until every one is done, then take
  the next batch (finished rows leave the computation; nobody joins a running batch).
- ``sequence``: sequence-level continuous batching. Each step runs every in-flight sequence's
  next token (and any newly admitted prompt) to the end of the network; a finished request's slot
  is given to a waiting one at the next step.
- ``depthwise``: continuous depth-wise batching. Each step runs *one virtual layer* for every
  token in flight, whatever its depth: new prompts at layer 0 beside tokens in their second or
  third pass. A token that exits early (the engine's exit criterion) leaves the batch at once and
  its sequence's next token enters at layer 0 on the next step.

Any schedule may be given an exit criterion; in ``static`` and ``sequence`` an exited token only
stops computing, and its sequence waits for the step to end.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from loopgolf.model.gpt import GPT
from loopgolf.serve.exits import ExitCriterion
from loopgolf.serve.request import Request, TokenEvent
from loopgolf.serve.runner import LayerRunner, Token
from loopgolf.serve.sampling import sample

SCHEDULES = ("static", "sequence", "depthwise")


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its bound."""


class Engine:
    def __init__(
        self,
        model: GPT,
        *,
        schedule: str = "depthwise",
        slots: int = 8,
        max_len: int | None = None,
        criterion: ExitCriterion | None = None,
        decode: Callable[[list[int]], str] | None = None,
        max_queue: int = 64,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if slots < 1 or max_queue < 0:
            raise ValueError(f"slots must be >= 1 and max_queue >= 0, got {slots} and {max_queue}")
        model.eval()
        self.model, self.schedule, self.decode, self.max_queue = model, schedule, decode, max_queue
        self.max_len = max_len or model.config.max_seq_len
        self.runner = LayerRunner(model, slots, self.max_len, criterion)
        self.free_slots = list(range(slots))[::-1]
        self.waiting: deque[Request] = deque()
        self.active: dict[int, Request] = {}  # slot -> request
        self.in_flight: list[Token] = []
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        self.tokens_out = 0
        self.steps = 0

    # ----------------------------------------------------------------- intake

    def check(self, req: Request) -> None:
        """ValueError when the request can never run on this engine."""
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if req.length > self.max_len:
            raise ValueError(
                f"prompt of {len(req.prompt_ids)} tokens + max_tokens {req.max_new_tokens} = {req.length} exceeds the model's context of {self.max_len} tokens"
            )

    def submit(self, req: Request) -> None:
        """Queue a request (thread-safe). QueueFull when the queue is at its bound."""
        self.check(req)
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the bound is {self.max_queue})")
            req.submitted_at = time.perf_counter()
            self.waiting.append(req)
            self.wakeup.notify_all()

    def cancel(self, req: Request) -> None:
        """Stop a request (thread-safe); it is retired at the engine's next step."""
        with self.lock:
            if req in self.waiting:
                self.waiting.remove(req)
                self._end(req, "cancelled")
            else:
                req.cancel_requested = True  # type: ignore[attr-defined]

    @property
    def idle(self) -> bool:
        return not self.active and not self.waiting

    def pending(self) -> int:
        with self.lock:
            return len(self.waiting) + len(self.active)

    # ----------------------------------------------------------------- stepping

    def _end(self, req: Request, reason: str, error: str | None = None) -> None:
        req.finish(reason, error=error)
        if req.on_event is not None:
            req.on_event(TokenEvent(-1, "", 0, reason))

    def _admit(self) -> list[Token]:
        with self.lock:
            if self.schedule == "static" and self.active:
                return []
            admitted = []
            while self.waiting and self.free_slots:
                req = self.waiting.popleft()
                slot = self.free_slots.pop()
                self.active[slot] = req
                admitted.append((slot, req))
        tokens = []
        for slot, req in admitted:
            n = len(req.prompt_ids)
            tokens += [Token(slot, p, t, emit=p == n - 1, owner=req) for p, t in enumerate(req.prompt_ids)]
        return tokens

    def _retire(self, slot: int) -> None:
        del self.active[slot]
        self.free_slots.append(slot)

    def step(self) -> int:
        """One engine step; returns the number of tokens generated in it."""
        self.steps += 1
        self._drop_cancelled()
        new = self._admit()
        self.runner.start(new)
        self.in_flight += new
        if not self.in_flight:
            return 0
        if self.schedule == "depthwise":
            done = self.runner.advance(self.in_flight)
        else:
            done, pending = [], self.in_flight
            while pending:
                done += self.runner.advance(pending)
                pending = [t for t in pending if not t.done]
        self.in_flight = [t for t in self.in_flight if not t.done]
        emitted, nxt = 0, []
        for t in done:
            req: Request = t.owner
            if not t.emit or req.finished:
                continue
            token_id = sample(t.logits, req.sampling, req._rng)
            req.emit(token_id, t.loops, self.decode)
            emitted += 1
            if req.finished or t.pos + 1 >= self.max_len:
                if not req.finished:
                    req.finish("length")
                self._retire(t.slot)
            else:
                nxt.append(Token(t.slot, t.pos + 1, token_id, owner=req))
        self.runner.start(nxt)
        self.in_flight += nxt
        self.tokens_out += emitted
        return emitted

    def _drop_cancelled(self) -> None:
        for slot, req in list(self.active.items()):
            if getattr(req, "cancel_requested", False) and not req.finished:
                self.in_flight = [t for t in self.in_flight if t.owner is not req]
                self._end(req, "cancelled")
                self._retire(slot)

    def fail_all(self, message: str, reason: str = "error") -> None:
        """End every request (the engine cannot go on, or is stopping)."""
        with self.lock:
            reqs = list(self.waiting) + list(self.active.values())
            self.waiting.clear()
        for req in reqs:
            if not req.finished:
                self._end(req, reason, message)
        self.active.clear()
        self.free_slots = list(range(self.runner.cache.slots))[::-1]
        self.in_flight = []

    @torch.inference_mode()
    def run_until_idle(self) -> None:
        while not self.idle:
            self.step()

    @torch.inference_mode()
    def run_offline(self, requests: list[Request], realtime: bool = True) -> float:
        """Serve ``requests``, each submitted at its ``arrival`` second after the start (in real
        time; or all at once with ``realtime=False``); returns the wall seconds taken."""
        order = sorted(requests, key=lambda r: r.arrival)
        start = time.perf_counter()
        i = 0
        while i < len(order) or not self.idle:
            now = time.perf_counter() - start
            while i < len(order) and (not realtime or order[i].arrival <= now):
                self.submit(order[i])
                i += 1
            if self.idle and i < len(order):
                time.sleep(max(0.0, order[i].arrival - (time.perf_counter() - start)))
                continue
            self.step()
        return time.perf_counter() - start

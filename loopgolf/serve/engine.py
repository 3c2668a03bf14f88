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

Faults stay with their request: an error while choosing, scoring or decoding one sequence's token
(non-finite logits, a failing callback) ends that request alone with an error and frees its slot.
An error inside the model call itself cannot be pinned on one row: it ends the requests in
flight (not the waiting ones), resets the slots and is raised; the engine can step again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from loopgolf.model.gpt import GPT
from loopgolf.serve.exits import DEFAULT_EXIT_STATE, ExitCriterion
from loopgolf.serve.request import Request, TokenEvent
from loopgolf.serve.runner import LayerRunner, Token
from loopgolf.serve.sampling import sample, token_logprobs

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
        exit_state: str = DEFAULT_EXIT_STATE,
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
        self.runner = LayerRunner(model, slots, self.max_len, criterion, exit_state)
        self.free_slots = list(range(slots))[::-1]
        self.waiting: deque[Request] = deque()
        self.active: dict[int, Request] = {}  # slot -> request
        self.in_flight: list[Token] = []
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        self.tokens_out = 0
        self.steps = 0
        self._unscored: dict[Request, int] = {}  # prompt tokens of a scoring request not yet scored
        self._held: dict[Request, Token] = {}  # its last prompt token, waiting for them before generating

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

    def submit(self, req: Request, *, bounded: bool = True) -> None:
        """Queue a request (thread-safe). QueueFull when the queue is at its bound (``bounded``:
        False lets the server's own health probe in)."""
        self.check(req)
        with self.lock:
            if bounded and len(self.waiting) >= self.max_queue:
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
            try:
                req.on_event(TokenEvent(-1, "", 0, reason))
            except Exception:  # a listener that is gone cannot be told; the request is over anyway
                pass

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
            if req.score_prompt:  # every prompt token's prediction is wanted (it scores the next one)
                self._unscored[req] = n
            ids = req.prompt_ids
            tokens += [Token(slot, p, t, emit=req.score_prompt or p == n - 1, owner=req, prev_id=ids[p - 1] if p else None) for p, t in enumerate(ids)]
        return tokens

    def _retire(self, slot: int) -> None:
        """Free a finished request's slot; its tokens still in flight (prompt tokens running
        deeper than the one that ended it) stop: nothing needs them, and they would go on writing
        into the cache entries of the slot's next owner."""
        req = self.active.pop(slot)
        self.free_slots.append(slot)
        self.in_flight = [t for t in self.in_flight if t.owner is not req]
        self._unscored.pop(req, None)
        self._held.pop(req, None)

    def _fail(self, req: Request, slot: int, message: str) -> None:
        """End one request with an error (the others go on)."""
        self._end(req, "error", message)
        if self.active.get(slot) is req:
            self._retire(slot)

    def _fail_active(self, message: str) -> None:
        """End every request in a slot with an error (the model call failed); waiting ones stay."""
        self._end_requests("error", message, waiting=False)

    def _end_requests(self, reason: str, message: str, *, waiting: bool) -> None:
        """End every request in a slot (and, with ``waiting``, every queued one), freeing all slots."""
        with self.lock:
            reqs = (list(self.waiting) if waiting else []) + list(self.active.values())
            if waiting:
                self.waiting.clear()
            self.active.clear()
            self.free_slots = list(range(self.runner.cache.slots))[::-1]
        self.in_flight = []
        self._unscored.clear()
        self._held.clear()
        for req in reqs:
            if not req.finished:
                self._end(req, reason, message)

    def step(self) -> int:
        """One engine step; returns the number of tokens generated in it."""
        self.steps += 1
        self._drop_cancelled()
        new = self._admit()
        try:
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
        except Exception as e:
            self._fail_active(f"engine error: {type(e).__name__}: {e}")
            raise
        self.in_flight = [t for t in self.in_flight if not t.done]
        emitted, nxt = 0, []
        for t in done:
            req: Request = t.owner
            if req.finished:
                continue
            try:
                emitted += self._on_done(t, nxt)
            except Exception as e:  # this sequence's fault: it alone ends
                self._fail(req, t.slot, f"{type(e).__name__}: {e}")
        nxt = [t for t in nxt if not t.owner.finished]
        try:
            self.runner.start(nxt)
        except Exception as e:
            self._fail_active(f"engine error: {type(e).__name__}: {e}")
            raise
        self.in_flight += nxt
        self.tokens_out += emitted
        return emitted

    def _on_done(self, t: Token, nxt: list[Token]) -> int:
        """A token ran its last layer (or exited): score it, or choose the next token."""
        req: Request = t.owner
        n = len(req.prompt_ids)
        if req.score_prompt and t.pos < n:
            if t.pos + 1 < n:
                lp, top = token_logprobs(t.logits, req.prompt_ids[t.pos + 1], req.logprobs or 0)
                req.prompt_logprobs[t.pos + 1], req.prompt_top_logprobs[t.pos + 1] = lp, top
            self._unscored[req] -= 1
            if t.pos < n - 1:  # the prompt's last token may be waiting for this one
                if self._unscored[req] == 0 and req in self._held:
                    return self._generate(self._held.pop(req), nxt)
                return 0
            if self._unscored[req] > 0:  # generate once every prompt token is scored
                self._held[req] = t
                return 0
        elif not t.emit:
            return 0
        return self._generate(t, nxt)

    def _generate(self, t: Token, nxt: list[Token]) -> int:
        req: Request = t.owner
        if req.max_new_tokens == 0:  # a scoring request: the prompt is all it wanted
            req.end_without_tokens(self.decode)
            self._retire(t.slot)
            return 0
        token_id = sample(t.logits, req.sampling, req._rng)
        if req.logprobs is not None:
            lp, top = token_logprobs(t.logits, token_id, req.logprobs)
            req.token_logprobs.append(lp)
            req.top_logprobs.append(top)
        req.emit(token_id, t.loops, self.decode)
        if req.finished or t.pos + 1 >= self.max_len:
            if not req.finished:
                self._end(req, "length")
            self._retire(t.slot)
        else:
            nxt.append(Token(t.slot, t.pos + 1, token_id, owner=req, prev_id=t.token_id))
        return 1

    def _drop_cancelled(self) -> None:
        for slot, req in list(self.active.items()):
            if getattr(req, "cancel_requested", False) and not req.finished:
                self.in_flight = [t for t in self.in_flight if t.owner is not req]
                self._end(req, "cancelled")
                self._retire(slot)

    def fail_all(self, message: str, reason: str = "error") -> None:
        """End every request (the engine is stopping, or everything is cancelled)."""
        self._end_requests(reason, message, waiting=True)

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
                self.submit(order[i], bounded=False)  # the whole list is this caller's: no queue bound to refuse it
                i += 1
            if self.idle and i < len(order):
                time.sleep(max(0.0, order[i].arrival - (time.perf_counter() - start)))
                continue
            self.step()
        return time.perf_counter() - start

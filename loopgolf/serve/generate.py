"""Text generation from a model and its tokenizer, with a KV cache per virtual layer.

gen = Generator(model, tokenizer)               # tokenizer: a SentencePieceProcessor
print(gen.generate("The cat", max_new_tokens=20, temperature=0).text)
for event in gen.stream("The cat", max_new_tokens=20):
    print(event.text, end="", flush=True)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from loopgolf.model.gpt import GPT
from loopgolf.serve.engine import Engine
from loopgolf.serve.exits import DEFAULT_EXIT_STATE, ExitCriterion
from loopgolf.serve.request import Request, TokenEvent
from loopgolf.serve.sampling import SamplingParams


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a text prompt, after BOS as every document in the official shards begins."""
    bos = tokenizer.bos_id()
    return ([bos] if bos >= 0 else []) + list(tokenizer.encode(text))


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    loops: list[int]  # passes of the plan each generated token ran
    finish_reason: str
    prompt_tokens: int

    @property
    def mean_loops(self) -> float:
        return sum(self.loops) / len(self.loops) if self.loops else 0.0


class Generator:
    """Generates for one prompt at a time (for many at once, use :class:`Engine`)."""

    def __init__(
        self, model: GPT, tokenizer=None, criterion: ExitCriterion | None = None, max_len: int | None = None, exit_state: str = DEFAULT_EXIT_STATE
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        decode = None if tokenizer is None else (lambda ids: tokenizer.decode(ids))
        self.engine = Engine(model, schedule="sequence", slots=1, max_len=max_len, criterion=criterion, exit_state=exit_state, decode=decode)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; give token ids or build the Generator with one")
            return encode_prompt(self.tokenizer, prompt)
        return list(prompt)

    def stream(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 64,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: tuple[str, ...] | list[str] = (),
    ) -> Iterator[TokenEvent]:
        """Yield each generated token as it comes (the last event carries ``finish_reason``)."""
        events: deque[TokenEvent] = deque()
        req = Request(self.encode(prompt), max_new_tokens, SamplingParams(temperature, top_k, top_p, seed), tuple(stop), on_event=events.append)
        self.engine.submit(req)
        self.last_request = req
        try:
            with torch.inference_mode():
                while not req.finished:
                    self.engine.step()
                    while events:
                        yield events.popleft()
            while events:
                yield events.popleft()
        finally:  # a consumer that stops early frees the slot
            if not req.finished:
                self.engine.cancel(req)
                with torch.inference_mode():
                    self.engine.step()

    def generate(self, prompt: str | list[int], max_new_tokens: int = 64, **kwargs) -> Generation:
        for _ in self.stream(prompt, max_new_tokens, **kwargs):
            pass
        req = self.last_request
        return Generation(req.text, list(req.generated), list(req.loops), req.finish_reason or "length", len(req.prompt_ids))

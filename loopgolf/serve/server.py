"""An OpenAI-style completions server over one :class:`~loopgolf.serve.engine.Engine`.

``POST /v1/completions`` (``stream`` as server-sent events; ``echo`` and ``logprobs`` as in
OpenAI's API, so lm-evaluation-harness's ``local-completions`` model can score loglikelihoods),
``GET /v1/models``, ``GET /health``, and the tokenizer endpoints ``GET /tokenizer_info``,
``POST /tokenize`` and ``POST /detokenize`` (vLLM's shapes, which lm-evaluation-harness's remote
tokenizer reads), on starlette + uvicorn, localhost by default. The engine steps on its own
thread; each request waits on an asyncio queue its tokens are posted to.

Bounded, and one request's faults are its own:

- the body: a Content-Length over ``max_body_bytes`` is refused (413) before a byte is read, and
  a chunked body stops being read at the limit; a client gets ``read_timeout`` seconds to send
  its headers (else the connection is closed) and its body (else 408);
- the JSON: malformed text, a body that is not UTF-8, NaN/Infinity, numbers out of range, deep
  nesting and lone surrogates answer 400; unknown fields, bad types and bad values answer 400
  naming the field (OpenAI's error shape);
- the work: a full waiting queue answers 429, a request that runs past ``request_timeout`` is
  cancelled (504, or an error event on a stream);
- faults: an error in one sequence (say, non-finite logits) ends that request alone (500, or an
  error event); ``/health`` answers 500 only while the engine cannot serve (its thread is gone,
  or the model call failed and has not worked since; after a failure the engine runs a one-token
  probe, so an idle server recovers too).

SIGTERM stops accepting, lets in-flight requests finish for up to ``shutdown_grace`` seconds, then
cancels the rest and stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

from loopgolf.serve.engine import Engine, QueueFull
from loopgolf.serve.generate import encode_prompt
from loopgolf.serve.request import MAX_LOGPROBS, MAX_STOP_CHARS, Request, TokenEvent, token_texts
from loopgolf.serve.sampling import MAX_TEMPERATURE, SamplingParams

MAX_STOP_STRINGS = 4  # as OpenAI's API
MAX_PROMPTS = 32  # prompts in one request (each is a choice)
MAX_INT_DIGITS = 64  # an integer in a body with more digits than this is refused while parsing
COMPLETION_FIELDS = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stream",
    "stop",
    "seed",
    "n",
    "echo",
    "logprobs",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "best_of",
    "suffix",
    "stream_options",
    "logit_bias",
}


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error", close: bool = False) -> None:
        super().__init__(message)
        self.param, self.status, self.kind, self.close = param, status, kind, close


@dataclass
class ServerConfig:
    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    request_timeout: float = 120.0  # seconds a request may take, reading its body and queueing included
    shutdown_grace: float = 10.0  # seconds in-flight requests get to finish on SIGTERM
    max_body_bytes: int = 1 << 20
    read_timeout: float = 10.0  # seconds a client gets to send a request's headers, and its body (at most request_timeout)

    @property
    def read_deadline(self) -> float:
        return min(self.read_timeout, self.request_timeout)


class EngineThread:
    """Steps the engine whenever it has work, on one thread (torch ops stay off the event loop).

    A step that raises has already ended the requests in flight (see :meth:`Engine.step`); the
    thread records the error and goes on. ``failing`` is true from such a step until a step that
    runs the model succeeds; while failing and idle it runs a one-token probe request (at most one
    a second) so that the state is known without waiting for a client."""

    PROBE_EVERY = 1.0  # seconds between probes while failing

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.stopping = False
        self.cancel_message: str | None = None  # set from another thread: end every request at the next step
        self.error: str | None = None  # the last model-call failure
        self.failing = False
        self.faults = 0
        self._last_probe = 0.0
        self.thread = threading.Thread(target=self._loop, name="loopgolf-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def healthy(self) -> bool:
        return self.thread.is_alive() and not self.failing and not self.stopping

    def _probe(self) -> None:
        now = time.monotonic()
        if now - self._last_probe < self.PROBE_EVERY:
            return
        self._last_probe = now
        self.engine.submit(Request([0], 1, SamplingParams(temperature=0.0)), bounded=False)

    def _loop(self) -> None:
        eng = self.engine
        with torch.inference_mode():
            while True:
                with eng.wakeup:
                    while eng.idle and not self.stopping and self.cancel_message is None and not self.failing:
                        eng.wakeup.wait(timeout=0.5)
                    message, self.cancel_message = self.cancel_message, None
                if self.stopping:
                    break
                if message is not None:
                    eng.fail_all(message, reason="cancelled")
                    continue
                if self.failing and eng.idle:
                    self._probe()
                    if eng.idle:
                        time.sleep(0.05)
                        continue
                calls = eng.runner.layer_calls
                try:
                    eng.step()
                except Exception as e:  # the requests in flight have been ended; the engine can step again
                    self.error = f"{type(e).__name__}: {e}"
                    self.failing = True
                    self.faults += 1
                    continue
                if self.failing and eng.runner.layer_calls > calls:
                    self.failing = False

    def cancel_all(self, message: str) -> None:
        """End every request on the engine's own thread, between two steps (thread-safe)."""
        with self.engine.wakeup:
            self.cancel_message = message
            self.engine.wakeup.notify_all()

    def stop(self) -> None:
        with self.engine.wakeup:
            self.stopping = True
            self.engine.wakeup.notify_all()
        self.thread.join(timeout=30)
        self.engine.fail_all("the server is shutting down", reason="cancelled")


# ---------------------------------------------------------------- errors and request bodies


def _safe(text: str) -> str:
    """``text`` with lone surrogates escaped (a JSON response must be valid UTF-8)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _error(message: str, status: int, param: str | None = None, kind: str = "invalid_request_error", close: bool = False):
    from starlette.responses import JSONResponse

    payload = {"error": {"message": _safe(message), "type": kind, "param": None if param is None else _safe(param), "code": None}}
    return JSONResponse(payload, status_code=status, headers={"Connection": "close"} if close else None)


def _describe(value: Any) -> str:
    """A short account of a JSON value for an error message."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        text = str(value)
        return text if len(text) <= 24 else f"an integer of {len(text)} digits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return _safe(json.dumps(value[:40], ensure_ascii=False)) + ("..." if len(value) > 40 else "")
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BadRequest(f"an integer of {len(text.lstrip('-'))} digits is out of range (at most {MAX_INT_DIGITS} digits)")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"the number {text[:24]}{'...' if len(text) > 24 else ''} is out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"malformed JSON: {name} is not a JSON value")


def parse_json(raw: bytes) -> Any:
    """The JSON value of a request body; BadRequest (400) for anything that is not plain JSON
    text: malformed, not UTF-8, NaN/Infinity, a number out of range, nested too deeply, or a
    string with a lone surrogate."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"the body is not UTF-8 text: {e.reason} at byte {e.start}") from None
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_reject_constant)
    except BadRequest:
        raise
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None
    except json.JSONDecodeError as e:
        raise BadRequest(f"malformed JSON: {e}") from None
    except ValueError as e:  # any other refusal of the parser
        raise BadRequest(f"malformed JSON: {e}") from None
    _check_text(value)
    return value


def _check_text(value: Any) -> None:
    """BadRequest naming the top-level field when a string anywhere in ``value`` is not valid
    Unicode (a lone surrogate, written as an escape such as \\ud800, that UTF-8 cannot hold)."""
    stack: list[tuple[Any, str | None]] = [(value, None)]
    while stack:
        v, field = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                where = f"'{_safe(field)}'" if field is not None else "the body"
                raise BadRequest(
                    f"{where} holds a lone surrogate (a \\ud800-\\udfff escape that is not part of a pair): not valid Unicode text", field
                ) from None
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, field if field is not None else k))
                stack.append((x, field if field is not None else k))
        elif isinstance(v, list):
            stack.extend((x, field) for x in v)


async def read_body(http, config: ServerConfig, started: float) -> bytes:
    """The request body, at most ``max_body_bytes``: a Content-Length over it is refused before
    reading, a chunked body when it passes it; a body that has not arrived within the read
    deadline (from the request's start) answers 408. Both close the connection."""
    limit = config.max_body_bytes
    declared = http.headers.get("content-length")
    if declared is not None:
        digits = declared.strip()
        if not digits.isdigit():
            raise BadRequest(f"Content-Length {_describe(declared)} is not a number of bytes", status=400, close=True)
        if len(digits) > 18 or int(digits) > limit:
            raise BadRequest(f"request body of {digits[:24]} bytes is over the {limit}-byte limit", status=413, close=True)

    async def collect() -> bytes:
        from starlette.requests import ClientDisconnect

        parts, size = [], 0
        try:
            async for chunk in http.stream():
                size += len(chunk)
                if size > limit:
                    raise BadRequest(f"request body of more than {limit} bytes is over the {limit}-byte limit", status=413, close=True)
                parts.append(chunk)
        except ClientDisconnect:  # nobody is left to answer; the response goes nowhere
            raise BadRequest("the client closed the connection before sending the whole body", close=True) from None
        return b"".join(parts)

    left = started + config.read_deadline - time.monotonic()
    try:
        return await asyncio.wait_for(collect(), timeout=max(left, 0.001))
    except asyncio.TimeoutError:
        raise BadRequest(f"the request body did not arrive within {config.read_deadline:g} s", status=408, kind="timeout", close=True) from None


# ---------------------------------------------------------------- /v1/completions


@dataclass
class Completion:
    """A parsed /v1/completions request: one engine request per prompt."""

    requests: list[Request]
    stream: bool
    echo: bool
    include_usage: bool


def _int_field(body: dict, key: str, default: Any, lo: int | None = None, hi: int | None = None, what: str = "") -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"'{key}' must be an integer{what}, got {_describe(value)}", key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise BadRequest(f"'{key}' must be {bounds}{what}, got {_describe(value)}", key)
    return value


def _float_field(body: dict, key: str, default: float, ok, bounds: str) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise BadRequest(f"'{key}' must be a number, got {_describe(value)}", key)
    value = float(value)  # integers here have at most MAX_INT_DIGITS digits: finite as floats
    if not (math.isfinite(value) and ok(value)):
        raise BadRequest(f"'{key}' must be {bounds}, got {_describe(body.get(key))}", key)
    return value


def _token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, or a list of lists
    of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if _token_list(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(_token_list(p) for p in prompt):
        return list(prompt)
    raise BadRequest(
        "'prompt' must be a string, a non-empty list of token ids, or a non-empty list of either (one per choice), got " + _describe(prompt), "prompt"
    )


def parse_completion(body: Any, tokenizer, model_name: str, vocab_size: int, context: int | None = None, max_chars_per_token: int | None = None) -> Completion:
    """The requests of a /v1/completions body; BadRequest (naming the field) otherwise."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {_describe(body)}")
    unknown = sorted(set(body) - COMPLETION_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}", unknown[0])
    model = body.get("model")
    if model is not None and model != model_name:
        raise BadRequest(f"model {_describe(model)} is not served here; this server serves {model_name!r}", "model", 404, "not_found_error")
    for key in ("n", "best_of"):
        if body.get(key) is not None and (not isinstance(body[key], int) or isinstance(body[key], bool) or body[key] != 1):
            raise BadRequest(f"only {key}=1 is supported (one choice per prompt), got {_describe(body[key])}", key)
    if body.get("suffix") is not None:
        raise BadRequest("'suffix' is not supported", "suffix")
    if body.get("logit_bias") not in (None, {}):
        raise BadRequest("'logit_bias' is not supported", "logit_bias")
    for key in ("presence_penalty", "frequency_penalty"):
        if _float_field(body, key, 0.0, lambda v: True, "a number") != 0:
            raise BadRequest(f"'{key}' is not supported (only 0)", key)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise BadRequest(f"'user' must be a string, got {_describe(body['user'])}", "user")
    echo = body.get("echo", False)
    if echo is None:
        echo = False
    if not isinstance(echo, bool):
        raise BadRequest(f"'echo' must be true or false, got {_describe(echo)}", "echo")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false, got {_describe(stream)}", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
            raise BadRequest("'stream_options' must be an object with at most 'include_usage': true or false", "stream_options")
        if not stream:
            raise BadRequest("'stream_options' is only allowed with stream: true", "stream_options")
        include_usage = bool(options.get("include_usage", False))
    logprobs = _int_field(body, "logprobs", None, 0, MAX_LOGPROBS, " (alternatives per token)")
    max_tokens = _int_field(body, "max_tokens", 16, 0 if echo else 1, None, " (0 only with echo)" if not echo else "")
    if max_tokens == 0 and logprobs is None:
        raise BadRequest("'max_tokens' 0 (echo the prompt, generate nothing) needs 'logprobs' (the prompt's log-probabilities)", "max_tokens")
    stop = body.get("stop")
    stops: tuple[str, ...] = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else ()
    if stop is not None and (
        not isinstance(stop, (str, list)) or len(stops) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS for s in stops)
    ):
        raise BadRequest(f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them, each at most {MAX_STOP_CHARS} characters", "stop")
    temperature = _float_field(body, "temperature", 1.0, lambda v: 0 <= v <= MAX_TEMPERATURE, f"a number in [0, {MAX_TEMPERATURE:g}]")
    top_p = _float_field(body, "top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = _int_field(body, "top_k", 0, 0, None, " (0: no limit)")
    seed = _int_field(body, "seed", None, 0, 2**63 - 1)
    try:
        sampling = SamplingParams(temperature, top_k, top_p, seed)
    except ValueError as e:  # the fields were checked above; this is the dataclass's own word
        raise BadRequest(str(e)) from None
    prompts = _prompts(body.get("prompt"))
    if len(prompts) > MAX_PROMPTS:
        raise BadRequest(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", "prompt")
    requests = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if context is not None and max_chars_per_token and len(prompt) > context * max_chars_per_token:
                raise BadRequest(f"a prompt of {len(prompt):,} characters cannot fit the context of {context} tokens", "prompt")
            ids = encode_prompt(tokenizer, prompt)
        else:
            if any(not 0 <= t < vocab_size for t in prompt):
                raise BadRequest(f"prompt token ids must be in [0, {vocab_size})", "prompt")
            ids = list(prompt)
        if context is not None and len(ids) + max_tokens > context:
            if len(ids) + (1 if max_tokens else 0) > context:
                raise BadRequest(f"the prompt of {len(ids)} tokens does not fit the context of {context} tokens", "prompt")
            raise BadRequest(
                f"prompt of {len(ids)} tokens + max_tokens {max_tokens} = {len(ids) + max_tokens} exceeds the context of {context} tokens", "max_tokens"
            )
        try:
            requests.append(Request(ids, max_tokens, sampling, stops, logprobs=logprobs, score_prompt=echo and logprobs is not None))
        except ValueError as e:
            raise BadRequest(str(e), "prompt") from None
    return Completion(requests, stream, echo, include_usage)


def _piece(tokenizer, token_id: int) -> str:
    """A token's own text, as a top_logprobs key (unique per token: SentencePiece's piece with
    its word-start mark read as a space; byte and control pieces as written, e.g. <0xE2>)."""
    to_piece = getattr(tokenizer, "id_to_piece", None)
    if to_piece is None:
        return tokenizer.decode([token_id])
    piece = to_piece(token_id)
    if tokenizer.is_byte(token_id) or tokenizer.is_control(token_id) or tokenizer.is_unknown(token_id):
        return piece
    return piece.replace("\u2581", " ")


def logprobs_block(tokenizer, req: Request, first: int, upto: int, text: str, begin: int, origin: int) -> dict:
    """OpenAI's ``logprobs`` object for the tokens ``first:upto`` of the request's prompt +
    generated tokens, which make up ``text[begin:]``; ``text_offset`` counts from ``origin`` in
    ``text`` (0 with echo, where a choice's text starts with the prompt; else the prompt's end)."""
    n = len(req.prompt_ids)
    ids = req.prompt_ids + req.generated[: upto - n]
    values = (req.prompt_logprobs if req.score_prompt else [None] * n) + req.token_logprobs[: upto - n]
    tops = (req.prompt_top_logprobs if req.score_prompt else [None] * n) + req.top_logprobs[: upto - n]
    pieces = token_texts(tokenizer.decode, ids, first, text, begin)
    offsets, at = [], begin - origin
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    top = [None if t is None else {_piece(tokenizer, i): v for i, v in t} for t in tops[first:upto]]
    return {"tokens": pieces, "token_logprobs": values[first:upto], "top_logprobs": top, "text_offset": offsets}


def choice(tokenizer, req: Request, index: int, echo: bool) -> dict:
    """One finished request as a choice of a (non-streamed) completion."""
    prompt_text = req.prompt_text or ""
    whole = prompt_text + req.text
    out: dict[str, Any] = {"text": whole if echo else req.text, "index": index, "logprobs": None, "finish_reason": req.finish_reason}
    if req.logprobs is not None:
        n = len(req.prompt_ids)
        first, begin = (0, 0) if echo else (n, len(prompt_text))
        out["logprobs"] = logprobs_block(tokenizer, req, first, n + len(req.generated), whole, begin, begin)
    return out


# ---------------------------------------------------------------- tokenizer endpoints


def _control_pieces(tokenizer) -> dict[str, int]:
    """The texts of the tokenizer's BOS and EOS tokens (``<s>``, ``</s>``) -> their ids."""
    out = {}
    for token_id in (tokenizer.bos_id(), tokenizer.eos_id()):
        if 0 <= token_id < tokenizer.get_piece_size():
            out[tokenizer.id_to_piece(token_id)] = token_id
    return out


def tokenize(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of ``text`` for /tokenize: BOS first with ``add_special_tokens`` (as a completion's
    string prompt gets it), and the BOS and EOS texts written in ``text`` read as those tokens (as
    Hugging Face tokenizers read special tokens, so that a client can look their ids up)."""
    controls = _control_pieces(tokenizer)
    ids: list[int] = []
    if controls:
        parts = re.split("(" + "|".join(re.escape(c) for c in sorted(controls, key=len, reverse=True)) + ")", text)
    else:
        parts = [text]
    for part in parts:
        if part in controls:
            ids.append(controls[part])
        elif part:
            ids += list(tokenizer.encode(part))
    bos = tokenizer.bos_id()
    return ([bos] if add_special_tokens and bos >= 0 else []) + ids


def tokenizer_info(tokenizer, model_name: str, context: int) -> dict:
    def piece(token_id: int) -> str | None:
        return tokenizer.id_to_piece(token_id) if 0 <= token_id < tokenizer.get_piece_size() else None

    return {
        "model": model_name,
        "tokenizer_class": "SentencePieceProcessor",
        "vocab_size": tokenizer.get_piece_size(),
        "bos_token": piece(tokenizer.bos_id()),
        "eos_token": piece(tokenizer.eos_id()),
        "pad_token": piece(tokenizer.pad_id()),
        "unk_token": piece(tokenizer.unk_id()),
        "model_max_length": context,
        "add_bos_token": True,
    }


def _only(body: Any, fields: set[str]) -> dict:
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {_describe(body)}")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}", unknown[0])
    return body


# ---------------------------------------------------------------- the application


def build_app(engine: Engine, tokenizer, config: ServerConfig):
    """The starlette application (the engine thread starts and stops with its lifespan)."""
    from starlette.applications import Starlette
    from starlette.requests import Request as HttpRequest
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    runner = EngineThread(engine)
    created = int(time.time())
    vocab_size = engine.model.config.vocab_size
    context = engine.max_len
    max_chars = max((len(tokenizer.id_to_piece(i)) for i in range(tokenizer.get_piece_size())), default=1) if hasattr(tokenizer, "id_to_piece") else None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        runner.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, runner.stop)

    async def health(_: HttpRequest):
        ok = runner.healthy
        payload = {"status": "ok" if ok else "error", "pending": engine.pending(), "error": None if ok else (runner.error or "the engine is not running")}
        payload["engine_faults"], payload["last_error"] = runner.faults, runner.error
        return JSONResponse(payload, status_code=200 if ok else 503 if runner.stopping else 500)

    async def models(_: HttpRequest):
        return JSONResponse({"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created, "owned_by": "loopgolf"}]})

    async def read(http: HttpRequest, started: float) -> Any:
        return parse_json(await read_body(http, config, started))

    async def info(_: HttpRequest):
        return JSONResponse(tokenizer_info(tokenizer, config.model_name, context))

    async def tokenize_route(http: HttpRequest):
        try:
            body = _only(await read(http, time.monotonic()), {"model", "prompt", "add_special_tokens"})
            if body.get("model") not in (None, config.model_name):
                raise BadRequest(
                    f"model {_describe(body.get('model'))} is not served here; this server serves {config.model_name!r}", "model", 404, "not_found_error"
                )
            text, special = body.get("prompt"), body.get("add_special_tokens", True)
            if not isinstance(text, str):
                raise BadRequest(f"'prompt' must be a string, got {_describe(text)}", "prompt")
            if not isinstance(special, bool):
                raise BadRequest(f"'add_special_tokens' must be true or false, got {_describe(special)}", "add_special_tokens")
        except BadRequest as e:
            return _error(str(e), e.status, e.param, e.kind, e.close)
        ids = tokenize(tokenizer, text, special)
        return JSONResponse({"count": len(ids), "max_model_len": context, "tokens": ids})

    async def detokenize_route(http: HttpRequest):
        try:
            body = _only(await read(http, time.monotonic()), {"model", "tokens"})
            if body.get("model") not in (None, config.model_name):
                raise BadRequest(
                    f"model {_describe(body.get('model'))} is not served here; this server serves {config.model_name!r}", "model", 404, "not_found_error"
                )
            ids = body.get("tokens")
            if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
                raise BadRequest(f"'tokens' must be a list of token ids, got {_describe(ids)}", "tokens")
            if any(not 0 <= t < vocab_size for t in ids):
                raise BadRequest(f"token ids must be in [0, {vocab_size})", "tokens")
        except BadRequest as e:
            return _error(str(e), e.status, e.param, e.kind, e.close)
        return JSONResponse({"prompt": tokenizer.decode(ids)})

    async def completions(http: HttpRequest):
        started = time.monotonic()
        deadline = started + config.request_timeout
        try:
            parsed = parse_completion(await read(http, started), tokenizer, config.model_name, vocab_size, context, max_chars)
        except BadRequest as e:
            return _error(str(e), e.status, e.param, e.kind, e.close)
        reqs, echo = parsed.requests, parsed.echo
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()
        for i, req in enumerate(reqs):
            req.on_event = lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev))
        try:
            for req in reqs:
                engine.submit(req)
        except (QueueFull, ValueError) as e:
            for req in reqs:
                engine.cancel(req)
            if isinstance(e, QueueFull):
                return _error(f"the server is busy: {e}; retry later", 429, kind="rate_limit_error")
            return _error(str(e), 400, "prompt")  # the engine's own checks (context length, token ids)
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"

        def cancel_all() -> None:
            for req in reqs:
                if not req.finished:
                    engine.cancel(req)

        def usage() -> dict:
            p = sum(len(r.prompt_ids) for r in reqs)
            n = sum(len(r.generated) for r in reqs)
            return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

        def envelope(choices: list[dict]) -> dict:
            return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": config.model_name, "choices": choices}

        async def next_event() -> tuple[int, TokenEvent]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(events.get(), timeout=left)

        timeout_message = f"the request took longer than {config.request_timeout:g} s and was cancelled"
        if not parsed.stream:
            try:
                while not all(r.finished for r in reqs):
                    await next_event()
            except asyncio.TimeoutError:
                cancel_all()
                return _error(timeout_message, 504, kind="timeout")
            except asyncio.CancelledError:
                cancel_all()
                raise
            failed = [r for r in reqs if r.finish_reason == "error"]
            if failed:
                cancel_all()
                return _error(failed[0].error or "engine error", 500, kind="server_error")
            if any(r.finish_reason == "cancelled" for r in reqs):
                return _error("the request was cancelled (the server is shutting down)", 503, kind="server_error")
            out = envelope([choice(tokenizer, r, i, echo) for i, r in enumerate(reqs)])
            out["usage"] = usage()
            loops = [x for r in reqs for x in r.loops]
            out["loopgolf"] = {"mean_loops": sum(loops) / max(1, len(loops)), "loops": reqs[0].loops if len(reqs) == 1 else [r.loops for r in reqs]}
            return JSONResponse(out)

        def sse(payload: dict) -> bytes:
            return f"data: {json.dumps(payload)}\n\n".encode()

        async def stream() -> AsyncIterator[bytes]:
            seen = [0] * len(reqs)  # tokens each choice has had events for
            sent = [len(r.prompt_ids) for r in reqs]  # index (prompt + generated) of each choice's next token to report
            streamed = [""] * len(reqs)  # completion text sent so far
            started_choice = [False] * len(reqs)
            open_choices = len(reqs)
            try:
                while open_choices:
                    try:
                        i, ev = await next_event()
                    except asyncio.TimeoutError:
                        cancel_all()
                        yield sse({"error": {"message": timeout_message, "type": "timeout"}})
                        break
                    req = reqs[i]
                    if ev.finish_reason in ("error", "cancelled"):
                        cancel_all()
                        yield sse({"error": {"message": _safe(req.error or f"the request was {ev.finish_reason}"), "type": "server_error"}})
                        break
                    n = len(req.prompt_ids)
                    prompt_text = req.prompt_text or ""
                    if not started_choice[i]:
                        started_choice[i] = True
                        if echo:  # the prompt first, with its log-probabilities
                            c = {"text": prompt_text, "index": i, "logprobs": None, "finish_reason": None}
                            if req.logprobs is not None:
                                c["logprobs"] = logprobs_block(tokenizer, req, 0, n, prompt_text, 0, 0)
                            yield sse(envelope([c]))
                    if ev.token_id >= 0:
                        seen[i] += 1
                    if ev.text or ev.finish_reason:
                        before = len(prompt_text) + len(streamed[i])
                        streamed[i] += ev.text
                        c = {"text": ev.text, "index": i, "logprobs": None, "finish_reason": ev.finish_reason}
                        upto = n + seen[i]
                        if req.logprobs is not None and upto > sent[i]:
                            c["logprobs"] = logprobs_block(tokenizer, req, sent[i], upto, prompt_text + streamed[i], before, 0 if echo else len(prompt_text))
                            sent[i] = upto
                        elif req.logprobs is not None:
                            c["logprobs"] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                        yield sse(envelope([c]))
                    if ev.finish_reason is not None:
                        open_choices -= 1
                else:
                    if parsed.include_usage:
                        final = envelope([])
                        final["usage"] = usage()
                        yield sse(final)
                yield b"data: [DONE]\n\n"
            finally:  # a client that went away (or a server that stops) frees the slots
                cancel_all()

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    routes = [
        Route("/health", health),
        Route("/v1/models", models),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/tokenizer_info", info),
        Route("/tokenize", tokenize_route, methods=["POST"]),
        Route("/detokenize", detokenize_route, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.engine_thread = runner
    return app


def _deadline_protocol(read_timeout: float):
    """uvicorn's HTTP protocol with a deadline for a request's headers: a connection that has
    not sent a whole request head within ``read_timeout`` seconds of opening (or of its last
    response) is closed. uvicorn itself only times out idle keep-alive connections, so a client
    that sends part of a head and then nothing would hold its connection forever."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class DeadlineProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_read_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_read_deadline()

        def _arm_read_deadline(self) -> None:
            waiting_after = getattr(self, "cycle", None)  # no new request since this one: still waiting for a head

            def expire() -> None:
                transport = getattr(self, "transport", None)
                if getattr(self, "cycle", None) is waiting_after and transport is not None and not transport.is_closing():
                    transport.close()

            self.loop.call_later(read_timeout, expire)

    return DeadlineProtocol


def uvicorn_config(app, config: ServerConfig, **kwargs):
    """The uvicorn configuration :func:`serve` runs ``app`` with (tests use it too)."""
    import uvicorn

    options: dict[str, Any] = dict(host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=config.shutdown_grace)
    try:
        options["http"] = _deadline_protocol(config.read_deadline)
    except (ImportError, AttributeError):  # another uvicorn layout: its default protocol, without the head deadline
        pass
    options.update(kwargs)
    return uvicorn.Config(app, **options)


def serve(engine: Engine, tokenizer, config: ServerConfig) -> None:
    """Run the server until SIGINT/SIGTERM (uvicorn's signal handling, graceful shutdown)."""
    import uvicorn

    app = build_app(engine, tokenizer, config)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal at the
    # previous handler; with the default one the process would die by the signal (exit -15)
    # after a clean shutdown. Handlers that ignore it let serve() return and the CLI exit 0.
    grace = config.shutdown_grace
    engine_thread: EngineThread = app.state.engine_thread

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            # uvicorn waits ``grace`` seconds for open responses, then drops them mid-stream; a
            # little before that, end the requests still running so that each client is told
            # it was cancelled (an error event, or a 503) rather than cut off silently.
            if not self.should_exit:
                timer = threading.Timer(max(grace / 2, grace - 1.0), engine_thread.cancel_all, ("the server is shutting down",))
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        Server(uvicorn_config(app, config)).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

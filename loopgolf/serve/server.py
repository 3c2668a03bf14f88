"""An OpenAI-style completions server over one :class:`~loopgolf.serve.engine.Engine`.

``POST /v1/completions`` (``stream`` as server-sent events), ``GET /v1/models``, ``GET /health``,
on starlette + uvicorn, localhost by default. The engine steps on its own thread; each request
waits on an asyncio queue its tokens are posted to. Bounded: a full waiting queue answers 429, a
request that runs past ``request_timeout`` is cancelled (504, or an error event on a stream), and
malformed JSON, unknown fields, oversized prompts and bad sampling parameters answer 400 with a
message in OpenAI's error shape. SIGTERM stops accepting, lets in-flight requests finish for up
to ``shutdown_grace`` seconds, then cancels the rest and stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
from loopgolf.serve.request import Request, TokenEvent
from loopgolf.serve.sampling import SamplingParams

MAX_STOP_STRINGS = 4  # as OpenAI's API
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
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


@dataclass
class ServerConfig:
    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    request_timeout: float = 120.0  # seconds a request may take, queueing included
    shutdown_grace: float = 10.0  # seconds in-flight requests get to finish on SIGTERM
    max_body_bytes: int = 1 << 20


class EngineThread:
    """Steps the engine whenever it has work, on one thread (torch ops stay off the event loop)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.stopping = False
        self.cancel_message: str | None = None  # set from another thread: end every request at the next step
        self.error: str | None = None
        self.thread = threading.Thread(target=self._loop, name="loopgolf-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _loop(self) -> None:
        eng = self.engine
        with torch.inference_mode():
            while True:
                with eng.wakeup:
                    while eng.idle and not self.stopping and self.cancel_message is None:
                        eng.wakeup.wait(timeout=0.5)
                    message, self.cancel_message = self.cancel_message, None
                if self.stopping:
                    break
                if message is not None:
                    eng.fail_all(message, reason="cancelled")
                    continue
                try:
                    eng.step()
                except Exception as e:  # the engine cannot go on: fail every request, keep serving errors
                    self.error = f"{type(e).__name__}: {e}"
                    eng.fail_all(f"engine error: {self.error}")

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


def _error(message: str, status: int, param: str | None = None, kind: str = "invalid_request_error"):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def _number(body: dict, key: str, default: Any, kind: type) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else isinstance(value, int) and not isinstance(value, bool)
    if not ok:
        raise BadRequest(f"'{key}' must be {'a number' if kind is float else 'an integer'}, got {json.dumps(value)[:40]}", key)
    return value


def parse_completion(body: Any, tokenizer, model_name: str, vocab_size: int) -> tuple[Request, bool]:
    """The request and whether to stream, from a /v1/completions body; BadRequest otherwise."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - COMPLETION_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)}", unknown[0])
    if body.get("model") not in (None, model_name):
        raise BadRequest(f"model {body.get('model')!r} is not served here; this server serves {model_name!r}", "model", 404, "not_found_error")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = encode_prompt(tokenizer, prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t < vocab_size for t in prompt):
            raise BadRequest(f"prompt token ids must be in [0, {vocab_size})", "prompt")
        ids = list(prompt)
    else:
        raise BadRequest("'prompt' must be a string, a list of one string, or a non-empty list of token ids", "prompt")
    for key, allowed in (("n", 1), ("best_of", 1)):
        if body.get(key) not in (None, allowed):
            raise BadRequest(f"only {key}=1 is supported", key)
    for key in ("echo",):
        if body.get(key) not in (None, False):
            raise BadRequest(f"'{key}' is not supported", key)
    for key in ("logprobs", "suffix", "logit_bias"):
        if body.get(key) is not None:
            raise BadRequest(f"'{key}' is not supported", key)
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0, float) != 0:
            raise BadRequest(f"'{key}' is not supported (only 0)", key)
    max_tokens = _number(body, "max_tokens", 16, int)
    if max_tokens < 1:
        raise BadRequest(f"'max_tokens' must be >= 1, got {max_tokens}", "max_tokens")
    stop = body.get("stop")
    stops: tuple[str, ...] = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else ()
    if stop is not None and (not isinstance(stop, (str, list)) or len(stops) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in stops)):
        raise BadRequest(f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    try:
        sampling = SamplingParams(
            float(_number(body, "temperature", 1.0, float)),
            _number(body, "top_k", 0, int),
            float(_number(body, "top_p", 1.0, float)),
            _number(body, "seed", None, int),
        )
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return Request(ids, max_tokens, sampling, stops), stream


def build_app(engine: Engine, tokenizer, config: ServerConfig):
    """The starlette application (the engine thread starts and stops with its lifespan)."""
    from starlette.applications import Starlette
    from starlette.requests import Request as HttpRequest
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    runner = EngineThread(engine)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        runner.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, runner.stop)

    async def health(_: HttpRequest):
        status = "error" if runner.error else "ok"
        return JSONResponse({"status": status, "pending": engine.pending(), "error": runner.error}, status_code=200 if not runner.error else 500)

    async def models(_: HttpRequest):
        return JSONResponse({"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created, "owned_by": "loopgolf"}]})

    async def completions(http: HttpRequest):
        raw = await http.body()
        if len(raw) > config.max_body_bytes:
            return _error(f"request body of {len(raw)} bytes is over the {config.max_body_bytes}-byte limit", 413)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(f"malformed JSON: {e}", 400)
        try:
            req, stream = parse_completion(body, tokenizer, config.model_name, engine.model.config.vocab_size)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[TokenEvent] = asyncio.Queue()
            req.on_event = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
            engine.submit(req)
        except BadRequest as e:
            return _error(str(e), e.status, e.param, e.kind)
        except QueueFull as e:
            return _error(f"the server is busy: {e}; retry later", 429, kind="rate_limit_error")
        except ValueError as e:  # the engine's own checks (context length, token ids)
            return _error(str(e), 400, "prompt")
        cid, deadline = f"cmpl-{uuid.uuid4().hex[:24]}", time.monotonic() + config.request_timeout

        def chunk(text: str, finish: str | None) -> dict:
            return {
                "id": cid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": config.model_name,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            }

        def usage() -> dict:
            n = len(req.generated)
            return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n, "total_tokens": len(req.prompt_ids) + n}

        async def next_event() -> TokenEvent:
            left = deadline - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(events.get(), timeout=left)

        if not stream:
            try:
                while (await next_event()).finish_reason is None:
                    pass
            except asyncio.TimeoutError:
                engine.cancel(req)
                return _error(f"the request took longer than {config.request_timeout:g} s and was cancelled", 504, kind="timeout")
            except asyncio.CancelledError:
                engine.cancel(req)
                raise
            if req.finish_reason == "error":
                return _error(req.error or "engine error", 500, kind="server_error")
            if req.finish_reason == "cancelled":
                return _error("the request was cancelled (the server is shutting down)", 503, kind="server_error")
            out = chunk(req.text, req.finish_reason)
            out["usage"] = usage()
            out["loopgolf"] = {"mean_loops": sum(req.loops) / max(1, len(req.loops)), "loops": req.loops}
            return JSONResponse(out)

        async def sse() -> AsyncIterator[bytes]:
            try:
                while True:
                    try:
                        ev = await next_event()
                    except asyncio.TimeoutError:
                        engine.cancel(req)
                        err = {"error": {"message": f"the request took longer than {config.request_timeout:g} s and was cancelled", "type": "timeout"}}
                        yield f"data: {json.dumps(err)}\n\n".encode()
                        break
                    if ev.finish_reason in ("error", "cancelled"):
                        err = {"error": {"message": req.error or f"the request was {ev.finish_reason}", "type": "server_error"}}
                        yield f"data: {json.dumps(err)}\n\n".encode()
                        break
                    if ev.token_id >= 0 and (ev.text or ev.finish_reason):
                        yield f"data: {json.dumps(chunk(ev.text, ev.finish_reason))}\n\n".encode()
                    if ev.finish_reason is not None:
                        break
                yield b"data: [DONE]\n\n"
            finally:  # a client that went away (or a server that stops) frees the slot
                if not req.finished:
                    engine.cancel(req)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    routes = [Route("/health", health), Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.engine_thread = runner
    return app


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
        uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=grace)
        Server(uv_config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

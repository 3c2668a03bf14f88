"""Fuzz `loopgolf serve` over HTTP with malformed and extreme requests while victims stream.

A tiny random model and a small byte-fallback tokenizer (trained here on synthetic text, or
``--model``/``--tokenizer``) are served by a real ``loopgolf serve`` process on a free localhost
port. Case i (``numpy.random.default_rng([seed, i])``, class ``CLASSES[i % len(CLASSES)]``) sends
one hostile request, on its own socket, bytes as written:

  bad_json           truncated, garbage, trailing text, BOMs, non-objects, invalid UTF-8
  wrong_types        a known field with a value of the wrong type
  nan_inf            NaN, Infinity, 1e400 where numbers go
  huge_numbers       integers of 18 to 5,000 digits, 2^63, 2^64, float extremes
  deep_nesting       [[[...]]] and {"a": {...}} 100 to 100,000 levels deep, whole or in a field
  surrogates         lone and reversed surrogates, NUL, pairs, odd Unicode in every string field
  huge_bodies        Content-Length 1.5 GB (nothing sent), bodies just over the limit, chunked floods
  slow_bodies        a head or a body half sent then silence, a body dribbled past the deadline
  missing_fields     no prompt, null prompt, empty prompts, empty bodies
  unknown_fields     a valid request with fields the API does not have
  extreme_sampling   temperature, top_p, top_k, seed and max_tokens at and past their bounds
  echo_logprobs      echo x logprobs x max_tokens 0/1/3 x stream x prompt forms (the contract checked)
  http_protocol      wrong methods and paths, garbage request lines, bad Content-Length, pipelining
  tokenizer          /tokenize, /detokenize and /tokenizer_info with bad and odd input
  disconnects        streams the client abandons after the first chunk, or before any

Meanwhile ``--victims`` threads stream greedy completions whose text is known (computed with the
Generator in this process) and check each one ends whole and equal. Outcomes per class:

  ok             2xx whose body keeps the API's contract (JSON, choices, logprobs aligned, SSE ends)
  clean_4xx      4xx with a JSON error (or the HTTP layer's plain 4xx for protocol garbage)
  closed         the server closed the connection without answering (allowed for half-sent
                 heads and floods only; elsewhere it counts as dropped)
  5xx, traceback (a Python traceback in the server's log), hang (no answer in time),
  bad_response (2xx breaking the contract, a 4xx without the error shape, a refused value
  accepted, a dropped connection), victim_broken (a victim stream that failed or differed while
  this class ran)

At the end the server must answer /health 200 with nothing pending, and exit 0 on SIGTERM.

    python -m loopgolf.bench.fuzz_server --cases 400 [--seed 0] [--json] [--victims 2]
    python -m loopgolf.bench.fuzz_server --seed 0 --case 17 -v       # replay one case

Exit status 1 if any bad outcome occurred.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

OUTCOMES = ("ok", "clean_4xx", "closed", "5xx", "traceback", "hang", "bad_response", "victim_broken")
BAD = ("5xx", "traceback", "hang", "bad_response", "victim_broken")
CONTEXT = 128
READ_TIMEOUT = 1.0  # the server's --read-timeout: slow cases take about this long
MAX_BODY = 1 << 20  # the server's default --max-body-bytes

WORDS = (
    "the model stores a few unique blocks and runs them many times while each loop adds depth without adding bytes "
    "data flows through attention and mlp sublayers with residual mixes scales and gains café naïve déjà vu "
    "日本語 中文 emoji 😀 🚀 über straße"
).split()


# ---------------------------------------------------------------- the served model


def synthetic_text(n_docs: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) for _ in range(n_docs)]


def build_model(folder: Path, seed: int) -> tuple[Path, Path]:
    """A random tiny cycle model (every parameter drawn, so its text varies) over a 320-piece
    byte-fallback tokenizer trained on synthetic text; returns (artifact, tokenizer)."""
    import torch

    from loopgolf.data.tokenizer import train_tokenizer
    from loopgolf.export.pack import export_model
    from loopgolf.model.gpt import GPT, ModelConfig
    from loopgolf.model.plan import PlanSpec

    tok = train_tokenizer(synthetic_text(300, seed), 320, folder / "tokenizer", byte_fallback=True, seed=seed)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tok)).get_piece_size()
    torch.manual_seed(seed)
    model = GPT(
        ModelConfig(vocab_size=vocab, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2, max_seq_len=CONTEXT, plan=PlanSpec("cycle", layers=2, loops=2))
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    path = folder / "model.lgz"
    export_model(model, path, bits=8)
    return path, tok


# ---------------------------------------------------------------- raw HTTP


@dataclass
class Reply:
    status: int | None = None  # None: closed without a response
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hang: bool = False
    seconds: float = 0.0


def exchange(port: int, parts: list[tuple[float, bytes]], timeout: float, method: str = "POST", close_after: int | None = None) -> Reply:
    """Send ``parts`` (each after its delay in seconds) on a new connection and read one response.
    ``close_after``: hang up after that many body bytes of the response (0: before reading)."""
    t0 = time.monotonic()
    reply = Reply()
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError:
        reply.seconds = time.monotonic() - t0
        return reply
    with sock:
        for delay, data in parts:
            if delay:
                time.sleep(delay)
            try:
                sock.sendall(data)
            except OSError:  # the server refused early and closed: read what it said
                break
        if close_after == 0:
            reply.seconds = time.monotonic() - t0
            return reply
        resp = http.client.HTTPResponse(sock, method=method)
        try:
            resp.begin()
            reply.status = resp.status
            reply.headers = {k.lower(): v for k, v in resp.getheaders()}
            if close_after is not None:
                reply.body = resp.read(close_after)
            else:
                reply.body = resp.read()
        except TimeoutError:
            reply.hang = True
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            pass
        except http.client.IncompleteRead as e:
            reply.body = e.partial
        except (http.client.HTTPException, OSError):
            pass
    reply.seconds = time.monotonic() - t0
    return reply


def request_bytes(path: str, body: bytes, *, method: str = "POST", headers: dict[str, str] | None = None, length: bool = True) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if length and "Transfer-Encoding" not in hdrs and "Content-Length" not in hdrs:
        hdrs["Content-Length"] = str(len(body))
    head += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def dumps(value: Any) -> bytes:
    """JSON text of ``value`` as a client might write it (NaN, surrogates and all)."""
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()


# ---------------------------------------------------------------- the contract a 2xx keeps


def check_logprobs(block: Any, text: str) -> str | None:
    if not isinstance(block, dict) or set(block) != {"tokens", "token_logprobs", "top_logprobs", "text_offset"}:
        return f"logprobs is not the OpenAI object: {str(block)[:200]}"
    n = len(block["tokens"])
    if not (len(block["token_logprobs"]) == len(block["top_logprobs"]) == len(block["text_offset"]) == n):
        return "logprobs arrays differ in length"
    if "".join(block["tokens"]) != text:
        return f"tokens {block['tokens'][:8]}... do not add up to the text {text[:60]!r}"
    for tok, off, lp in zip(block["tokens"], block["text_offset"], block["token_logprobs"]):
        if text[off : off + len(tok)] != tok:
            return f"text_offset {off} does not point at {tok!r}"
        if lp is not None and not (isinstance(lp, float) and lp <= 0):
            return f"token logprob {lp!r} is not a number <= 0"
    return None


def check_completion(reply: Reply, stream: bool) -> str | None:
    """None when a 2xx completion keeps the contract; else what is wrong."""
    try:
        if not stream:
            body = json.loads(reply.body)
            if not isinstance(body.get("choices"), list) or not body["choices"]:
                return "no choices"
            for c in body["choices"]:
                if not isinstance(c.get("text"), str) or c.get("finish_reason") not in ("length", "stop"):
                    return f"bad choice {str(c)[:200]}"
                if c.get("logprobs") is not None:
                    problem = check_logprobs(c["logprobs"], c["text"])
                    if problem:
                        return problem
            return None
        text = reply.body.decode("utf-8")
        if not text.endswith("data: [DONE]\n\n"):
            return f"stream does not end with [DONE]: {text[-200:]!r}"
        events = [e for e in text.split("\n\n") if e.startswith("data: {")]
        finished = 0
        for e in events:
            payload = json.loads(e[6:])
            if "error" in payload:
                return f"error event: {payload['error']}"
            for c in payload.get("choices", []):
                if c.get("logprobs") is not None:
                    lp = c["logprobs"]
                    if "".join(lp.get("tokens", [])) != c["text"]:
                        return "a chunk's logprob tokens do not add up to its text"
                finished += c.get("finish_reason") is not None
        return None if finished else "no chunk carries a finish_reason"
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unparseable 2xx body ({type(e).__name__}: {e}): {reply.body[:200]!r}"


def classify(
    reply: Reply, *, stream: bool = False, must_refuse: bool = False, may_close: bool = False, json_errors: bool = True, check=None
) -> tuple[str, str | None]:
    if reply.hang:
        return "hang", f"no answer in {reply.seconds:.1f} s"
    if reply.status is None:
        return ("closed", None) if may_close else ("bad_response", "the connection was dropped without an answer")
    if reply.status >= 500:
        return "5xx", f"{reply.status}: {reply.body[:300]!r}"
    if 400 <= reply.status < 500:
        try:
            err = json.loads(reply.body)["error"]
            if isinstance(err.get("message"), str) and err["message"]:
                return "clean_4xx", None
        except (ValueError, KeyError, TypeError):
            pass
        if not json_errors:
            return "clean_4xx", None
        return "bad_response", f"{reply.status} without a JSON error: {reply.body[:200]!r}"
    if must_refuse:
        return "bad_response", f"accepted ({reply.status}) what must be refused: {reply.body[:200]!r}"
    problem = check(reply) if check is not None else check_completion(reply, stream)
    return ("bad_response", problem) if problem else ("ok", None)


# ---------------------------------------------------------------- case classes


@dataclass
class Case:
    klass: str
    description: str
    parts: list[tuple[float, bytes]]
    path: str = "/v1/completions"
    method: str = "POST"
    stream: bool = False
    must_refuse: bool = False
    may_close: bool = False
    json_errors: bool = True
    timeout: float = 20.0
    background: bool = False  # slow: run beside the others
    close_after: int | None = None
    check: Any = None


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _valid(rng: np.random.Generator) -> dict:
    body: dict[str, Any] = {"prompt": _pick(rng, ["the model", "data flows", "café 😀", ""]), "max_tokens": int(rng.integers(1, 4)), "temperature": 0}
    return body


def _case(klass: str, description: str, body: bytes, **kw) -> Case:
    path = kw.pop("path", "/v1/completions")
    return Case(klass, description, [(0.0, request_bytes(path, body))], path=path, **kw)


NUMERIC = ["max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs", "n", "best_of", "presence_penalty", "frequency_penalty"]
FIELDS = ["prompt", "stop", "stream", "echo", "model", "user", "suffix", "logit_bias", "stream_options", *NUMERIC]
WRONG = [{}, {"a": 1}, [], [1, "x"], [[1]], "", "x", "1", True, False, 1.5, -1, 0, [None], {"include_usage": "yes"}, ["a"] * 5, [""], 2**31]


def gen_bad_json(rng, ctx) -> Case:
    good = dumps(_valid(rng))
    cut = int(rng.integers(1, len(good)))
    options = [
        ("truncated", good[:cut]),
        ("garbage bytes", bytes(rng.integers(0, 256, size=int(rng.integers(1, 200))).astype(np.uint8))),
        ("trailing text", good + b" x"),
        ("single quotes", b"{'prompt': 'x'}"),
        ("trailing comma", b'{"prompt": "x",}'),
        ("empty", b""),
        ("whitespace", b" \n\t "),
        ("null", b"null"),
        ("a list", b"[1, 2]"),
        ("a string", b'"the model"'),
        ("a number", b"123"),
        ("UTF-8 BOM", b"\xef\xbb\xbf" + good),
        ("UTF-16", json.dumps(_valid(rng)).encode("utf-16")),
        ("invalid UTF-8 in a string", b'{"prompt": "a\xff\xfeb"}'),
        ("overlong UTF-8", b'{"prompt": "\xc0\xaf"}'),
        ("unterminated string", b'{"prompt": "x'),
        ("duplicate keys", b'{"prompt": "x", "prompt": 5}'),
        ("comment", b'{"prompt": "x" /* hi */}'),
    ]
    name, body = _pick(rng, options)
    return _case("bad_json", name, body, must_refuse=True)


def gen_wrong_types(rng, ctx) -> Case:
    body = _valid(rng)
    key, value = _pick(rng, FIELDS), _pick(rng, WRONG)
    body[key] = value
    return _case("wrong_types", f"{key} = {json.dumps(value)[:60]}", dumps(body), stream=body.get("stream") is True)


def gen_nan_inf(rng, ctx) -> Case:
    key = _pick(rng, NUMERIC)
    value = _pick(rng, ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1E+99999"])
    body = dumps(_valid(rng))[:-1] + f', "{key}": {value}}}'.encode()
    return _case("nan_inf", f"{key} = {value}", body, must_refuse=True)


def gen_huge_numbers(rng, ctx) -> Case:
    key = _pick(rng, NUMERIC + ["prompt"])
    digits = int(_pick(rng, [18, 19, 20, 63, 64, 65, 100, 4299, 4300, 4301, 5000]))
    sign = _pick(rng, ["", "-"])
    value = _pick(
        rng,
        [
            sign + "9" * digits,
            sign + "1" + "0" * (digits - 1),
            str(2**63),
            str(2**64),
            str(2**63 - 1),
            "1e308",
            "1.7976931348623157e308",
            "-1e308",
            "5e-324",
            "1e-320",
            "0." + "0" * digits + "1",
            "1" + "0" * digits + ".0",
        ],
    )
    if key == "prompt":
        raw = b'{"prompt": [1, ' + value.encode() + b'], "max_tokens": 1}'
    else:
        raw = dumps(_valid(rng))[:-1] + f', "{key}": {value}}}'.encode()
    return _case("huge_numbers", f"{key} = {value[:30]}{'...' if len(value) > 30 else ''} ({len(value)} chars)", raw)


def gen_deep_nesting(rng, ctx) -> Case:
    depth = int(_pick(rng, [100, 900, 999, 1000, 1001, 5000, 100_000, 400_000]))
    kind = _pick(rng, ["list", "object", "mixed"])
    if kind == "list":
        inner = b"[" * depth + b"]" * depth
    elif kind == "object":
        inner = b'{"a":' * depth + b"1" + b"}" * depth
    else:
        inner = b'[{"a":' * (depth // 2) + b"1" + b"}]" * (depth // 2)
    where = _pick(rng, ["whole", "prompt", "stop", "user", "logit_bias"])
    raw = inner if where == "whole" else b'{"prompt": "x", "max_tokens": 1, "' + where.encode() + b'": ' + inner + b"}"
    if where == "prompt":
        raw = b'{"prompt": ' + inner + b', "max_tokens": 1}'
    return _case("deep_nesting", f"{kind} {depth} deep in {where}", raw, must_refuse=depth >= 100 or where != "whole")


def gen_surrogates(rng, ctx) -> Case:
    lone = ["\\ud800", "\\udfff", "\\udc00\\ud800", "a\\ud83d", "\\ud83db", "x\\udbff\\udbff"]
    fine = ["\\ud83d\\ude00", "\\u0000", "\\u001b[31m", "\\u202e", "e\\u0301", "\\ufeff", "\\uffff", "\\u2581", "a" * 300]
    bad = rng.random() < 0.6
    text = _pick(rng, lone if bad else fine)
    where = _pick(rng, ["prompt", "stop", "model", "user", "key", "prompt_list"])
    body = dumps(_valid(rng)).decode()[:-1]
    if where == "key":
        raw = body + f', "{text}": 1}}'
    elif where == "prompt_list":
        raw = '{"prompt": ["ok", "' + text + '"], "max_tokens": 1}'
    elif where == "prompt":
        raw = '{"prompt": "x' + text + '", "max_tokens": 2, "temperature": 0}'
    else:
        raw = body + f', "{where}": "{text}"}}'
    refuse = bad or where in ("key", "model")  # an unknown field or another model's name is refused anyway
    return _case("surrogates", f"{text[:20]} in {where}", raw.encode(), must_refuse=refuse)


def gen_huge_bodies(rng, ctx) -> Case:
    kind = _pick(rng, ["announced", "just_over", "chunked_flood", "digits", "at_limit", "lying_length"])
    if kind == "announced":
        size = int(_pick(rng, [MAX_BODY + 1, 1_500_000_000, 10**15, 2**63]))
        head = request_bytes("/v1/completions", b"", headers={"Content-Length": str(size)}, length=False)
        return Case("huge_bodies", f"Content-Length {size}, nothing sent", [(0.0, head)], must_refuse=True, timeout=5.0)
    if kind == "just_over":
        body = b'{"prompt": "' + b"x" * (MAX_BODY - 10) + b'"}'
        return _case("huge_bodies", f"a body of {len(body)} bytes", body, must_refuse=True, may_close=True)
    if kind == "chunked_flood":
        chunk = b"y" * 65536
        n = int(rng.integers(17, 40))
        parts = [(0.0, request_bytes("/v1/completions", b"", headers={"Transfer-Encoding": "chunked"}, length=False))]
        parts += [(0.0, b"%x\r\n" % len(chunk) + chunk + b"\r\n") for _ in range(n)]
        return Case("huge_bodies", f"chunked, {n} x 64 KiB", parts, must_refuse=True, may_close=True)
    if kind == "digits":
        head = request_bytes("/v1/completions", b"", headers={"Content-Length": "9" * int(_pick(rng, [19, 100, 5000]))}, length=False)
        return Case("huge_bodies", "a Content-Length of many digits", [(0.0, head)], must_refuse=True, json_errors=False, may_close=True, timeout=5.0)
    if kind == "lying_length":
        body = dumps(_valid(rng))
        head = request_bytes("/v1/completions", b"", headers={"Content-Length": str(len(body) - 5)}, length=False)
        return Case("huge_bodies", "Content-Length shorter than the body", [(0.0, head + body)], json_errors=False, may_close=True)
    fill = b'{"prompt": "x", "max_tokens": 1, "user": "'
    body = fill + b"u" * (MAX_BODY - len(fill) - 2) + b'"}'
    return _case("huge_bodies", f"a body of exactly {len(body)} bytes", body)


def gen_slow_bodies(rng, ctx) -> Case:
    kind = _pick(rng, ["half_body", "half_head", "dribble", "slow_but_whole", "head_only"])
    body = dumps(_valid(rng))
    full = request_bytes("/v1/completions", body)
    head_len = full.index(b"\r\n\r\n") + 4
    wait = READ_TIMEOUT + 4.0
    if kind == "half_body":
        cut = head_len + int(rng.integers(0, len(body)))
        return Case("slow_bodies", "head and part of the body, then silence", [(0.0, full[:cut])], must_refuse=True, timeout=wait, background=True)
    if kind == "half_head":
        cut = int(rng.integers(1, head_len - 1))
        return Case("slow_bodies", "part of the head, then silence", [(0.0, full[:cut])], must_refuse=True, may_close=True, timeout=wait, background=True)
    if kind == "head_only":
        return Case("slow_bodies", "the head, then silence", [(0.0, full[:head_len])], must_refuse=True, timeout=wait, background=True)
    if kind == "dribble":
        parts = [(0.0, full[:head_len])] + [(0.3, full[i : i + 1]) for i in range(head_len, min(len(full), head_len + 12))]
        return Case("slow_bodies", "a byte every 0.3 s past the deadline", parts, must_refuse=len(body) > 3, may_close=True, timeout=wait + 4, background=True)
    parts = [(0.0, full[:head_len]), (0.1, body[: len(body) // 2]), (0.1, body[len(body) // 2 :])]
    return Case("slow_bodies", "a body in two halves 0.1 s apart", parts, timeout=wait, background=True)


def gen_missing_fields(rng, ctx) -> Case:
    bodies = [
        {},
        {"max_tokens": 3},
        {"prompt": None},
        {"prompt": []},
        {"prompt": [[]]},
        {"prompt": [""]},
        {"prompt": ""},
        {"prompt": [[1], []]},
        {"temperature": 0},
    ]
    body = _pick(rng, bodies)
    refuse = body.get("prompt") in (None, [], [[]], [[1], []])
    return _case("missing_fields", json.dumps(body), dumps(body), must_refuse=refuse)


def gen_unknown_fields(rng, ctx) -> Case:
    body = _valid(rng)
    name = _pick(
        rng, ["frobnicate", "", " prompt", "Prompt", "__proto__", "constructor", "x" * 500, "日本", "max_tokens ", "functions", "tools", "response_format"]
    )
    body[name] = _pick(rng, WRONG)
    return _case("unknown_fields", f"field {name[:30]!r}", dumps(body), must_refuse=True)


def gen_extreme_sampling(rng, ctx) -> Case:
    v = ctx["vocab"]
    body = _valid(rng)
    pools = {
        "temperature": [0, -0.0, 1e-45, 5e-324, 1e-300, 1e-7, 1, 99.999, 100, 100.0000001, 101, -1e-45, 1e308],
        "top_p": [5e-324, 1e-45, 1e-300, 0.5, 1 - 1e-16, 1, 1 + 1e-15, 0, -0.0, -1],
        "top_k": [0, 1, 2, v - 1, v, v + 1, 2**31, 2**63 - 1, 2**63, -1],
        "seed": [0, 1, 2**63 - 1, 2**63, -1, None],
        "max_tokens": [1, 2, 6, CONTEXT, CONTEXT + 1, 10**9],
    }
    for key in rng.permutation(list(pools))[: int(rng.integers(1, 5))]:
        body[str(key)] = _pick(rng, pools[str(key)])
    body["stream"] = bool(rng.random() < 0.4)
    if isinstance(body["max_tokens"], int) and body["max_tokens"] > 6 and body["max_tokens"] <= CONTEXT:
        body["max_tokens"] = 6  # keep the run short; the bound itself is tested with the larger values
    desc = ", ".join(f"{k}={body[k]!r}" for k in pools if k in body)
    return _case("extreme_sampling", desc + (" stream" if body["stream"] else ""), dumps(body), stream=body["stream"])


def gen_echo_logprobs(rng, ctx) -> Case:
    ids = ctx["prompt_ids"]
    prompt = _pick(rng, ["the model runs", "café 😀 naïve", ids, [ids], ["the model", "data flows"], "", [ids, ids[:3]]])
    body: dict[str, Any] = {"prompt": prompt, "temperature": float(_pick(rng, [0, 0.7]))}
    for key, pool in (("echo", [True, False, None]), ("logprobs", [None, 0, 1, 5, 20, 21, -1, "1", 1.0, True]), ("max_tokens", [0, 1, 3])):
        value = _pick(rng, pool)
        if value is not None:
            body[key] = value
    body["stream"] = bool(rng.random() < 0.4)
    if rng.random() < 0.2:
        body["stop"] = _pick(rng, [" ", "e", ["a", "the"], "😀"])
    return _case(
        "echo_logprobs", json.dumps({k: v for k, v in body.items() if k != "prompt"}) + f" prompt={str(prompt)[:30]}", dumps(body), stream=body["stream"]
    )


def gen_http_protocol(rng, ctx) -> Case:
    body = dumps(_valid(rng))
    kind = _pick(
        rng,
        [
            "get_completions",
            "unknown_path",
            "head_health",
            "garbage_line",
            "http10",
            "no_host",
            "bad_chunk",
            "huge_header",
            "pipelined",
            "expect_continue",
            "text_plain",
            "options",
        ],
    )
    plain = dict(json_errors=False, may_close=True)
    if kind == "get_completions":
        return Case(
            "http_protocol",
            "GET /v1/completions",
            [(0.0, request_bytes("/v1/completions", b"", method="GET", length=False))],
            method="GET",
            must_refuse=True,
            **plain,
        )
    if kind == "unknown_path":
        return Case("http_protocol", "POST /v2/nothing", [(0.0, request_bytes("/v2/nothing", body))], must_refuse=True, **plain)
    if kind == "head_health":
        return Case(
            "http_protocol", "HEAD /health", [(0.0, request_bytes("/health", b"", method="HEAD", length=False))], method="HEAD", check=lambda r: None, **plain
        )
    if kind == "garbage_line":
        return Case("http_protocol", "a garbage request line", [(0.0, b"FOO /\x00 BAR\r\n\r\n")], must_refuse=True, **plain)
    if kind == "http10":
        return Case("http_protocol", "HTTP/1.0", [(0.0, request_bytes("/v1/completions", body).replace(b"HTTP/1.1", b"HTTP/1.0", 1))], **plain)
    if kind == "no_host":
        raw = request_bytes("/v1/completions", body).replace(b"Host: 127.0.0.1\r\n", b"")
        return Case("http_protocol", "no Host header", [(0.0, raw)], must_refuse=True, **plain)
    if kind == "bad_chunk":
        raw = request_bytes("/v1/completions", b"", headers={"Transfer-Encoding": "chunked"}, length=False) + b"zz\r\nabc\r\n0\r\n\r\n"
        return Case("http_protocol", "an invalid chunk size", [(0.0, raw)], must_refuse=True, **plain)
    if kind == "huge_header":
        raw = request_bytes("/v1/completions", body, headers={"X-Big": "h" * int(_pick(rng, [10_000, 70_000]))})
        return Case("http_protocol", "a huge header", [(0.0, raw)], **plain)
    if kind == "pipelined":
        raw = request_bytes("/v1/completions", body) + request_bytes("/v1/completions", body)
        return Case("http_protocol", "two requests pipelined", [(0.0, raw)], **plain)
    if kind == "expect_continue":
        raw = request_bytes("/v1/completions", body, headers={"Expect": "100-continue"})
        return Case("http_protocol", "Expect: 100-continue", [(0.0, raw)], **plain)
    if kind == "options":
        return Case(
            "http_protocol",
            "OPTIONS /v1/completions",
            [(0.0, request_bytes("/v1/completions", b"", method="OPTIONS", length=False))],
            method="OPTIONS",
            must_refuse=True,
            **plain,
        )
    raw = request_bytes("/v1/completions", body, headers={"Content-Type": "text/plain"})
    return Case("http_protocol", "Content-Type text/plain", [(0.0, raw)], **plain)


def _tokenizer_check(path: str):
    def check(reply: Reply) -> str | None:
        try:
            out = json.loads(reply.body)
            if path == "/tokenize":
                ok = isinstance(out["tokens"], list) and all(isinstance(t, int) for t in out["tokens"]) and out["count"] == len(out["tokens"])
            elif path == "/detokenize":
                ok = isinstance(out["prompt"], str)
            else:
                ok = "eos_token" in out
            return None if ok else f"bad body {reply.body[:200]!r}"
        except (ValueError, KeyError, TypeError) as e:
            return f"unparseable body ({e}): {reply.body[:200]!r}"

    return check


def gen_tokenizer(rng, ctx) -> Case:
    path = _pick(rng, ["/tokenize", "/detokenize", "/tokenizer_info"])
    if path == "/tokenizer_info":
        return Case(
            "tokenizer",
            "GET /tokenizer_info",
            [(0.0, request_bytes(path, b"", method="GET", length=False))],
            path=path,
            method="GET",
            check=_tokenizer_check(path),
        )
    if path == "/tokenize":
        value = _pick(rng, ["the model", "", "café 😀", "</s><s>x", "x" * 5000, 5, None, ["a"], {"a": 1}])
        body = {"prompt": value}
        if rng.random() < 0.5:
            body["add_special_tokens"] = _pick(rng, [True, False, "no", 1, None])
    else:
        body = {"tokens": _pick(rng, [[1, 2, 3], [], [-1], [10**9], [2**63], [1.5], "abc", [[1]], None, list(range(ctx["vocab"]))])}
    if rng.random() < 0.15:
        body["extra"] = 1
    return _case("tokenizer", f"{path} {json.dumps(body)[:60]}", dumps(body), path=path, check=_tokenizer_check(path))


def gen_disconnects(rng, ctx) -> Case:
    body = {"prompt": _pick(rng, ["the model", "café 😀"]), "max_tokens": 40, "stream": True, "temperature": 0.8}
    after = int(_pick(rng, [0, 1, 200]))
    return Case(
        "disconnects",
        f"stream, hang up after {after} bytes",
        [(0.0, request_bytes("/v1/completions", dumps(body)))],
        stream=True,
        may_close=True,
        close_after=after,
        check=lambda r: None,
    )


CLASSES = {
    "bad_json": gen_bad_json,
    "wrong_types": gen_wrong_types,
    "nan_inf": gen_nan_inf,
    "huge_numbers": gen_huge_numbers,
    "deep_nesting": gen_deep_nesting,
    "surrogates": gen_surrogates,
    "huge_bodies": gen_huge_bodies,
    "slow_bodies": gen_slow_bodies,
    "missing_fields": gen_missing_fields,
    "unknown_fields": gen_unknown_fields,
    "extreme_sampling": gen_extreme_sampling,
    "echo_logprobs": gen_echo_logprobs,
    "http_protocol": gen_http_protocol,
    "tokenizer": gen_tokenizer,
    "disconnects": gen_disconnects,
}


def make_case(seed: int, index: int, ctx: dict) -> Case:
    rng = np.random.default_rng([seed, index])
    names = list(CLASSES)
    return CLASSES[names[index % len(names)]](rng, ctx)


def run_case(port: int, case: Case) -> tuple[str, str | None, float]:
    reply = exchange(port, case.parts, case.timeout, case.method, case.close_after)
    if case.close_after is not None and not reply.hang:
        return ("ok", None, reply.seconds) if reply.status in (None, 200) else (*classify(reply, stream=True, may_close=True), reply.seconds)
    outcome, detail = classify(
        reply, stream=case.stream, must_refuse=case.must_refuse, may_close=case.may_close, json_errors=case.json_errors, check=case.check
    )
    return outcome, detail, reply.seconds


# ---------------------------------------------------------------- victims and the server


class Victims:
    """Threads that stream greedy completions whose text is known, until stopped."""

    def __init__(self, port: int, expected: dict[str, str], n: int, max_tokens: int) -> None:
        self.port, self.expected, self.max_tokens = port, expected, max_tokens
        self.results: queue.Queue[tuple[bool, str | None]] = queue.Queue()
        self.stop = threading.Event()
        self.completed = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        prompts = list(self.expected)
        k = i
        while not self.stop.is_set():
            prompt = prompts[k % len(prompts)]
            k += 1
            body = dumps({"prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0, "stream": True})
            reply = exchange(self.port, [(0.0, request_bytes("/v1/completions", body))], 60.0)
            problem = None
            if reply.hang or reply.status != 200:
                problem = f"status {reply.status} hang={reply.hang}: {reply.body[:200]!r}"
            else:
                problem = check_completion(reply, stream=True)
                if problem is None:
                    chunks = [json.loads(e[6:]) for e in reply.body.decode().split("\n\n") if e.startswith("data: {")]
                    text = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
                    if text != self.expected[prompt]:
                        problem = f"text {text!r} != the expected {self.expected[prompt]!r}"
            self.results.put((problem is None, problem))

    def drain(self) -> list[str]:
        broken = []
        while True:
            try:
                ok, problem = self.results.get_nowait()
            except queue.Empty:
                return broken
            self.completed += 1
            if not ok:
                broken.append(problem or "?")

    def finish(self) -> list[str]:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)
        return self.drain()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(port: int, path: str) -> tuple[int | None, Any]:
    reply = exchange(port, [(0.0, request_bytes(path, b"", method="GET", length=False))], 10.0, method="GET")
    try:
        return reply.status, json.loads(reply.body)
    except ValueError:
        return reply.status, None


def _peak_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


@contextlib.contextmanager
def running_server(artifact: Path, tokenizer: Path, log: Path):
    port = _free_port()
    cmd = [sys.executable, "-m", "loopgolf", "serve", str(artifact), "--tokenizer", str(tokenizer), "--port", str(port), "--context", str(CONTEXT)]
    cmd += ["--slots", "4", "--max-queue", "256", "--timeout", "30", "--read-timeout", str(READ_TIMEOUT), "--shutdown-grace", "2", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            deadline = time.monotonic() + 120
            while _get_json(port, "/health")[0] != 200:
                if proc.poll() is not None:
                    raise RuntimeError(f"`loopgolf serve` exited with {proc.returncode}: {log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError("the server did not answer /health in time")
                time.sleep(0.1)
            yield port, proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def stop_server(proc: subprocess.Popen) -> int | None:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        return None


class Tracebacks:
    """New Python tracebacks in the server's log since the last look."""

    def __init__(self, log: Path) -> None:
        self.log, self.offset = log, 0

    def new(self) -> list[str]:
        try:
            with open(self.log, "rb") as f:
                f.seek(self.offset)
                text = f.read().decode("utf-8", "replace")
                self.offset = f.tell()
        except OSError:
            return []
        found, lines = [], text.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                block = [lines[i]]
                for ln in lines[i + 1 :]:
                    block.append(ln)
                    if ln and not ln.startswith(" "):  # the exception line ends the traceback
                        break
                where = [ln.strip() for ln in block if ln.strip().startswith("File") and "/loopgolf/" in ln]
                found.append(f"{block[-1][:300]} @ {where[-1] if where else block[-3].strip() if len(block) > 2 else '?'}")
        return found


# ---------------------------------------------------------------- main


def fuzz(args: argparse.Namespace) -> dict:
    import torch

    from loopgolf.serve.generate import Generator, encode_prompt
    from loopgolf.sources.open import open_for_text

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.model:
            artifact, tok = Path(args.model), Path(args.tokenizer)
        else:
            artifact, tok = build_model(folder, args.seed)
        served = open_for_text(artifact, tok)
        gen = Generator(served.model, served.tokenizer, max_len=CONTEXT)
        victim_prompts = ["the model stores", "data flows through", "café 😀"]
        expected = {p: gen.generate(p, args.victim_tokens, temperature=0.0).text for p in victim_prompts}
        ctx = {"vocab": served.model.config.vocab_size, "prompt_ids": encode_prompt(served.tokenizer, "the model runs")}
        log = folder / "server.log"
        indices = [args.case] if args.case is not None else list(range(args.cases))
        counts = {name: dict.fromkeys(OUTCOMES, 0) for name in CLASSES}
        findings: list[dict] = []
        slowest = (0.0, None)
        with running_server(artifact, tok, log) as (port, proc):
            tracebacks = Tracebacks(log)
            victims = Victims(port, expected, args.victims, args.victim_tokens)
            victims.start()
            pool = ThreadPoolExecutor(max_workers=8)
            background = []

            def record(i: int, case: Case, outcome: str, detail: str | None, seconds: float) -> None:
                nonlocal slowest
                counts[case.klass][outcome] += 1
                if seconds > slowest[0] and not case.background:
                    slowest = (seconds, i)
                if outcome in BAD:
                    findings.append(
                        {
                            "case": i,
                            "class": case.klass,
                            "outcome": outcome,
                            "request": case.description,
                            "detail": detail,
                            "replay": f"python -m loopgolf.bench.fuzz_server --seed {args.seed} --case {i} -v",
                        }
                    )
                if args.verbose and not args.json:
                    print(f"case {i} [{case.klass}] {case.description[:70]}: {outcome} ({seconds:.2f} s){' ' + detail[:200] if detail else ''}")

            def settle(i: int, case: Case) -> None:
                for tb in tracebacks.new():
                    record(i, case, "traceback", tb, 0.0)
                for problem in victims.drain():
                    record(i, case, "victim_broken", problem, 0.0)

            for i in indices:
                case = make_case(args.seed, i, ctx)
                if case.background:
                    background.append((i, case, pool.submit(run_case, port, case)))
                    continue
                outcome, detail, seconds = run_case(port, case)
                record(i, case, outcome, detail, seconds)
                settle(i, case)
                if proc.poll() is not None:
                    record(i, case, "5xx", f"the server exited with {proc.returncode}", 0.0)
                    break
            for i, case, future in background:
                outcome, detail, seconds = future.result()
                record(i, case, outcome, detail, seconds)
                settle(i, case)
            pool.shutdown()
            time.sleep(0.2)
            end = Case("final", "after every case", [])
            counts["final"] = dict.fromkeys(OUTCOMES, 0)
            for problem in victims.finish():
                record(-1, end, "victim_broken", problem, 0.0)
            for tb in tracebacks.new():
                record(-1, end, "traceback", tb, 0.0)
            deadline = time.monotonic() + 15
            while True:  # nothing left behind: every slot and queue entry freed
                status, health = _get_json(port, "/health")
                if status == 200 and health and health.get("pending") == 0:
                    break
                if time.monotonic() > deadline:
                    record(-1, end, "5xx" if status != 200 else "bad_response", f"/health after the cases: {status} {health}", 0.0)
                    break
                time.sleep(0.1)
            peak = _peak_rss_kib(proc.pid)
            code = stop_server(proc)
            if code != 0:
                record(-1, end, "bad_response", f"the server exited with {code} on SIGTERM", 0.0)
            for tb in tracebacks.new():
                record(-1, end, "traceback", tb, 0.0)
        totals = {k: sum(c[k] for c in counts.values()) for k in OUTCOMES}
        return {
            "cases": len(indices),
            "seed": args.seed,
            "counts": counts,
            "totals": totals,
            "victims": {"completed": victims.completed, "threads": args.victims},
            "wall_s": round(time.perf_counter() - t_start, 2),
            "slowest_case_s": round(slowest[0], 3),
            "slowest_case": slowest[1],
            "server_peak_rss_kib": peak,
            "server_exit_code": code,
            "findings": len(findings),
            "first_findings": findings[: args.show],
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case", type=int, default=None, help="replay only this case index")
    ap.add_argument("--victims", type=int, default=2, help="threads streaming known completions meanwhile")
    ap.add_argument("--victim-tokens", type=int, default=24, help="tokens per victim completion")
    ap.add_argument("--model", help="an artifact to serve (default: a random tiny model built here)")
    ap.add_argument("--tokenizer", help="its SentencePiece model (with --model)")
    ap.add_argument("--json", action="store_true", help="print one JSON summary instead of text")
    ap.add_argument("--show", type=int, default=10, help="findings to print in full")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case")
    args = ap.parse_args(argv)
    if bool(args.model) != bool(args.tokenizer):
        ap.error("--model and --tokenizer go together")
    summary = fuzz(args)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{summary['cases']} cases, seed {args.seed}, {summary['wall_s']:.1f} s; victims completed {summary['victims']['completed']}")
        width = max(len(k) for k in summary["counts"])
        print(" " * (width + 2) + " ".join(f"{k:>13s}" for k in OUTCOMES))
        for name, c in summary["counts"].items():
            print(f"  {name:{width}s}" + " ".join(f"{c[k]:13d}" for k in OUTCOMES))
        print(f"  {'total':{width}s}" + " ".join(f"{summary['totals'][k]:13d}" for k in OUTCOMES))
        print(
            f"slowest case: {summary['slowest_case_s']:.3f} s (case {summary['slowest_case']}); server peak RSS {summary['server_peak_rss_kib']} KiB; exit {summary['server_exit_code']}"
        )
        for f in summary["first_findings"]:
            print(f"\n--- case {f['case']} [{f['class']}] {f['outcome']}: {f['request']}  ({f['replay']})\n{f['detail']}")
    return 1 if any(summary["totals"][k] for k in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())

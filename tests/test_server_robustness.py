"""The server under hostile or extreme input (issue 27, "The server"): sampling at the edges of
float32, faults that stay with their request and a /health that recovers, JSON the parser must
refuse cleanly, bounded bodies and read deadlines, one-line CLI errors, completion text that keeps
the space before its first word, and echo/logprobs with OpenAI's semantics."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import one_line_error, post_completion, random_model, running_server

from loopgolf.model.plan import PlanSpec
from loopgolf.serve.engine import Engine
from loopgolf.serve.exits import parse_criterion
from loopgolf.serve.generate import Generator, encode_prompt
from loopgolf.serve.request import Request, token_texts
from loopgolf.serve.sampling import SamplingParams, sample, token_logprobs

OFFICIAL_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tokenizers" / "fineweb_1024_bpe.model"  # vendored, see assets/README.md


def _get(url: str, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url + path, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post_to(url: str, path: str, body) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _stream(url: str, body: dict) -> tuple[str, list[dict], str]:
    """(concatenated text, the chunks, the raw body) of a streamed completion."""
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read().decode()
    chunks = [json.loads(line[6:]) for line in raw.split("\n\n") if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
    return text, chunks, raw


class Victim(threading.Thread):
    """A greedy streamed completion running while other requests misbehave; it must finish whole."""

    def __init__(self, url: str, prompt: str, max_tokens: int = 60) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        self.text, self.raw, self.error = None, "", None
        self.first = threading.Event()

    def run(self) -> None:
        try:
            req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps({**self.body, "stream": True}).encode())
            with urllib.request.urlopen(req, timeout=120) as r:
                for line in r:
                    self.raw += line.decode()
                    self.first.set()
            chunks = [json.loads(x[6:]) for x in self.raw.split("\n\n") if x.startswith("data: {")]
            self.text = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
        except Exception as e:
            self.error = repr(e)
        self.first.set()

    def check(self, want: str) -> None:
        self.join(timeout=120)
        assert not self.is_alive() and self.error is None, self.error
        assert '"error"' not in self.raw and self.raw.endswith("data: [DONE]\n\n"), self.raw[-500:]
        assert '"finish_reason": "length"' in self.raw
        assert self.text == want


# ---------------------------------------------------------------- 1. sampling at the edges of float32


def test_sampling_is_numerically_safe_at_every_accepted_value():
    gen = torch.Generator().manual_seed(0)
    spread = torch.linspace(-30, 30, 64)
    huge = torch.tensor([3.0e38, -3.0e38, 1.0, 0.0] * 16)
    with_neg_inf = spread.clone()
    with_neg_inf[::2] = float("-inf")
    for logits in (spread, huge, with_neg_inf, spread.half(), spread.double()):
        best = float(logits.float().max())
        for temperature in (1e-45, 5e-324, 1e-300, 1e-7, 0.5, 1.0, 100.0):
            for top_p in (5e-324, 1e-45, 1e-9, 0.5, 1.0):
                for top_k in (0, 1, 5, 2**63 - 1):
                    t = sample(logits, SamplingParams(temperature, top_k, top_p, 1), gen)
                    assert 0 <= t < logits.numel() and logits[t] > float("-inf"), (temperature, top_p, top_k)
                    if temperature <= 1e-7 or top_p <= 1e-9 or top_k == 1:
                        assert float(logits[t]) == best, (temperature, top_p, top_k)  # the top token always survives
    for bad in (torch.tensor([0.0, float("nan")]), torch.tensor([0.0, float("inf")]), torch.full((4,), float("-inf"))):
        with pytest.raises(ValueError, match="logits|probability"):
            sample(bad, SamplingParams(1.0), gen)
    lp, top = token_logprobs(torch.tensor([0.0, 1.0, float("-inf")]), 2, 3)
    assert lp == -9999.0 and [i for i, _ in top] == [1, 0, 2]  # JSON has no -inf
    for bad in (dict(temperature=float("nan")), dict(temperature=100.5), dict(top_p=float("inf")), dict(temperature=True), dict(seed=2**63)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_extreme_sampling_values_fail_nothing_else_and_health_stays_ok(tiny_artifact):
    artifact, tok = tiny_artifact
    with running_server(artifact, tok) as (url, served, _):
        want = Generator(served.model, served.tokenizer).generate("the model", 60, temperature=0.0).text
        victim = Victim(url, "the model")
        victim.start()
        assert victim.first.wait(60)
        for extra in (
            dict(temperature=1e-45),
            dict(temperature=5e-324, top_p=5e-324),
            dict(top_p=1e-45),
            dict(temperature=1e-45, top_p=1e-45, top_k=1),
            dict(temperature=100, top_k=2**63 - 1, seed=2**63 - 1),
            dict(temperature=1e-300, logprobs=5, echo=True),
        ):
            status, body = post_completion(url, {"prompt": "data flows", "max_tokens": 4, **extra})
            assert status == 200, (extra, body)
            assert body["choices"][0]["finish_reason"] == "length"
        for extra, field in (
            (dict(temperature=1e308), "temperature"),
            (dict(temperature=100.00001), "temperature"),
            (dict(top_p=0.0), "top_p"),
            (dict(top_p=1.0000001), "top_p"),
            (dict(top_k=-1), "top_k"),
            (dict(seed=2**63), "seed"),
            (dict(max_tokens=10**60), "max_tokens"),
            (dict(top_k=1.5), "top_k"),
        ):
            status, body = post_completion(url, {"prompt": "x", **extra})
            assert status == 400 and body["error"]["param"] == field, (extra, body)
        victim.check(want)
        status, health = _get(url, "/health")
        assert status == 200 and health["status"] == "ok" and health["engine_faults"] == 0, health


# ---------------------------------------------------------------- 1. faults stay with their request


def test_a_fault_in_one_sequence_fails_only_that_request(tiny_artifact, monkeypatch):
    import loopgolf.serve.engine as engine_module

    real = engine_module.sample

    def faulty(logits, params, gen):
        if params.seed == 4242:  # this request's sequence breaks (as non-finite logits would)
            raise ValueError("the model gave non-finite logits (NaN or +inf) for this sequence")
        return real(logits, params, gen)

    monkeypatch.setattr(engine_module, "sample", faulty)
    artifact, tok = tiny_artifact
    with running_server(artifact, tok) as (url, served, engine):
        want = Generator(served.model, served.tokenizer).generate("each loop adds", 60, temperature=0.0).text
        victims = [Victim(url, "each loop adds") for _ in range(2)]
        for v in victims:
            v.start()
        assert all(v.first.wait(60) for v in victims)
        status, body = post_completion(url, {"prompt": "the cap", "max_tokens": 8, "seed": 4242})
        assert status == 500 and "non-finite" in body["error"]["message"], body
        text, chunks, raw = _stream(url, {"prompt": "the cap", "max_tokens": 8, "seed": 4242})
        assert "non-finite" in raw and raw.endswith("data: [DONE]\n\n")
        status, body = post_completion(url, {"prompt": "the cap", "max_tokens": 8, "seed": 7})
        assert status == 200, body
        for v in victims:
            v.check(want)
        status, health = _get(url, "/health")
        assert status == 200 and health["status"] == "ok", health
        assert engine.idle and len(engine.free_slots) == 4


def test_health_recovers_after_a_failed_model_call_and_waiting_requests_survive(tiny_artifact):
    artifact, tok = tiny_artifact
    with running_server(artifact, tok, slots=1) as (url, served, engine):
        real = engine.runner.advance
        calls = {"n": 0}

        def advance(tokens):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("device lost")
            return real(tokens)

        engine.runner.advance = advance
        results: list = [None, None]

        def ask(i: int) -> None:
            results[i] = post_completion(url, {"prompt": "the model", "max_tokens": 6, "temperature": 0})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        statuses = sorted(r[0] for r in results)
        assert statuses == [200, 500], results  # the request in the failed call alone; the waiting one ran
        failed = next(r[1] for r in results if r[0] == 500)
        assert "device lost" in failed["error"]["message"]
        deadline = time.monotonic() + 20
        while True:  # the engine probes itself: /health answers 200 again without another client
            status, health = _get(url, "/health")
            if status == 200:
                break
            assert time.monotonic() < deadline, health
            time.sleep(0.1)
        assert health["engine_faults"] == 1 and "device lost" in health["last_error"]
        status, body = post_completion(url, {"prompt": "the model", "max_tokens": 6, "temperature": 0})
        assert status == 200, body
        assert body["choices"][0]["text"] == Generator(served.model, served.tokenizer).generate("the model", 6, temperature=0.0).text


def test_engine_ends_a_faulty_request_alone_and_frees_its_slot():
    model = random_model(PlanSpec("cycle", layers=2, loops=2), seed=3)
    engine = Engine(model, slots=2, decode=lambda ids: "".join(chr(97 + i % 26) for i in ids))
    events: list = []

    def broken(ev):
        if ev.token_id >= 0:
            raise ConnectionError("listener gone")

    bad = Request([1, 2, 3], 5, SamplingParams(temperature=0.0), on_event=broken)
    good = Request([1, 2, 3], 5, SamplingParams(temperature=0.0), on_event=events.append)
    engine.submit(bad)
    engine.submit(good)
    engine.run_until_idle()
    assert bad.finish_reason == "error" and "listener gone" in bad.error
    assert good.finish_reason == "length" and len(good.generated) == 5
    assert good.generated == Generator(model).generate([1, 2, 3], 5, temperature=0.0).token_ids
    assert engine.idle and sorted(engine.free_slots) == [0, 1]


# ---------------------------------------------------------------- 2. JSON the parser must refuse


def test_unparseable_json_answers_400_not_500(tiny_artifact):
    artifact, tok = tiny_artifact
    with running_server(artifact, tok) as (url, _, _):
        cases = [
            (b'{"prompt": "\\ud800"}', "lone surrogate", "prompt"),
            (b'{"prompt": "ok", "stop": ["\\udfff"]}', "lone surrogate", "stop"),
            (b'{"prompt": "ok", "model": "\\ud800"}', "lone surrogate", "model"),
            (b'{"prompt": "ok", "\\ud800": 1}', "lone surrogate", "\\ud800"),
            (b"[" * 100_000, "nested too deeply", None),
            (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply", None),
            (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "5000 digits", None),
            (b'{"prompt": [' + b"1" * 5000 + b"]}", "5000 digits", None),
            (b'{"prompt": "x", "seed": -' + b"7" * 4299 + b"}", "4299 digits", None),
            (b'{"prompt": "x", "temperature": 1' + b"0" * 5000 + b".5}", "out of range", None),
            (b'{"prompt": "x", "temperature": NaN}', "NaN", None),
            (b'{"prompt": "x", "top_p": -Infinity}', "Infinity", None),
            (b'{"prompt": "x", "top_p": 1e999}', "out of range", None),
            (b'{"prompt": "\xff\xfe"}', "not UTF-8", None),
            (b"", "malformed JSON", None),
        ]
        for raw, words, param in cases:
            status, body = post_completion(url, None, raw)
            assert status == 400, (raw[:60], body)
            assert words in body["error"]["message"] and body["error"]["param"] == param, (raw[:60], body)
        for path in ("/tokenize", "/detokenize"):
            for raw, words, _ in cases[:7]:
                req = urllib.request.Request(url + path, data=raw)
                try:
                    urllib.request.urlopen(req, timeout=30)
                    raise AssertionError("accepted")
                except urllib.error.HTTPError as e:
                    assert e.code == 400 and words in json.loads(e.read())["error"]["message"]
        status, _ = post_completion(url, {"prompt": "a \U0001f600 pair is fine", "max_tokens": 2})
        assert status == 200


# ---------------------------------------------------------------- 3 and 4. bounded bodies, read deadlines


def _raw_http(url: str, data: bytes, *, then: bytes = b"", timeout: float = 15.0) -> tuple[bytes, float]:
    """Send ``data`` on a fresh connection, then read until the server closes; returns what came
    back and the seconds it took."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        if then:
            try:
                s.sendall(then)
            except OSError:
                pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return out, time.monotonic() - t0


def test_oversized_bodies_are_refused_before_they_are_read(tiny_artifact):
    artifact, tok = tiny_artifact
    with running_server(artifact, tok, max_body_bytes=4096) as (url, _, _):
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        # 1.5 GB announced, nothing sent: the answer comes at once, the body is never waited for
        out, took = _raw_http(url, head + b"Content-Length: 1500000000\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 413") and b"connection: close" in out.lower() and b"4096-byte limit" in out, out[:300]
        assert took < 5
        # chunked: reading stops at the limit
        chunk = b"x" * 1024
        body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(6))
        out, took = _raw_http(url, head + b"Transfer-Encoding: chunked\r\n\r\n" + body)
        assert out.startswith(b"HTTP/1.1 413") and b"limit" in out, out[:300]
        assert took < 5
        # at the limit is fine
        fill = json.dumps({"prompt": "x", "max_tokens": 1, "user": ""}).encode()
        exact = fill[:-2] + b" " * (4096 - len(fill)) + fill[-2:]
        status, body = post_completion(url, None, exact)
        assert len(exact) == 4096 and status == 200, body


def test_half_sent_requests_are_timed_out(tiny_artifact):
    artifact, tok = tiny_artifact
    with running_server(artifact, tok, read_timeout=1.0) as (url, _, _):
        # headers and part of a body, then silence: 408 and the connection closed
        out, took = _raw_http(url, b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"prompt": ')
        assert out.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in out, out[:300]
        assert 0.9 < took < 6
        # part of the headers, then silence: closed
        out, took = _raw_http(url, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        assert out == b"" and 0.9 < took < 6
        # a slow but whole request inside the deadline is served
        status, body = post_completion(url, {"prompt": "the model", "max_tokens": 2})
        assert status == 200, body
    with running_server(artifact, tok, request_timeout=1.0, read_timeout=30.0) as (url, _, _):  # --timeout bounds the read too
        out, took = _raw_http(url, b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"prompt": ')
        assert out.startswith(b"HTTP/1.1 408") and took < 6, out[:300]


# ---------------------------------------------------------------- 5. command-line values


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--timeout", "nan"], "--timeout"),
        (["--timeout", "-1"], "--timeout"),
        (["--timeout", "inf"], "--timeout"),
        (["--read-timeout", "0"], "--read-timeout"),
        (["--shutdown-grace", "nan"], "--shutdown-grace"),
        (["--slots", "0"], "--slots"),
        (["--port", "0"], "--port"),
        (["--max-body-bytes", "-5"], "--max-body-bytes"),
    ],
)
def test_serve_argument_errors_are_one_line_and_exit_2(extra, words, tiny_artifact, capsys):
    from loopgolf.cli import main

    artifact, tok = tiny_artifact
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["serve", str(artifact), "--tokenizer", str(tok), *extra])
    err = capsys.readouterr().err
    one_line_error(e.value.code, err, words)


def test_serve_impossible_settings_are_one_line_and_exit_2(tiny_artifact, capsys, monkeypatch):
    import loopgolf.commands.serve as serve_command
    from loopgolf.cli import main

    artifact, tok = tiny_artifact
    common = ["serve", str(artifact), "--tokenizer", str(tok)]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        for extra, words in (
            (["--port", "70000"], "--port must be in 1..65535"),
            (["--slots", "100000"], "--slots 100,000 is more than 4,096"),
            (["--slots", "1000000000"], "is more than"),
            (["--context", "100000"], "longer than the model's max_seq_len"),
            (["--port", str(busy.getsockname()[1])], "cannot listen on"),
            (["--host", "10.0.0.1"], "--allow-remote"),
        ):
            capsys.readouterr()
            code = main([*common, *extra])
            err = capsys.readouterr().err
            one_line_error(code, err, words)
        monkeypatch.setattr(serve_command, "_memory_bytes", lambda: 1 << 20)  # a machine with 1 MiB
        capsys.readouterr()
        code = main([*common, "--slots", "64", "--context", "128"])
        err = capsys.readouterr().err
        one_line_error(code, err, "KV cache", "lower --slots or --context")
    finally:
        busy.close()


# ---------------------------------------------------------------- 6. the completion's first space


@pytest.fixture(scope="module")
def official_artifact(tmp_path_factory):
    """A random model over the vendored sp1024 tokenizer (no byte fallback, word-start pieces)."""
    from loopgolf.export.pack import export_model

    model = random_model(PlanSpec("cycle", layers=2, loops=2), seed=8, vocab_size=1024, max_seq_len=128)
    path = tmp_path_factory.mktemp("official") / "tiny1024.ptz"
    export_model(model, path, bits=8)
    return path, OFFICIAL_TOKENIZER


def _sp():
    from sentencepiece import SentencePieceProcessor

    return SentencePieceProcessor(model_file=str(OFFICIAL_TOKENIZER))


def test_completion_keeps_the_space_before_its_first_word():
    sp = _sp()
    prompt = encode_prompt(sp, "Return the")
    deltas: list[str] = []
    req = Request(prompt, 3, on_event=lambda ev: deltas.append(ev.text))
    for piece in ("\u2581last", "\u2581of", "\u2581the"):
        req.emit(sp.piece_to_id(piece), 1, sp.decode)
    assert sp.decode(prompt + req.generated) == "Return the last of the"
    assert req.text == " last of the" and "".join(deltas) == req.text


def test_streamed_deltas_add_up_across_stop_strings_and_characters():
    sp = _sp()
    prompt = encode_prompt(sp, "Return")
    ids = [sp.piece_to_id(p) for p in ("\u2581the", "\u2581last", "\u2581of", "\u2581the")]
    for stop, want in ((" last o", " the"), ("he la", " t"), ("zz", " the last of the"), (" the", "")):
        deltas: list[str] = []
        req = Request(prompt, 4, stop=(stop,), on_event=lambda ev: deltas.append(ev.text))
        for t in ids:
            req.emit(t, 1, sp.decode)
            if req.finished:
                break
        assert req.text == want and "".join(deltas) == want, (stop, req.text, deltas)
    # byte-level pieces (as byte fallback decodes them): a prompt that ends inside a character
    # gives the whole character to the completion, and token texts add up to the text
    decode = lambda ids: bytes(ids).decode("utf-8", "replace")
    assert token_texts(decode, list("aé!".encode()), 0, "aé!", 0) == ["a", "", "é", "!"]
    deltas = []
    req = Request(list(b"a\xc3"), 2, on_event=lambda ev: deltas.append(ev.text))
    for b in b"\xa9!":
        req.emit(b, 1, decode)
    assert req.prompt_text == "a" and req.text == "é!" and "".join(deltas) == "é!"


def _first_piece_starts_a_word(model, sp, prompt: str) -> bool:
    ids = encode_prompt(sp, prompt)
    with torch.no_grad():
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
    return sp.id_to_piece(nxt).startswith("\u2581")


def test_generator_server_and_cli_text_is_decode_of_all_minus_decode_of_prompt(official_artifact, capsys):
    from loopgolf.cli import main
    from loopgolf.sources.open import open_for_text

    artifact, tok = official_artifact
    served = open_for_text(artifact, tok)
    sp = served.tokenizer
    prompt = next(p for p in ("Return the", "The cat", "Once upon a time", "It is", "We") if _first_piece_starts_a_word(served.model, sp, p))
    gen = Generator(served.model, sp)
    deltas = [ev.text for ev in gen.stream(prompt, 8, temperature=0.0)]
    req = gen.last_request
    ids = encode_prompt(sp, prompt)
    want = sp.decode(ids + req.generated)[len(sp.decode(ids)) :]
    assert want.startswith(" ") and req.text == want and "".join(deltas) == want
    capsys.readouterr()
    assert main(["generate", str(artifact), "--tokenizer", str(tok), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == prompt + want + "\n"
    with running_server(artifact, tok) as (url, _, _):
        status, body = post_completion(url, {"prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert status == 200 and body["choices"][0]["text"] == want
        text, _, _ = _stream(url, {"prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert text == want


# ---------------------------------------------------------------- 7. echo and logprobs


@torch.no_grad()
def _forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)


def _check_block(block: dict, text: str) -> None:
    """tokens, token_logprobs, top_logprobs and text_offset are aligned and add up to ``text``."""
    n = len(block["tokens"])
    assert len(block["token_logprobs"]) == len(block["top_logprobs"]) == len(block["text_offset"]) == n
    assert "".join(block["tokens"]) == text
    for tok, off in zip(block["tokens"], block["text_offset"]):
        assert text[off : off + len(tok)] == tok


def test_echo_and_logprobs_follow_openai_semantics(tiny_artifact):
    artifact, tok = tiny_artifact
    with running_server(artifact, tok) as (url, served, _):
        model, sp = served.model.eval(), served.tokenizer
        prompt = "the model stores a few unique blocks"
        ids = encode_prompt(sp, prompt)
        ref = _forward_logprobs(model, ids)
        # scoring: echo, max_tokens 0 -> the prompt's tokens, the first with logprob null
        status, body = post_completion(url, {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1})
        assert status == 200, body
        c = body["choices"][0]
        assert c["text"] == sp.decode(ids) == prompt and c["finish_reason"] == "length"
        lp = c["logprobs"]
        _check_block(lp, c["text"])
        assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for i in range(1, len(ids)):
            assert lp["token_logprobs"][i] == pytest.approx(float(ref[i - 1, ids[i]]), abs=1e-3)
            (best,) = lp["top_logprobs"][i].values()
            assert best == pytest.approx(float(ref[i - 1].max()), abs=1e-3) and best >= lp["token_logprobs"][i]
        assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
        # the same prompt as token ids, in lm-eval's batch form [[ids]]
        status, by_ids = post_completion(url, {"prompt": [ids], "max_tokens": 0, "echo": True, "logprobs": 1})
        assert status == 200 and by_ids["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"]
        # echo + greedy generation: a greedy token's logprob is exactly its top alternative's
        status, body = post_completion(url, {"prompt": prompt, "max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 3})
        c = body["choices"][0]
        lp = c["logprobs"]
        _check_block(lp, c["text"])
        assert c["text"].startswith(prompt) and len(lp["tokens"]) == len(ids) + 5
        for value, top in zip(lp["token_logprobs"][len(ids) :], lp["top_logprobs"][len(ids) :]):
            assert len(top) == 3 and value == max(top.values())
        # without echo: the completion's tokens only, offsets into the completion
        status, plain = post_completion(url, {"prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 0})
        p = plain["choices"][0]
        assert p["text"] == c["text"][len(prompt) :]
        _check_block(p["logprobs"], p["text"])
        assert p["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][len(ids) :], abs=1e-5)  # batch shapes differ in the last bits
        assert all(t == {} for t in p["logprobs"]["top_logprobs"])
        # streamed: the chunks add up to the same text, tokens and values
        text, chunks, raw = _stream(url, {"prompt": prompt, "max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 3})
        assert text == c["text"] and raw.endswith("data: [DONE]\n\n")
        blocks = [ch["choices"][0]["logprobs"] for ch in chunks if ch.get("choices")]
        assert sum((b["tokens"] for b in blocks), []) == lp["tokens"]
        assert sum((b["token_logprobs"] for b in blocks), []) == lp["token_logprobs"]
        assert sum((b["text_offset"] for b in blocks), []) == lp["text_offset"]
        # several prompts: one choice each, in order
        status, many = post_completion(url, {"prompt": ["the model", "data flows"], "max_tokens": 3, "temperature": 0})
        assert status == 200 and [ch["index"] for ch in many["choices"]] == [0, 1]
        gen = Generator(model, sp)
        assert [ch["text"] for ch in many["choices"]] == [gen.generate(q, 3, temperature=0.0).text for q in ("the model", "data flows")]
        # what is refused, naming the field
        for extra, field in (
            (dict(max_tokens=0), "max_tokens"),
            (dict(max_tokens=0, echo=True), "max_tokens"),
            (dict(logprobs=21), "logprobs"),
            (dict(logprobs="1"), "logprobs"),
            (dict(logprobs=-1), "logprobs"),
            (dict(echo="yes"), "echo"),
            (dict(stream_options={"include_usage": True}), "stream_options"),
            (dict(prompt=[[1, 2], "x"]), "prompt"),
            (dict(prompt=["x"] * 33), "prompt"),
        ):
            status, err = post_completion(url, {"prompt": "x", **extra})
            assert status == 400 and err["error"]["param"] == field, (extra, err)


def test_prompt_scoring_with_early_exit_equals_the_runner():
    """Scored prompt tokens may finish out of order under early exit (the last one can exit
    first); generation waits for all of them, and each logprob is the runner's exit logits'."""
    from loopgolf.serve.runner import LayerRunner, Token

    model = random_model(PlanSpec("cycle", layers=2, loops=3), seed=21)
    with torch.no_grad():  # a threshold that makes roughly half the positions exit somewhere
        probe = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(0))
        threshold = float(torch.cat([lg[0].softmax(-1).max(-1).values for lg in model.loop_logits(probe)[:-1]]).median())
    crit = parse_criterion(f"maxprob:{threshold}")
    for seed in range(50):  # a prompt whose last token exits before some earlier one: generation must wait
        ids = [int(i) for i in torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(seed))]
        runner = LayerRunner(model, 1, 64, crit)
        tokens = [Token(0, p, t) for p, t in enumerate(ids)]
        with torch.inference_mode():
            runner.run(tokens)
        if tokens[-1].loops < max(t.loops for t in tokens):
            break
    assert tokens[-1].loops < max(t.loops for t in tokens)
    for max_new in (0, 3):
        engine = Engine(model, slots=2, criterion=crit)
        req = Request(ids, max_new, SamplingParams(temperature=0.0), logprobs=2, score_prompt=True)
        other = Request([5, 6, 7], 4, SamplingParams(temperature=0.0))
        engine.submit(req)
        engine.submit(other)
        engine.run_until_idle()
        assert req.finish_reason == "length" and len(req.generated) == max_new and other.finish_reason == "length"
        assert req.prompt_logprobs[0] is None
        for i in range(1, len(ids)):
            want = float(torch.log_softmax(tokens[i - 1].logits.double(), -1)[ids[i]])
            assert req.prompt_logprobs[i] == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Request([1], 0, logprobs=1)  # generating nothing is only for scoring


def test_tokenizer_endpoints(tiny_artifact):
    artifact, tok = tiny_artifact
    with running_server(artifact, tok) as (url, served, _):
        sp = served.tokenizer
        status, info = _get(url, "/tokenizer_info")
        assert status == 200 and info["eos_token"] == sp.id_to_piece(sp.eos_id()) and info["model_max_length"] == 96
        status, out = _post_to(url, "/tokenize", {"prompt": "the model", "add_special_tokens": False})
        assert status == 200 and out["tokens"] == list(sp.encode("the model")) and out["count"] == len(out["tokens"])
        status, out = _post_to(url, "/tokenize", {"prompt": "the model"})
        assert out["tokens"] == encode_prompt(sp, "the model")  # what a string prompt is read as
        status, out = _post_to(url, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False})
        assert out["tokens"] == [sp.eos_id()]
        status, out = _post_to(url, "/detokenize", {"tokens": list(sp.encode("the model"))})
        assert status == 200 and out["prompt"] == "the model"
        for path, body, field in (
            ("/tokenize", {"prompt": 5}, "prompt"),
            ("/tokenize", {"prompt": "x", "add_special_tokens": "no"}, "add_special_tokens"),
            ("/tokenize", {"prompt": "x", "extra": 1}, "extra"),
            ("/detokenize", {"tokens": [10**9]}, "tokens"),
            ("/detokenize", {"tokens": "abc"}, "tokens"),
        ):
            status, err = _post_to(url, path, body)
            assert status == 400 and err["error"]["param"] == field, (path, body, err)

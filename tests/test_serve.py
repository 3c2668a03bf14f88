"""Generation, early exit and the serving engines: cached decoding equals the full forward for
every plan kind, exit criteria at their extremes equal full depth / the first loop, and the
schedulers neither drop, duplicate nor reorder tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TINY, free_port, one_line_error, post_completion, random_byte_tables, random_model, running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from loopgolf.evaluate import evaluate_bpb
from loopgolf.model.gpt import GPT
from loopgolf.model.plan import PlanSpec
from loopgolf.serve.engine import SCHEDULES, Engine, QueueFull
from loopgolf.serve.exits import ExitCriterion, parse_criterion
from loopgolf.serve.generate import Generator
from loopgolf.serve.request import Request
from loopgolf.serve.sampling import SamplingParams
from loopgolf.serve.scoring import evaluate_early_exit

PLANS = {
    "vanilla": (PlanSpec("vanilla", layers=3), {}),
    "cycle": (PlanSpec("cycle", layers=2, loops=3), {}),
    "cycle+lora+controls": (
        PlanSpec("cycle", layers=2, loops=2),
        dict(lora_ranks={"q": 2, "v": 2, "mlp_in": 2}, per_layer_controls=True, depth_embeddings=True),
    ),
    "sequence": (PlanSpec("sequence", layers=2, loops=2), {}),
    "cycle-rev": (PlanSpec("cycle-rev", layers=2, loops=3), {}),
    "middle-cycle": (PlanSpec("middle-cycle", layers=2, loops=2, first=1, last=1), {}),
    "middle-sequence": (PlanSpec("middle-sequence", layers=2, loops=2, first=1, last=1), {}),
    "mini-loop": (PlanSpec("mini-loop", layers=4, loops=2, loop_start=1, loop_end=2), {}),
    "share-mlp": (PlanSpec("cycle", layers=2, loops=2, share="mlp"), {}),
    "layernorm+learned-pos": (PlanSpec("cycle", layers=2, loops=2), dict(norm="layer", bias=True, pos_emb="learned")),
    # Every option of the record's architecture at once, on a plan that shares a block.
    "record-options": (
        PlanSpec("mini-loop", layers=4, loops=2, loop_start=1, loop_end=2),
        dict(mlp_act="leaky_relu2", ln_scale=True, rope_dims=4, xsa=True, attn_gate=True, attn_gate_scale=0.5, gate_window=8, skip_gates=True, smear_gate=True),
    ),
    # The GPT-J parallel residual on a block that runs in every pass.
    "parallel-residual": (PlanSpec("cycle", layers=2, loops=2), dict(parallel_from=1)),
    # Two lanes: merging into a one-stream layer and splitting again (the looped pair mixes a
    # two-lane block with an ordinary one), and every layer two-lane on a cycle (a stored block's
    # rows arrive as one stream at its first pass and as lanes at its second).
    "two-lanes-mixed": (PlanSpec("mini-loop", layers=4, loops=2, loop_start=1, loop_end=2), dict(parallel_from=2, parallel_lanes=True, skip_gates=True)),
    "two-lanes-cycle": (PlanSpec("cycle", layers=2, loops=2), dict(parallel_from=0, parallel_lanes=True, per_layer_controls=True, depth_embeddings=True)),
}


@torch.no_grad()
def greedy_uncached(model: GPT, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_cached_greedy_equals_uncached_forward_for_every_plan():
    for name, (plan, kw) in PLANS.items():
        model = random_model(plan, **kw)
        prompt = [1, 5, 9, 2, 33, 7]
        want = greedy_uncached(model, prompt, 12)
        got = Generator(model).generate(prompt, 12, temperature=0.0)
        assert got.token_ids == want, name
        assert got.finish_reason == "length"


def test_cached_logits_match_forward_closely():
    model = random_model(*PLANS["cycle+lora+controls"][:1], **PLANS["cycle+lora+controls"][1])
    ids = [3, 17, 4, 60, 8, 8, 21]
    engine = Engine(model, schedule="depthwise", slots=2)
    seen = []
    from loopgolf.serve.runner import Token

    tokens = [Token(0, p, t) for p, t in enumerate(ids)]
    engine.runner.run(tokens)
    seen = torch.stack([t.logits for t in tokens])
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0]
    assert torch.allclose(seen, ref, atol=1e-4), float((seen - ref).abs().max())


def test_never_exiting_is_full_depth_and_after_one_is_the_first_loop():
    plan, kw = PLANS["cycle"]
    model = random_model(plan, seed=3, **kw)
    prompt = [1, 2, 3, 4]
    full = greedy_uncached(model, prompt, 10)
    never = Generator(model, criterion=parse_criterion("never")).generate(prompt, 10, temperature=0.0)
    assert never.token_ids == full and set(never.loops) == {3}
    # maxprob:1.0 cannot fire on a finite softmax... unless the head is saturated; agree never
    # fires on a token's first pass: both keep every token that disagrees at full depth.
    after1 = Generator(model, criterion=parse_criterion("after:1")).generate(prompt, 10, temperature=0.0)
    model.set_stage(0)
    first_loop = greedy_uncached(model, prompt, 10)
    model.set_stage(None)
    assert after1.token_ids == first_loop and set(after1.loops) == {1}
    after2 = Generator(model, criterion=parse_criterion("after:2")).generate(prompt, 10, temperature=0.0)
    assert set(after2.loops) == {2}


def test_criterion_and_sampling_errors_are_clear():
    for bad in ("maxprob", "maxprob:0", "maxprob:1.5", "after:0", "after:x", "sometimes", ""):
        with pytest.raises(ValueError, match="never"):
            parse_criterion(bad)
    assert str(parse_criterion("maxprob:0.9")) == "maxprob:0.9"
    for kw in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**kw)
    with pytest.raises(ValueError, match="empty"):
        Request([])
    with pytest.raises(ValueError, match="max_new_tokens"):
        Request([1], max_new_tokens=0)
    model = random_model(PlanSpec("vanilla", layers=1))
    with pytest.raises(ValueError, match="context"):
        Engine(model, slots=1).submit(Request([1] * 60, max_new_tokens=10))
    with pytest.raises(ValueError, match="token ids"):
        Engine(model, slots=1).submit(Request([99]))
    with pytest.raises(ValueError, match="schedule"):
        Engine(model, schedule="fifo")


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = random_model(PlanSpec("cycle", layers=2, loops=2), seed=5)
    gen = Generator(model)
    a = gen.generate([1, 2], 12, temperature=1.0, seed=7).token_ids
    b = gen.generate([1, 2], 12, temperature=1.0, seed=7).token_ids
    assert a == b
    greedy = gen.generate([1, 2], 12, temperature=0.0).token_ids
    assert gen.generate([1, 2], 12, temperature=1.3, top_k=1, seed=1).token_ids == greedy


def test_queue_bound_and_cancel():
    model = random_model(PlanSpec("vanilla", layers=1))
    engine = Engine(model, slots=1, max_queue=2)
    reqs = [Request([1, 2], 4) for _ in range(2)]
    for r in reqs:
        engine.submit(r)
    with pytest.raises(QueueFull):
        engine.submit(Request([1], 4))
    engine.step()  # the first is admitted
    engine.cancel(reqs[0])
    engine.cancel(reqs[1])  # still waiting: ends at once
    assert reqs[1].finish_reason == "cancelled"
    engine.run_until_idle()
    assert reqs[0].finish_reason == "cancelled" and engine.idle
    assert len(engine.free_slots) == 1


def test_offline_serving_takes_more_requests_than_the_queue_bound():
    """``run_offline`` is given its whole list: the server's queue bound does not refuse it
    (``bench serve --requests 256`` failed with QueueFull before)."""
    model = random_model(PlanSpec("cycle", layers=1, loops=2), seed=1)
    engine = Engine(model, slots=2, max_queue=3)
    reqs = [Request([1 + i % 7, 2], 2, SamplingParams(temperature=0.0)) for i in range(9)]
    engine.run_offline(reqs, realtime=False)
    assert all(r.finish_reason == "length" and len(r.generated) == 2 for r in reqs)


def _alone(model: GPT, prompt: list[int], n: int, criterion: ExitCriterion | None, exit_state: str = "fill") -> list[int]:
    return Generator(model, criterion=criterion, exit_state=exit_state).generate(prompt, n, temperature=0.0).token_ids


SCHED_MODEL = random_model(PlanSpec("cycle", layers=2, loops=3), seed=11)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 63), min_size=1, max_size=6),  # prompt
            st.integers(1, 6),  # max new tokens
            st.integers(0, 4),  # arrival step
        ),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(SCHEDULES),
    st.integers(1, 4),
    st.sampled_from(["never", "agree", "after:2", "maxprob:0.2"]),
    st.sampled_from(["fill", "share"]),
)
def test_scheduler_keeps_every_request_whole_and_equal_to_alone(specs, schedule, slots, crit, exit_state):
    """Random arrivals and lengths: each request gets exactly its tokens, in order, equal to
    what it gets when served alone (greedy; exits are per token, so batching cannot change
    them), and every streamed event is delivered once."""
    model, criterion = SCHED_MODEL, parse_criterion(crit)
    engine = Engine(model, schedule=schedule, slots=slots, criterion=criterion, exit_state=exit_state, max_queue=100)
    events: dict[int, list[int]] = {i: [] for i in range(len(specs))}
    reqs = []
    for i, (prompt, n, _) in enumerate(specs):
        reqs.append(Request(prompt, n, SamplingParams(temperature=0.0), on_event=lambda e, i=i: events[i].append(e.token_id)))
    step = 0
    with torch.inference_mode():
        while step < 200 and (any(not r.finished for r in reqs)):
            for r, (_, _, at) in zip(reqs, specs):
                if at == step:
                    engine.submit(r)
            engine.step()
            step += 1
    assert engine.idle
    for i, (r, (prompt, n, _)) in enumerate(zip(reqs, specs)):
        assert r.finish_reason == "length"
        assert len(r.generated) == n
        assert [t for t in events[i] if t >= 0] == r.generated  # streamed once each, in order
        assert r.generated == _alone(model, prompt, n, criterion, exit_state)


def test_depthwise_mixes_depths_in_one_call():
    """The depth-wise engine's model calls see rows at several virtual layers at once."""
    model = random_model(PlanSpec("cycle", layers=1, loops=3), seed=2)
    engine = Engine(model, schedule="depthwise", slots=4)
    runner = engine.runner
    seen_mixed = []
    orig = model.layer

    def spy(v, *a, **k):
        if not isinstance(v, int):
            seen_mixed.append(len(set(v)) > 1)
        return orig(v, *a, **k)

    model.layer = spy
    try:
        for i in range(4):
            engine.submit(Request([1 + i] * (i + 1), 5, SamplingParams(temperature=0.0)))
            engine.step()
        engine.run_until_idle()
    finally:
        del model.layer
    assert any(seen_mixed)
    assert runner.layer_rows > runner.layer_calls


@pytest.mark.parametrize("exit_state", ["fill", "share"])
def test_early_exit_scoring_never_equals_evaluate_bpb(exit_state):
    vocab = TINY["vocab_size"]
    model = random_model(PlanSpec("cycle", layers=2, loops=2), seed=4)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=16 * 4 + 1).astype(np.uint16)
    tables = random_byte_tables(vocab, seed=1)
    full = evaluate_bpb(model, tokens, tables, seq_len=16, batch_size=2)
    never = evaluate_early_exit(model, tokens, tables, 16, parse_criterion("never"), exit_state=exit_state, batch_size=3)
    assert never.val_bpb == pytest.approx(full.val_bpb, rel=1e-6)
    assert never.mean_loops == 2.0
    early = evaluate_early_exit(model, tokens, tables, 16, parse_criterion("after:1"), exit_state=exit_state, batch_size=3)
    assert early.exit_state == exit_state
    assert early.mean_loops == 1.0
    model.set_stage(0)
    first = evaluate_bpb(model, tokens, tables, seq_len=16, batch_size=2)
    model.set_stage(None)
    # After loop 1 every token exits, and the deeper layers' keys come from exit states that no
    # later token reads at a shallower layer, so scoring equals the first loop alone.
    assert early.val_bpb == pytest.approx(first.val_bpb, rel=1e-5)


# ---------------------------------------------------------------- artifacts, CLI and the HTTP server

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_openai_client_streams_and_matches_the_generator(tiny_artifact):
    import openai

    artifact, tok = tiny_artifact
    with running_server(artifact, tok) as (url, served, _):
        want = Generator(served.model, served.tokenizer).generate("the model", 8, temperature=0.0)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        out = client.completions.create(model="tiny", prompt="the model", max_tokens=8, temperature=0)
        assert out.choices[0].text == want.text and out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 8
        chunks = list(client.completions.create(model="tiny", prompt="the model", max_tokens=8, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == "length"
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"


def test_concurrent_clients_each_get_their_alone_output(tiny_artifact):
    import openai

    artifact, tok = tiny_artifact
    prompts = ["the model", "data flows", "each loop adds", "a few unique blocks", "training stable", "the cap"]
    with running_server(artifact, tok, slots=3) as (url, served, engine):
        gen = Generator(served.model, served.tokenizer)
        want = [gen.generate(p, 6 + i, temperature=0.0).text for i, p in enumerate(prompts)]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def ask(i: int) -> str:
            if i % 2:  # raw HTTP beside the official client
                status, body = post_completion(url, {"prompt": prompts[i], "max_tokens": 6 + i, "temperature": 0})
                assert status == 200, body
                return body["choices"][0]["text"]
            return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=6 + i, temperature=0).choices[0].text

        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(ask, range(len(prompts))))
        assert got == want
        assert engine.idle


def test_bad_requests_get_the_right_status(tiny_artifact):
    artifact, tok = tiny_artifact
    with running_server(artifact, tok, max_body_bytes=4096) as (url, _, _):
        cases = [
            (None, b"{not json", 400, "malformed JSON"),
            ([1, 2], None, 400, "JSON object"),
            ({"prompt": "x", "temperature": 0, "frobnicate": 1}, None, 400, "frobnicate"),
            ({"prompt": "x", "model": "gpt-4"}, None, 404, "gpt-4"),
            ({"prompt": "x", "temperature": -1}, None, 400, "temperature"),
            ({"prompt": "x", "top_p": 0}, None, 400, "top_p"),
            ({"prompt": "x", "max_tokens": 0}, None, 400, "max_tokens"),
            ({"prompt": "x", "max_tokens": "many"}, None, 400, "max_tokens"),
            ({"prompt": []}, None, 400, "prompt"),  # (an empty string is fine: it continues BOS)
            ({"prompt": [5000]}, None, 400, "token ids"),
            ({"prompt": "x", "stream": "yes"}, None, 400, "stream"),
            ({"prompt": "the model " * 60, "max_tokens": 4}, None, 400, "context"),
            ({"prompt": "x" * 5000}, None, 413, "limit"),
            ({"prompt": "x", "n": 2}, None, 400, "n=1"),
        ]
        for body, raw, status, words in cases:
            got, payload = post_completion(url, body, raw)
            assert got == status, (body, raw, payload)
            assert words in payload["error"]["message"], payload


def test_full_queue_answers_429_and_slow_requests_504(tiny_artifact):
    artifact, tok = tiny_artifact
    with running_server(artifact, tok, max_queue=0) as (url, _, _):
        status, payload = post_completion(url, {"prompt": "x", "max_tokens": 2})
        assert status == 429 and "busy" in payload["error"]["message"]
    with running_server(artifact, tok, request_timeout=0.05) as (url, _, engine):
        status, payload = post_completion(url, {"prompt": "the model", "max_tokens": 90, "temperature": 0})
        assert status == 504 and "cancelled" in payload["error"]["message"]
        deadline = time.monotonic() + 10
        while not engine.idle:  # the timed-out request is retired, its slot freed
            assert time.monotonic() < deadline
            time.sleep(0.05)


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "loopgolf", *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_generate_cli_streams_text_and_json(tiny_artifact):
    artifact, tok = tiny_artifact
    r = _cli("generate", str(artifact), "--tokenizer", str(tok), "--prompt", "the model", "--max-new-tokens", "6", "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 6 and out["finish_reason"] == "length" and out["loops"] == [2] * 6
    plain = _cli("generate", str(artifact), "--tokenizer", str(tok), "--prompt", "the model", "--max-new-tokens", "6", "--temperature", "0")
    assert plain.returncode == 0 and plain.stdout == "the model" + out["text"] + "\n"
    bad = _cli("generate", str(artifact), "--tokenizer", str(tok), "--prompt", "x", "--early-exit", "maxprob:2")
    assert bad.returncode != 0 and "maxprob" in bad.stderr and "Traceback" not in bad.stderr
    lonely = _cli("generate", str(artifact), "--tokenizer", str(tok), "--prompt", "x", "--exit-state", "fill")
    one_line_error(lonely.returncode, lonely.stderr, "needs --early-exit")
    missing = _cli("generate", str(artifact), "--prompt", "x")
    assert missing.returncode != 0 and "--tokenizer" in missing.stderr


def test_serve_shuts_down_cleanly_on_sigterm_with_a_request_in_flight(tiny_artifact):
    artifact, tok = tiny_artifact
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loopgolf", "serve", str(artifact), "--tokenizer", str(tok), "--port", str(port), "--context", "128", "--shutdown-grace", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        results: list[dict] = [{} for _ in range(4)]
        started = threading.Event()

        def stream(result: dict) -> None:  # long streamed completions, in flight when SIGTERM comes
            body = json.dumps({"prompt": "the", "max_tokens": 120, "stream": True}).encode()
            try:
                with urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", data=body), timeout=60) as r:
                    lines = []
                    for line in r:
                        lines.append(line.decode())
                        started.set()
                    result["body"] = "".join(lines)
            except Exception as e:
                result["error"] = repr(e)
            started.set()

        threads = [threading.Thread(target=stream, args=(r,)) for r in results]
        for t in threads:
            t.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = proc.wait(timeout=60)
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive()
        assert rc == 0, proc.stderr.read()
        assert time.monotonic() - t0 < 30
        for result in results:  # each finished (by length) or was told it was cancelled: never hung, never cut off
            body = result.get("body", "")
            assert "error" not in result, result
            assert body.endswith("data: [DONE]\n\n"), body[-200:]
            assert '"finish_reason": "length"' in body or "shutting down" in body, body[-300:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_eval_early_exit_cli_never_equals_plain_eval(tiny_artifact, text_dataset):
    artifact, _ = tiny_artifact
    common = [str(artifact), "--data", str(text_dataset), "--seq-len", "32", "--max-tokens", "256", "--json"]
    plain = _cli("eval", *common)
    assert plain.returncode == 0, plain.stderr
    never = _cli("eval", *common, "--early-exit", "never")
    assert never.returncode == 0, never.stderr
    early = _cli("eval", *common, "--early-exit", "after:1")
    assert early.returncode == 0, early.stderr
    p, n, e = (json.loads(r.stdout[r.stdout.index("{") :]) for r in (plain, never, early))
    assert n["val_bpb"] == pytest.approx(p["val_bpb"], rel=1e-6) and n["mean_loops"] == 2.0
    assert e["mean_loops"] == 1.0 and e["loop_histogram"][0] == e["num_targets"]
    bad = _cli("eval", *common, "--early-exit", "sometimes")
    assert bad.returncode != 0 and "unknown exit criterion" in bad.stderr
    fill = _cli("eval", *common, "--early-exit", "after:1", "--exit-state", "fill")
    assert fill.returncode == 0, fill.stderr
    f = json.loads(fill.stdout[fill.stdout.index("{") :])
    assert e["exit_state"] == "share" and f["exit_state"] == "fill"  # share is the default
    assert f["val_bpb"] == pytest.approx(e["val_bpb"], rel=1e-6)  # after:1: nothing reads the deeper entries
    for args, words in (
        (["--exit-state", "share"], ("needs --early-exit",)),
        (["--early-exit", "after:1", "--exit-state", "copy"], ("--exit-state", "invalid choice")),
    ):
        r = _cli("eval", *common, *args)
        one_line_error(r.returncode, r.stderr, *words)


def test_bench_serve_smoke(tiny_artifact, text_dataset):
    artifact, tok = tiny_artifact
    r = _cli(
        "bench",
        "serve",
        str(artifact),
        "--tokenizer",
        str(tok),
        "--data",
        str(text_dataset),
        "--requests",
        "4",
        "--prompt-len",
        "4,8",
        "--output-len",
        "3,6",
        "--slots",
        "2",
        "--eval-tokens",
        "128",
        "--server-requests",
        "2",
        "--concurrency",
        "2",
        "--repeats",
        "2",
        "--json",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("speedup_vs_static", "speedup_vs_sequence_batching", "bpb_cost_fraction", "mean_loops_per_token"):
        assert isinstance(out[key], float), key
    assert set(out["engines"]) == {"static", "sequence", "sequence_exit", "depthwise"}
    for e in out["engines"].values():
        assert e["tokens_per_s"] > 0 and e["p99_latency_s"] >= e["p50_latency_s"] > 0
    assert out["full_depth_engines_agree"] and out["exit_engines_agree"]
    assert out["server"]["ok"] == 2 and out["server"]["sigterm_exit_code"] == 0
    assert "depth-wise vs static" in r.stdout and out["repeats"] == 2
    assert all(len(e["tokens_per_s_rounds"]) == 2 for e in out["engines"].values())


def test_a_run_does_not_import_serve():
    """The command line builds only the parser of the command it runs: `loopgolf run` loads none
    of loopgolf.serve (nor counts it in its code bytes)."""
    code = (
        "import sys, loopgolf.cli, loopgolf.run; loopgolf.cli.build_parser(['run', '--preset', 'debug']); "
        "print(any(m.startswith('loopgolf.serve') for m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


@torch.no_grad()
def frozen_exit_reference(model: GPT, ids: list[int], threshold: float, exit_state: str = "fill") -> tuple[Tensor, list[int]]:
    """Full-sequence forward where a position whose top probability after a pass reaches
    ``threshold`` stops there, written as a plain causal forward. ``fill``: it keeps that
    residual for every deeper layer (its keys and values there come from it; no U-Net skip is
    added to it). ``share``: a deeper layer whose attention block the position ran before uses
    the keys and values of its last such run instead (``fill`` where it never ran the block).
    Returns each position's logits (at its exit) and passes run."""
    from loopgolf.model.gpt import causal_attention

    last_kv: dict[int, tuple[Tensor, Tensor]] = {}  # attention block -> its latest keys and values

    def attend_with(block: int):
        def attend(q: Tensor, k: Tensor, val: Tensor) -> Tensor:
            if exit_state == "share" and block in last_kv:
                old_k, old_v = last_kv[block]
                keep = frozen[None, None, :, None]
                k, val = torch.where(keep, old_k, k), torch.where(keep, old_v, val)
            last_kv[block] = (k, val)
            return causal_attention(q, k, val)

        return attend

    idx = torch.tensor([ids])
    cos, sin = model.rotary(idx.size(1)) if model.rotary is not None else (None, None)
    x = model.embed(idx)
    x0, outputs = x, {}
    frozen = torch.zeros(len(ids), dtype=torch.bool)
    kept = x.clone()
    logits = torch.zeros(len(ids), model.config.vocab_size)
    loops = [0] * len(ids)
    exits = set(model.loop_exits())
    passes = [max(model.active_passes[: j + 1]) for j in range(len(model.active_layers))]
    for j, v in enumerate(model.active_layers):
        row, enc = model.skip_from.get(v, (None, None))
        if enc in outputs:
            x = x + model.skip_weight[row].to(x.dtype) * outputs.pop(enc)
        x = torch.where(frozen[None, :, None], kept, x)
        x = model.layer(v, x, x0, cos, sin, attend_with(model.plan.attn_of[v]))
        if v in model.skip_sources:
            outputs[v] = x
        if j in exits:
            probs = model.head(model.norm(x, "final_norm"))[0].softmax(-1)
            fire = (probs.max(-1).values >= threshold) & ~frozen
            for p in fire.nonzero()[:, 0].tolist():
                logits[p], loops[p] = model.head(model.norm(x, "final_norm"))[0, p], passes[j] + 1
            kept = torch.where(fire[None, :, None], x, kept)
            frozen |= fire
    final = model.head(model.norm(x, "final_norm"))[0]
    for p in (~frozen).nonzero()[:, 0].tolist():
        logits[p], loops[p] = final[p], passes[-1] + 1
    return logits, loops


@pytest.mark.parametrize("exit_state", ["fill", "share"])
@pytest.mark.parametrize("name", ["cycle", "cycle+lora+controls", "middle-cycle", "mini-loop", "share-mlp"])
def test_exited_tokens_leave_keys_and_values_from_their_exit_state(name, exit_state):
    """Cached, token by token, equals the scheme's own full-sequence reference forward."""
    from loopgolf.serve.runner import LayerRunner, Token

    plan, kw = PLANS[name]
    model = random_model(plan, seed=21, **kw)
    ids = [int(i) for i in torch.randint(0, 64, (24,), generator=torch.Generator().manual_seed(0))]
    probs = []
    with torch.no_grad():  # a threshold that makes roughly half the positions exit somewhere
        for lg in model.loop_logits(torch.tensor([ids]))[:-1]:
            probs.append(lg[0].softmax(-1).max(-1).values)
    threshold = float(torch.cat(probs).median())
    ref_logits, ref_loops = frozen_exit_reference(model, ids, threshold, exit_state)
    assert 0 < sum(n < model.plan.num_loops for n in ref_loops) < len(ids)  # some exit, some do not
    if exit_state == "share" and name != "share-mlp":  # (unique attention blocks: nothing to share, all fill)
        assert not torch.allclose(ref_logits, frozen_exit_reference(model, ids, threshold, "fill")[0], atol=1e-3)  # the scheme matters
    runner = LayerRunner(model, 1, 32, parse_criterion(f"maxprob:{threshold}"), exit_state)
    tokens = [Token(0, p, t) for p, t in enumerate(ids)]
    with torch.inference_mode():
        runner.run(tokens)
    assert [t.loops for t in tokens] == ref_loops
    got = torch.stack([t.logits for t in tokens])
    assert torch.allclose(got, ref_logits, atol=1e-4), float((got - ref_logits).abs().max())

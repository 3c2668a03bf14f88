"""`loopgolf bench serve`: the three engines on one model and one request stream, the quality
cost of early exit, and a load test against `loopgolf serve` from a second process.

Requests: prompts cut from the validation tokens at random offsets, prompt and output lengths
drawn uniformly from the given ranges, greedy decoding (so every engine generates the same
tokens and the comparison is of speed alone), all submitted at t = 0 unless ``--arrival-rate``
spaces them as a Poisson stream. Tokens/s counts generated tokens over the wall time of the whole
stream; latency is submit -> last token per request, queueing included. The four engines run
back to back in each of ``repeats`` rounds; speedups are medians of within-round ratios (a shared
CPU's speed drifts by tens of percent over a minute), each reported with its min and max over the
rounds (``speedups``; the text flags a spread that straddles 1.0x), per-engine figures the median
round's.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loopgolf.serve.engine import Engine
from loopgolf.serve.exits import DEFAULT_EXIT_STATE, ExitCriterion, check_exit_state, check_fires, parse_criterion
from loopgolf.serve.request import Request
from loopgolf.serve.sampling import SamplingParams


@dataclass
class StreamSpec:
    requests: int = 32
    prompt_len: tuple[int, int] = (16, 96)
    output_len: tuple[int, int] = (16, 64)
    arrival_rate: float = 0.0  # requests/s; 0: all at once
    seed: int = 0


def make_requests(tokens: np.ndarray, spec: StreamSpec) -> list[Request]:
    rng = random.Random(spec.seed)
    t, out = 0.0, []
    for _ in range(spec.requests):
        n = rng.randint(*spec.prompt_len)
        start = rng.randrange(0, len(tokens) - n)
        if spec.arrival_rate > 0:
            t += rng.expovariate(spec.arrival_rate)
        out.append(Request([int(x) for x in tokens[start : start + n]], rng.randint(*spec.output_len), SamplingParams(0.0), arrival=t))
    return out


def _copy(reqs: list[Request]) -> list[Request]:
    return [Request(list(r.prompt_ids), r.max_new_tokens, r.sampling, arrival=r.arrival) for r in reqs]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_engine(
    model, reqs: list[Request], schedule: str, criterion: ExitCriterion | None, slots: int, max_len: int, exit_state: str = DEFAULT_EXIT_STATE
) -> dict[str, Any]:
    """Serve ``reqs`` (copied) on a fresh engine; tokens/s, latency, passes and the time split."""
    warm = Engine(model, schedule=schedule, slots=slots, max_len=max_len, criterion=criterion, exit_state=exit_state)
    warm.run_offline(_copy(reqs[:2]), realtime=False)  # first-call costs out of the measurement
    eng = Engine(model, schedule=schedule, slots=slots, max_len=max_len, criterion=criterion, exit_state=exit_state)
    mine = _copy(reqs)
    wall = eng.run_offline(mine, realtime=any(r.arrival > 0 for r in mine))
    tokens = sum(len(r.generated) for r in mine)
    lat = [r.latency() for r in mine]
    ttft = [r.first_token_at - r.submitted_at for r in mine]
    loops = [x for r in mine for x in r.loops]
    sec = dict(eng.runner.seconds)
    return {
        "schedule": schedule,
        "early_exit": str(criterion) if criterion is not None else "off",
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "p50_latency_s": _pct(lat, 50),
        "p99_latency_s": _pct(lat, 99),
        "p50_ttft_s": _pct(ttft, 50),
        "mean_loops_per_token": sum(loops) / len(loops),
        "engine_steps": eng.steps,
        "layer_calls": eng.runner.layer_calls,
        "rows_per_layer_call": eng.runner.layer_rows / max(1, eng.runner.layer_calls),
        "seconds": {**{k: round(v, 4) for k, v in sec.items()}, "scheduling_and_rest": round(wall - sum(sec.values()), 4)},
        "outputs": [r.generated for r in mine],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def load_test(
    model_path: str,
    tokenizer: str | None,
    reqs: list[Request],
    criterion: str | None,
    slots: int,
    concurrency: int,
    timeout: float = 300.0,
    exit_state: str = DEFAULT_EXIT_STATE,
    device: str = "cpu",
) -> dict[str, Any]:
    """Start `loopgolf serve` in a second process on a free localhost port, send ``reqs`` from
    ``concurrency`` client threads, then SIGTERM it; bounded by ``timeout`` seconds overall."""
    port = _free_port()
    cmd = [sys.executable, "-m", "loopgolf", "serve", model_path, "--port", str(port), "--slots", str(slots), "--device", device]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    if criterion:
        cmd += ["--early-exit", criterion, "--exit-state", exit_state]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"`loopgolf serve` exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not answer /health in time")
            time.sleep(0.2)
        queue = list(reqs)
        lock = threading.Lock()
        results: list[tuple[float, int]] = []
        errors: list[str] = []

        def client() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    r = queue.pop(0)
                t0 = time.perf_counter()
                try:
                    out = _post(
                        base + "/v1/completions",
                        {"prompt": r.prompt_ids, "max_tokens": r.max_new_tokens, "temperature": 0},
                        max(1.0, deadline - time.monotonic()),
                    )
                    with lock:
                        results.append((time.perf_counter() - t0, out["usage"]["completion_tokens"]))
                except Exception as e:
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")

        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
        wall = time.perf_counter() - start
    finally:
        t_term = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        shutdown = time.perf_counter() - t_term
    lat = [x for x, _ in results]
    tokens = sum(n for _, n in results)
    return {
        "early_exit": criterion or "off",
        "requests": len(reqs),
        "ok": len(results),
        "errors": errors[:5],
        "concurrency": concurrency,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "p50_latency_s": _pct(lat, 50),
        "p99_latency_s": _pct(lat, 99),
        "sigterm_exit_code": rc,
        "shutdown_s": shutdown,
    }


# The headline ratios: name -> (engine, baseline engine), each a tokens/s ratio within a round.
SPEEDUPS = {
    "speedup_vs_static": ("depthwise", "static"),
    "speedup_vs_sequence_batching": ("depthwise", "sequence"),
    "speedup_exit_vs_sequence_batching": ("sequence_exit", "sequence"),
}


def ratio_spread(per_round: list[float]) -> dict[str, Any]:
    """A ratio measured once per round: its median (the headline), min, max and every round's
    value. A spread that straddles 1.0 means the rounds disagree on which engine is faster."""
    return {
        "median": statistics.median(per_round),
        "min": min(per_round),
        "max": max(per_round),
        "rounds": [round(x, 4) for x in per_round],
        "straddles_1": min(per_round) < 1.0 < max(per_round),
    }


def format_ratio(spread: dict[str, Any]) -> str:
    """``1.13x (0.98-1.40x over 3 rounds)``; a spread across 1.0 is flagged."""
    n = len(spread["rounds"])
    if n == 1:
        return f"{spread['median']:.2f}x (1 round: no spread)"
    flag = ", rounds disagree on which is faster" if spread["straddles_1"] else ""
    return f"{spread['median']:.2f}x ({spread['min']:.2f}-{spread['max']:.2f}x over {n} rounds{flag})"


def default_criterion(model) -> ExitCriterion:
    """``agree`` where it can fire (plans of 3 or more passes), else ``maxprob:0.5``."""
    return parse_criterion("agree" if len(model.loop_exits()) >= 2 else "maxprob:0.5")


def bench_serve(
    model_path: str,
    *,
    tokenizer: str | None = None,
    data: str | None = None,
    criterion: str | None = None,
    exit_state: str = DEFAULT_EXIT_STATE,
    device: str = "cpu",
    spec: StreamSpec = StreamSpec(),
    slots: int = 8,
    eval_tokens: int = 16384,
    server_requests: int = 16,
    concurrency: int = 4,
    threads: int | None = None,
    repeats: int = 3,
) -> dict[str, Any]:
    from loopgolf.data.stats import find_tokenizer
    from loopgolf.serve.scoring import evaluate_early_exit
    from loopgolf.sources.open import load_model_tokenizer, open_data, open_model, resolve_data_dir

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if threads:
        torch.set_num_threads(threads)
    from loopgolf.device import resolve_device

    check_exit_state(exit_state)
    opened = open_model(model_path, resolve_device(device))
    model = opened.model
    data_dir = resolve_data_dir(opened, data)
    # The tokenizer: given, else the one next to the data (as `eval` finds it), else the run's.
    _, tok_path = load_model_tokenizer(opened, tokenizer or find_tokenizer(data_dir))
    ds = open_data(opened, data_dir, tok_path, verify=False)
    val = ds.val_tokens()
    crit = parse_criterion(criterion) if criterion else default_criterion(model)
    check_fires(crit, model)
    reqs = make_requests(val, spec)
    max_len = min(model.config.max_seq_len, spec.prompt_len[1] + spec.output_len[1])
    setups = (("static", "static", None), ("sequence", "sequence", None), ("sequence_exit", "sequence", crit), ("depthwise", "depthwise", crit))
    rounds: list[dict[str, dict[str, Any]]] = []
    with torch.inference_mode():
        # Warm the process once over the whole stream (allocator, thread pool, kernels) so that the
        # engine measured first is not charged for it.
        Engine(model, schedule="depthwise", slots=slots, max_len=max_len, criterion=crit, exit_state=exit_state).run_offline(_copy(reqs), realtime=False)
        # Rounds of all four engines back to back: a shared machine's speed drifts over seconds,
        # so the speedups are ratios within a round, and the medians over rounds are reported.
        for _ in range(repeats):
            rounds.append({name: run_engine(model, reqs, schedule, c, slots, max_len, exit_state) for name, schedule, c in setups})
        seq_len = min(opened.seq_len, model.config.max_seq_len)
        full = evaluate_early_exit(model, val, ds.tables, seq_len, parse_criterion("never"), max_tokens=eval_tokens)
        early = evaluate_early_exit(model, val, ds.tables, seq_len, crit, exit_state=exit_state, max_tokens=eval_tokens)
    same = all(r["static"]["outputs"] == r["sequence"]["outputs"] == rounds[0]["static"]["outputs"] for r in rounds)
    exit_same = all(r["sequence_exit"]["outputs"] == r["depthwise"]["outputs"] == rounds[0]["depthwise"]["outputs"] for r in rounds)
    for r in rounds:
        for e in r.values():
            e.pop("outputs")

    def ratio(a: str, b: str) -> dict[str, Any]:
        return ratio_spread([r[a]["tokens_per_s"] / r[b]["tokens_per_s"] for r in rounds])

    engines = {}
    for name, _, _ in setups:  # the round with the median tokens/s stands for each engine
        by_speed = sorted((r[name] for r in rounds), key=lambda e: e["tokens_per_s"])
        engines[name] = {**by_speed[(len(by_speed) - 1) // 2], "tokens_per_s_rounds": [round(r[name]["tokens_per_s"], 1) for r in rounds]}
    server = None
    if server_requests > 0:
        # The server gets the tokenizer and the criterion measured above (the default one too).
        server = load_test(str(model_path), str(tok_path), reqs[:server_requests], str(crit), slots, concurrency, exit_state=exit_state, device=device)
    d = engines["depthwise"]
    speedups = {name: ratio(a, b) for name, (a, b) in SPEEDUPS.items()}
    return {
        "model": str(opened.path),
        "plan": model.plan.describe(),
        "criterion": str(crit),
        "exit_state": exit_state,
        "device": str(next(model.parameters()).device),
        "requests": spec.requests,
        "prompt_len": list(spec.prompt_len),
        "output_len": list(spec.output_len),
        "slots": slots,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        **{key: spread["median"] for key, spread in speedups.items()},
        "speedups": speedups,
        "bpb_full": full.val_bpb,
        "bpb_early_exit": early.val_bpb,
        "bpb_cost_fraction": (early.val_bpb - full.val_bpb) / full.val_bpb,
        "eval_tokens": full.num_targets,
        "eval_mean_loops": early.mean_loops,
        "mean_loops_per_token": d["mean_loops_per_token"],
        "full_loops": model.plan.num_loops,
        "full_depth_engines_agree": same,
        "exit_engines_agree": exit_same,
        "engines": engines,
        "server": server,
    }


def format_bench_serve(r: dict[str, Any]) -> str:
    lines = [
        f"model {r['model']}  plan {r['plan']}  early exit {r['criterion']} ({r['exit_state']})  {r['requests']} requests "
        f"(prompt {r['prompt_len'][0]}-{r['prompt_len'][1]}, output {r['output_len'][0]}-{r['output_len'][1]} tokens), {r['slots']} slots, {r['device']}, {r['threads']} threads",
        f"{'engine':<15}{'exit':>10}{'tok/s':>9}{'p50 s':>8}{'p99 s':>8}{'passes':>8}{'rows/call':>10}  time split (s)",
    ]
    for name, e in r["engines"].items():
        split = ", ".join(f"{k} {v:.2f}" for k, v in e["seconds"].items())
        lines.append(
            f"{name:<15}{e['early_exit']:>10}{e['tokens_per_s']:>9.1f}{e['p50_latency_s']:>8.2f}{e['p99_latency_s']:>8.2f}"
            f"{e['mean_loops_per_token']:>8.2f}{e['rows_per_layer_call']:>10.1f}  {split}"
        )
    sp = r["speedups"]
    lines.append(
        f"tokens/s ratios, median of {r['repeats']} rounds (min-max over rounds): depth-wise vs static {format_ratio(sp['speedup_vs_static'])}, "
        f"vs sequence batching {format_ratio(sp['speedup_vs_sequence_batching'])}; sequence batching with exit vs without "
        f"{format_ratio(sp['speedup_exit_vs_sequence_batching'])}"
    )
    lines.append(
        f"val_bpb {r['bpb_full']:.5f} -> {r['bpb_early_exit']:.5f} with early exit ({100 * r['bpb_cost_fraction']:+.3f}%, "
        f"{r['eval_mean_loops']:.2f} of {r['full_loops']} passes, {r['eval_tokens']:,} tokens)"
    )
    if r["server"]:
        s = r["server"]
        lines.append(
            f"server load test (early exit {s['early_exit']}): {s['ok']}/{s['requests']} ok from {s['concurrency']} clients, {s['tokens_per_s']:.1f} tok/s, "
            f"p50 {s['p50_latency_s']:.2f} s, p99 {s['p99_latency_s']:.2f} s; SIGTERM -> exit {s['sigterm_exit_code']} in {s['shutdown_s']:.2f} s"
        )
    return "\n".join(lines)

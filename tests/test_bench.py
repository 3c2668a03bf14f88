import json
import re

import pytest
import torch

from loopgolf.cli import main
from loopgolf.config import get_preset
from loopgolf.device import matmul_peak
from loopgolf.model.gpt import ModelConfig, forward_flops_per_token
from loopgolf.model.plan import parse_plan

KEYS = ("tokens_per_second", "step_seconds", "model_flops_per_token", "peak_flops", "mfu", "memory_bytes", "device")


def test_bench_train_json_last_line(capsys):
    argv = ["bench", "train", "--preset", "debug", "--plan", "cycle:2x2", "--steps", "3", "--warmup", "1", "--peak-size", "256", "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in KEYS:
        assert key in r, key
    cfg = ModelConfig.from_dict({**get_preset("debug").model.to_dict(), "plan": parse_plan("cycle:2x2").to_dict()})
    assert r["model_flops_per_token"] == 3 * forward_flops_per_token(cfg, 32)  # from the plan, all 4 virtual layers
    assert r["steps"] == 3 and r["batch_tokens"] == 256 and r["device"] == "cpu"
    assert r["tokens_per_second"] == pytest.approx(r["batch_tokens"] / r["step_seconds"], rel=1e-6)
    assert r["mfu"] == pytest.approx(r["model_flops_per_token"] * r["tokens_per_second"] / r["peak_flops"], rel=1e-9)
    assert 0 < r["mfu"] < 1 and r["memory_bytes"] > 2**20 and r["peak_dtype"] == "float32"


def test_bench_table_and_errors(capsys):
    assert main(["bench", "train", "--preset", "debug", "--steps", "1", "--warmup", "0", "--peak-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "MFU" in out and "tokens per second" in out
    with pytest.raises(SystemExit):
        main(["bench", "train", "--steps", "0"])


def test_matmul_peak_is_plausible():
    peak = matmul_peak(torch.device("cpu"), size=256, reps=2, trials=2)
    assert peak.dtype == "float32" and peak.size == 256
    assert 1e8 < peak.flops < 1e14  # somewhere between a slow core and a whole server


# ---------------------------------------------------------------- `bench serve` (issue 27)


def test_bench_help_lists_serve(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "{train,serve}" in out and "(bench serve)" in out
    assert re.search(r"^\s+serve\s+tokens/s and latency", out, re.M), out  # its own line, with its help


def test_a_ratio_is_reported_with_its_spread_over_rounds():
    from loopgolf.bench.serve import format_ratio, ratio_spread

    s = ratio_spread([2.09, 0.60, 1.10])
    assert s["median"] == 1.10 and (s["min"], s["max"]) == (0.60, 2.09) and s["rounds"] == [2.09, 0.6, 1.1] and s["straddles_1"]
    assert format_ratio(s) == "1.10x (0.60-2.09x over 3 rounds, rounds disagree on which is faster)"
    steady = ratio_spread([1.2, 1.3])
    assert not steady["straddles_1"] and format_ratio(steady) == "1.25x (1.20-1.30x over 2 rounds)"
    assert format_ratio(ratio_spread([1.5])) == "1.50x (1 round: no spread)"


@pytest.fixture(scope="module")
def tiny_recursive_artifact(text_dataset, tmp_path_factory):
    """A random cycle:2x2 model over the synthetic dataset's tokenizer, exported at int8 (as the
    `bench serve` smoke test in test_serve.py builds it)."""
    from helpers import tiny_model

    from loopgolf.export.pack import export_model
    from loopgolf.model.plan import PlanSpec

    model = tiny_model(seed=8, vocab_size=384, max_seq_len=128, plan=PlanSpec("cycle", layers=2, loops=2))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    path = tmp_path_factory.mktemp("bench-serve") / "tiny.ptz"
    export_model(model.eval(), path, bits=8)
    return path


def test_bench_serve_prints_the_spread_beside_every_ratio(tiny_recursive_artifact, text_dataset, capsys):
    from loopgolf.bench.serve import SPEEDUPS

    argv = ["bench", "serve", str(tiny_recursive_artifact), "--data", str(text_dataset), "--requests", "3", "--prompt-len", "4,6"]
    argv += ["--output-len", "2,4", "--slots", "2", "--eval-tokens", "128", "--server-requests", "0", "--repeats", "3", "--json"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    r, text = json.loads(lines[-1]), "\n".join(lines[:-1])
    assert r["criterion"] == "maxprob:0.5"  # two passes: the default is one that can fire
    assert set(r["speedups"]) == set(SPEEDUPS)
    for key, (engine, baseline) in SPEEDUPS.items():
        s = r["speedups"][key]
        assert len(s["rounds"]) == 3 and s["min"] <= s["median"] <= s["max"] and r[key] == s["median"]
        assert s["straddles_1"] == (s["min"] < 1 < s["max"])
        # Each round's ratio is that round's tokens/s ratio of the two engines.
        e, b = r["engines"][engine]["tokens_per_s_rounds"], r["engines"][baseline]["tokens_per_s_rounds"]
        assert s["rounds"] == pytest.approx([x / y for x, y in zip(e, b)], rel=0.02)
    spread = r"\d+\.\d\dx \(\d+\.\d\d-\d+\.\d\dx over 3 rounds"
    for label in ("depth-wise vs static", "vs sequence batching", "sequence batching with exit vs without"):
        assert re.search(re.escape(label) + " " + spread, text), (label, text)

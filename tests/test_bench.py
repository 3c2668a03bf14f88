import json

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

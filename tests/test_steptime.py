"""Measured step time for the planner: the budget arithmetic over progressive-recurrence stages,
a real measurement of a tiny model, and the cache (keyed by shape and device; a damaged entry is
measured again)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import loopgolf.train.steptime as steptime
from loopgolf.config import get_preset
from loopgolf.model.gpt import ModelConfig
from loopgolf.model.plan import PlanSpec
from loopgolf.train.steptime import StepTime, step_time

CPU = torch.device("cpu")


def tiny(**changes) -> tuple[ModelConfig, object]:
    base = get_preset("debug")
    cfg = ModelConfig.from_dict({**base.model.to_dict(), "model_dim": 32, "num_heads": 2, "num_kv_heads": 1, **changes})
    return cfg, replace(base.train, seq_len=16, batch_tokens=64, micro_batch_tokens=None)


def test_steps_in_a_budget_follow_each_stage_at_its_own_speed():
    flat = StepTime([0.5], [0.0], "cpu")
    assert flat.steps_in(600) == 1200 and flat.mean_seconds() == 0.5
    # 35% of the budget at 0.2 s per step, the rest at 0.4 s: 210/0.2 + 390/0.4 steps.
    staged = StepTime([0.2, 0.4], [0.0, 0.35], "cpu")
    assert staged.steps_in(600) == int(0.35 * 600 / 0.2 + 0.65 * 600 / 0.4)
    assert staged.mean_seconds() == pytest.approx(600 / (0.35 * 600 / 0.2 + 0.65 * 600 / 0.4))
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            flat.steps_in(bad)


def test_a_real_measurement_times_each_stage(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOPGOLF_CACHE", str(tmp_path))
    cfg, train = tiny(plan=PlanSpec("cycle", layers=1, loops=3).to_dict())
    train = replace(train, recurrence_stages=[0.3, 0.6])
    st = step_time(cfg, train, CPU, steps=1)
    assert len(st.stage_seconds) == 3 and all(t > 0 for t in st.stage_seconds) and not st.cached
    assert st.stage_starts == [0.0, 0.3, 0.6] and st.device.startswith("cpu:")
    again = step_time(cfg, train, CPU, steps=1)
    assert again.cached and again.stage_seconds == st.stage_seconds


def test_the_cache_is_keyed_by_shape_and_device_and_survives_damage(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOPGOLF_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(steptime, "measure", lambda m, t, d, **kw: calls.append(m.model_dim) or [0.1 * len(calls)])
    cfg, train = tiny()
    assert step_time(cfg, train, CPU).stage_seconds == [0.1]
    assert step_time(cfg, train, CPU).cached and len(calls) == 1  # the second plan is instant
    wider, _ = tiny(model_dim=64)
    assert not step_time(wider, train, CPU).cached and calls == [32, 64]  # a shape change measures anew
    assert not step_time(cfg, replace(train, batch_tokens=128), CPU).cached and len(calls) == 3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)  # another thread count is another machine
        assert not step_time(cfg, train, CPU).cached and len(calls) == 4
    finally:
        torch.set_num_threads(threads)
    # A CPU with other vector instructions (a VM that names its CPU only by vendor) is another machine.
    capability = torch.backends.cpu.get_cpu_capability
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512_TEST")
    assert "AVX512_TEST" in steptime.device_key(CPU)
    assert not step_time(cfg, train, CPU).cached and len(calls) == 5
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", capability)
    [entry] = [p for p in (tmp_path / "steptime").iterdir() if json.loads(p.read_text())["stage_seconds"] == [0.1]]
    for damage in ("{not json", json.dumps({"stage_seconds": [-1.0], "device": "x"}), json.dumps({"stage_seconds": "fast"})):
        entry.write_text(damage)
        st = step_time(cfg, train, CPU)
        assert not st.cached and st.stage_seconds[0] > 0
    assert json.loads(entry.read_text())["stage_seconds"] == st.stage_seconds  # rewritten

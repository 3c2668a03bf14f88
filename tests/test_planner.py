import argparse
import json

import pytest
import torch

from loopgolf.cli import add_model_overrides, model_overrides
from loopgolf.config import PRESETS, get_preset
from loopgolf.export.pack import export_model
from loopgolf.export.planner import (
    PlanError,
    add_plan_parser,
    family_presets,
    plan_to_cli,
    predict_bytes,
    run_overrides,
    search,
)
from loopgolf.export.policy import parse_policy
from loopgolf.export.quant import FLOAT_SCHEMES
from loopgolf.model.gpt import GPT, ModelConfig, unique_params_formula
from loopgolf.model.plan import PlanSpec

SMALL = {"model_dim": 128, "num_heads": 2, "num_kv_heads": 1}


def perturbed(cfg: ModelConfig, seed: int = 0) -> GPT:
    """Randomly initialised, then every tensor perturbed (a stand-in for trained weights)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize(
    "preset, policy, codec",
    [
        ("cpu-shared", "int6,fp16max=4096", "brotli"),
        ("cpu-vanilla", "int8", "lzma"),
        ("cpu-shared-lora4", "int5,clip=mse,fp16max=4096,outliers=8", "lzma"),
        ("cpu-mini-loop", "all=6,lowrank=2,fp16max=4096", "brotli"),
    ],
)
def test_prediction_within_two_percent_of_the_real_export(tmp_path, preset, policy, codec):
    cfg = ModelConfig.from_dict({**get_preset(preset).model.to_dict(), **SMALL})
    p = parse_policy(policy)
    info = export_model(perturbed(cfg), tmp_path / "a.lgz", policy=p, codec=codec, meta={"preset": preset, "seed": 1, "steps": 100, "seq_len": 128})
    pred = predict_bytes(cfg, p, codec, weights="init")  # randomly initialised weights
    assert pred["codec"] == codec and pred["unique_params"] == unique_params_formula(cfg)
    assert abs(pred["model_bytes"] / info.total_bytes - 1) < 0.02, (pred["model_bytes"], info.total_bytes)
    assert [r["name"] for r in pred["tensors"]] == list(GPT(cfg).state_dict())
    assert {r["name"]: r["scheme"] for r in pred["tensors"]} == {r["name"]: r["scheme"] for r in info.tensors}


def test_auto_picks_the_smallest_prediction_and_bits_order_sizes():
    cfg = get_preset("pg-shared").model
    preds = {b: predict_bytes(cfg, parse_policy(f"all={b}"), "auto") for b in (8, 6, 4)}
    assert preds[8]["model_bytes"] > preds[6]["model_bytes"] > preds[4]["model_bytes"]
    for pred in preds.values():
        assert pred["model_bytes"] == min(pred["by_codec"].values()) == pred["by_codec"][pred["codec"]]
    with pytest.raises(PlanError, match="unknown codec"):
        predict_bytes(cfg, None, "gzip")


def rebuild(preset: str, overrides: list[str]) -> ModelConfig:
    """What `loopgolf run --preset P OVERRIDES...` builds."""
    parser = argparse.ArgumentParser()
    add_model_overrides(parser)
    args = parser.parse_args(overrides)
    return ModelConfig.from_dict({**get_preset(preset).model.to_dict(), **model_overrides(args)})


def test_search_finds_the_widest_fitting_configurations_best_first():
    cap, code = 4_000_000, 60_000
    policy = parse_policy("int6")
    cands = search(cap, ["cpu-vanilla", "cpu-shared", "cpu-k1"], policy, codec="brotli", code_bytes=code)
    assert [c["preset"] for c in cands] == ["cpu-k1", "cpu-shared", "cpu-vanilla"]  # fewer unique blocks: wider
    keys = [(c["model_dim"], c["virtual_layers"], c["loops"]) for c in cands]
    assert keys == sorted(keys, reverse=True)
    for c in cands:
        assert c["predicted_bytes"] == c["predicted_model_bytes"] + code <= cap and c["headroom_bytes"] >= 0
        cfg = rebuild(c["preset"], c["overrides"])
        assert cfg.model_dim == c["model_dim"] and cfg.num_heads * 64 == cfg.model_dim
        assert predict_bytes(cfg, policy, "brotli")["model_bytes"] == c["predicted_model_bytes"]
        wider = ModelConfig.from_dict({**cfg.to_dict(), "model_dim": cfg.model_dim + 128, "num_heads": cfg.num_heads + 2, "num_kv_heads": cfg.num_kv_heads + 1})
        assert predict_bytes(wider, policy, "brotli")["model_bytes"] + code > cap  # nothing wider fits
    assert search(100_000, "cpu-vanilla", policy, codec="brotli", code_bytes=code) == []
    with pytest.raises(PlanError, match="nothing for the model"):
        search(1000, "cpu", policy, code_bytes=code)


def test_search_over_depths_and_loops_emits_plans_that_run_rebuilds():
    cands = search(3_000_000, "cpu-shared", parse_policy("int6"), codec="lzma", code_bytes=50_000, layers=[2, 3], loops=[3, 4],
                   overrides={"per_layer_controls": True})
    assert {(c["plan"], c["virtual_layers"]) for c in cands} == {("cycle:2x3", 6), ("cycle:2x4", 8), ("cycle:3x3", 9), ("cycle:3x4", 12)}
    for c in cands:
        cfg = rebuild(c["preset"], c["overrides"])
        assert cfg.per_layer_controls and plan_to_cli(cfg.plan) == c["plan"] and cfg.model_dim == c["model_dim"]
    at_width = [c for c in cands if c["model_dim"] == cands[0]["model_dim"]]
    assert cands[0] == max(at_width, key=lambda c: (c["virtual_layers"], c["loops"]))


def test_plan_to_cli_roundtrips_every_preset_plan():
    for name, preset in PRESETS.items():
        text = plan_to_cli(preset.model.plan)
        assert text is not None, name
    spec = PlanSpec("explicit", layers=2, attn_of=(0, 1, 0), mlp_of=(0, 0, 1))
    assert plan_to_cli(spec) == "explicit:0,1,0/0,0,1"
    lora = ModelConfig.from_dict({**get_preset("cpu-shared").model.to_dict(), "lora_ranks": {"q": 2}, "per_layer_controls": False})
    args = run_overrides(get_preset("cpu-shared-lora4").model, lora)
    assert rebuild("cpu-shared-lora4", args) == lora
    assert family_presets("cpu-shared") == ["cpu-shared"] and "pg-k1" in family_presets("pg")
    with pytest.raises(PlanError, match="unknown preset family"):
        family_presets("gpu")


def test_plan_command_json(capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_plan_parser(sub)
    args = parser.parse_args(["plan", "--cap", "2500000", "--preset", "cpu-shared", "--quant", "int6", "--codec", "brotli", "--code-bytes", "50000", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["preset"] == "cpu-shared" and out["config"]["fits"] is True
    assert len(out["candidates"]) == 1
    c = out["candidates"][0]
    assert {"preset", "overrides", "predicted_bytes", "model_dim", "virtual_layers", "loops", "codec", "quant"} <= set(c)
    assert c["predicted_bytes"] <= 2_500_000 and c["model_dim"] > 256 and c["quant"] == parse_policy("int6").describe()
    args = parser.parse_args(["plan", "--cap", "2500000", "--family", "cpu-shared,cpu-k3", "--dim", "256", "--code-bytes", "50000"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "loopgolf run --preset cpu-shared --dim" in text and "cpu-k3" in text


def test_trained_weights_shrink_only_the_coded_matrices():
    cfg = get_preset("cpu-shared").model
    policy = parse_policy("int6")
    init = predict_bytes(cfg, policy, "brotli", weights="init")
    trained = predict_bytes(cfg, policy, "brotli")  # the default: a trained model
    assert trained["model_bytes"] < init["model_bytes"]
    for a, b in zip(init["tensors"], trained["tensors"]):
        if a["scheme"] in FLOAT_SCHEMES:
            assert a["predicted_bytes"] == b["predicted_bytes"]
        else:
            assert b["predicted_bytes"] < a["predicted_bytes"]
    with pytest.raises(PlanError, match="unknown weights"):
        predict_bytes(cfg, policy, "brotli", weights="pretrained")

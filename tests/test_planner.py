import argparse
import json

import pytest
import torch

import loopgolf.budget
import loopgolf.device
from loopgolf.budget import (
    UNCALIBRATED,
    PlanError,
    calibration_table,
    default_family,
    family_presets,
    measure_matmul_rate,
    plan_to_cli,
    predict_bytes,
    run_overrides,
    search,
    train_step_seconds,
)
from loopgolf.commands.args import add_model_overrides, model_overrides
from loopgolf.config import PRESETS, get_preset
from loopgolf.device import Peak
from loopgolf.export.artifact import FLOAT_SCHEMES
from loopgolf.export.pack import export_model
from loopgolf.export.quantize import parse_policy
from loopgolf.model.gpt import GPT, ModelConfig, forward_flops_per_token, unique_params_formula
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
    cands = search(
        3_000_000, "cpu-shared", parse_policy("int6"), codec="lzma", code_bytes=50_000, layers=[2, 3], loops=[3, 4], overrides={"per_layer_controls": True}
    )
    assert {(c["plan"], c["virtual_layers"]) for c in cands} == {("cycle:2x3", 6), ("cycle:2x4", 8), ("cycle:3x3", 9), ("cycle:3x4", 12)}
    for c in cands:
        cfg = rebuild(c["preset"], c["overrides"])
        assert cfg.per_layer_controls and plan_to_cli(cfg.plan) == c["plan"] and cfg.model_dim == c["model_dim"]
    at_width = [c for c in cands if c["model_dim"] == cands[0]["model_dim"]]
    assert cands[0] == max(at_width, key=lambda c: (c["virtual_layers"], c["loops"]))


def run_config(command: str):
    """What the listed `loopgolf run ...` command builds (its whole configuration)."""
    import shlex

    from loopgolf.commands import run as run_command
    from loopgolf.run import build_config

    parser = argparse.ArgumentParser()
    run_command.register("run", parser.add_subparsers(dest="command").add_parser("run"))
    words = shlex.split(command)
    args = parser.parse_args(words[1:] if words[0] == "loopgolf" else words)
    return build_config(run_command.run_options(args))


def test_loop_counts_a_growing_preset_was_not_made_for_get_a_start_per_extra_pass(capsys):
    """cpu-mini-loop switches its one extra pass on at 35%; a plan with more loops needs a start
    per pass, and the listed command must train (measured: the frontier ledger's mini-loop runs
    failed at their first step with the preset's single start)."""
    parser = plan_parser()
    args = parser.parse_args(
        ["plan", "--cap", "800000", "--code-bytes", "0", "--family", "cpu-mini-loop", "--layers", "3,4", "--loops", "1,2,3", "--head-dim", "32"]
        + ["--matmul-flops", "1e10", "--top", "30"]
    )
    assert args.func(args) == 0
    commands = [line.split("  ")[-1] for line in capsys.readouterr().out.splitlines() if "loopgolf run" in line]
    loops_seen = set()
    for command in commands:
        config = run_config(command.strip())
        extra = config.model.depth_plan.num_loops - 1
        loops_seen.add(extra)
        assert config.train.recurrence_stages == [0.35] * extra, command
    assert loops_seen == {1, 2, 3}
    with pytest.raises(ValueError, match="recurrence_stages has 1 start fractions but the plan has 3 extra"):
        run_config("run --preset cpu-mini-loop --plan mini-loop:4:1-2x3")


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
    # "cpu" is the family of cpu-* presets (the machine's default), ["cpu"] the default preset alone.
    assert "cpu" not in family_presets("cpu") and "cpu-k1" in family_presets("cpu") and family_presets(["cpu"]) == ["cpu"]
    with pytest.raises(PlanError, match="unknown preset family"):
        family_presets("gpu")


def plan_parser() -> argparse.ArgumentParser:
    """The `loopgolf budget` parser, under its old name `plan`."""
    from loopgolf.commands import budget

    parser = argparse.ArgumentParser()
    budget.register("budget", parser.add_subparsers(dest="command").add_parser("plan"))
    return parser


def test_plan_command_json(capsys):
    parser = plan_parser()
    args = parser.parse_args(
        [
            "plan",
            "--cap",
            "2500000",
            "--preset",
            "cpu-shared",
            "--quant",
            "int6",
            "--codec",
            "brotli",
            "--code-bytes",
            "50000",
            "--matmul-flops",
            "2e10",
            "--json",
        ]
    )
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["preset"] == "cpu-shared" and out["config"]["fits"] is True and out["config"]["uncalibrated"] == []
    assert out["family"] == "cpu-shared" and out["matmul_flops"] == {"flops_per_second": 2e10, "measured": "given by --matmul-flops"}
    assert len(out["candidates"]) == 1
    c = out["candidates"][0]
    assert {"preset", "overrides", "predicted_bytes", "model_dim", "virtual_layers", "loops", "codec", "quant"} <= set(c)
    assert c["predicted_bytes"] <= 2_500_000 and c["model_dim"] > 256 and c["quant"] == parse_policy("int6").describe()
    cfg = rebuild(c["preset"], c["overrides"])
    train = get_preset("cpu-shared").train
    assert (c["seq_len"], c["tokens_per_step"]) == (train.seq_len, train.batch_tokens)
    assert c["forward_flops_per_token"] == forward_flops_per_token(cfg, train.seq_len)
    assert c["est_step_seconds"] == pytest.approx(3 * c["forward_flops_per_token"] * train.batch_tokens / 2e10)
    args = parser.parse_args(["plan", "--cap", "2500000", "--family", "cpu-shared,cpu-k3", "--dim", "256", "--code-bytes", "50000", "--matmul-flops", "2e10"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "loopgolf run --preset cpu-shared --dim" in text and "cpu-k3" in text
    assert "fwd FLOPs/tok" in text and "~step s" in text and "an estimate" in text and "20.0 GFLOP/s" in text
    assert "uncalibrated" not in text


def test_train_step_estimate():
    assert train_step_seconds(1e6, 4096, 1e10) == pytest.approx(3 * 1e6 * 4096 / 1e10)
    with pytest.raises(PlanError, match="positive"):
        train_step_seconds(1e6, 4096, 0)


@pytest.mark.parametrize("cuda, family", [(False, "cpu"), (True, "pg")])
def test_the_default_family_follows_the_machine(monkeypatch, capsys, cuda, family):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert default_family() == family
    searched = []
    monkeypatch.setattr(loopgolf.budget, "search", lambda cap, fam, *a, **kw: searched.append(fam) or [])
    monkeypatch.setattr(loopgolf.budget, "measure_matmul_rate", lambda: (1e9, "fake"))
    parser = plan_parser()
    args = parser.parse_args(["plan", "--cap", "1000000", "--code-bytes", "50000", "--json"])
    assert args.func(args) == 0
    assert searched == [family] and json.loads(capsys.readouterr().out)["family"] == family
    args = parser.parse_args(["plan", "--cap", "1000000", "--code-bytes", "50000", "--family", "pg-k1", "--json"])
    assert args.func(args) == 0 and searched[-1] == "pg-k1"  # --family still chooses


@pytest.mark.parametrize("cuda", [False, True])
def test_the_matmul_rate_is_measured_on_the_training_device(monkeypatch, cuda):
    calls = []

    def fake_peak(device, size=None, reps=4, trials=5):
        calls.append((device.type, size))
        return Peak(flops=3e10, dtype="float32", size=size or 8192)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(loopgolf.device, "matmul_peak", fake_peak)
    rate, what = measure_matmul_rate()
    assert rate == 3e10 and calls == [("cuda", None) if cuda else ("cpu", 1024)] and ("cuda" if cuda else "cpu") in what


def test_gptq_predictions_are_marked_uncalibrated(capsys):
    cfg = get_preset("cpu-shared").model
    assert predict_bytes(cfg, parse_policy("int6"), "brotli")["uncalibrated"] == []
    gptq = predict_bytes(cfg, parse_policy("int6,gptq"), "brotli")
    assert gptq["uncalibrated"] == ["gptq"] and "round-to-nearest" in UNCALIBRATED["gptq"]
    # Predicted with the round-to-nearest rates, so the bytes are those of the RTN policy.
    assert gptq["model_bytes"] == pytest.approx(predict_bytes(cfg, parse_policy("int6"), "brotli")["model_bytes"], abs=64)
    cands = search(2_500_000, "cpu-shared", parse_policy("int6,gptq"), codec="brotli", code_bytes=50_000)
    assert cands and all(c["uncalibrated"] == ["gptq"] for c in cands)
    parser = plan_parser()
    base = [
        "plan",
        "--cap",
        "2500000",
        "--family",
        "cpu-shared",
        "--quant",
        "int6,gptq",
        "--codec",
        "brotli",
        "--code-bytes",
        "50000",
        "--matmul-flops",
        "1e10",
    ]
    args = parser.parse_args([*base, "--preset", "cpu-shared", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["uncalibrated"] == ["gptq"] and out["candidates"][0]["uncalibrated"] == ["gptq"]
    args = parser.parse_args(base)
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "* uncalibrated: " + UNCALIBRATED["gptq"] in text


def test_the_calibration_table_is_package_data():
    table = calibration_table()
    assert {"codecs", "coded", "float16", "float32", "int32_index", "export_factor", "trained_factor"} <= set(table)
    assert "quant_calibrate.py" in table["about"]


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


def test_budget_counts_the_code_in_the_form_asked(capsys):
    """`--code-form` counts the generated script in that form (a minified, compressed script is a
    fraction of the plain one) and the listed commands carry the flag; `--code-bytes` with it is refused."""
    parser = plan_parser()
    common = ["plan", "--cap", "2500000", "--preset", "cpu-shared", "--matmul-flops", "2e10", "--json"]
    args = parser.parse_args([*common, "--code-form", "minify+lzma"])
    assert args.func(args) == 0
    packed = json.loads(capsys.readouterr().out)
    plain = loopgolf.budget.script_code_bytes("cpu-shared")
    assert packed["code_form"] == "minify+lzma" and packed["code_bytes"] == loopgolf.budget.script_code_bytes("cpu-shared", "minify+lzma")
    assert packed["code_bytes"] < plain / 4
    args = parser.parse_args([*common[:-1], "--code-form", "minify+lzma"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "code (minify+lzma)" in text and "--code-form minify+lzma" in text
    args = parser.parse_args([*common, "--code-form", "minify", "--code-bytes", "100"])
    with pytest.raises(ValueError, match="give one"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args([*common, "--code-form", "zip"])


def test_budget_time_lists_the_steps_each_candidate_gets(capsys, monkeypatch, tmp_path):
    """`--time S`: steps in S seconds per candidate, from the matmul estimate (given a rate) or from
    measured step times (the default; here a stand-in measurement), and commands that train for S."""
    parser = plan_parser()
    common = ["plan", "--cap", "1000000", "--family", "cpu-shared,cpu-mini-loop", "--code-bytes", "50000", "--top", "3"]
    args = parser.parse_args([*common, "--matmul-flops", "2e10", "--time", "600", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step_time"] == "estimate" and out["time_budget"] == 600
    for c in out["candidates"]:
        assert c["step_time"] == "estimate" and c["steps_in_budget"] == int(600 / c["est_step_seconds"])
        assert c["tokens_in_budget"] == c["steps_in_budget"] * c["tokens_per_step"]
    monkeypatch.setenv("LOOPGOLF_CACHE", str(tmp_path))
    import loopgolf.train.steptime as steptime

    monkeypatch.setattr(steptime, "measure", lambda m, t, d, **kw: [0.5] * (len(t.recurrence_stages) + 1))
    args = parser.parse_args([*common, "--time", "300"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "steps" in text and "measured here" in text and "--time 300" in text
    assert "     600  loopgolf run --preset" in text  # 300 s / 0.5 s per step
    args = parser.parse_args([*common, "--time", "300", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {c["step_time"] for c in out["candidates"]} == {"cached"} and {c["steps_in_budget"] for c in out["candidates"]} == {600}
    for bad in ("0", "nan", "-5"):
        with pytest.raises(SystemExit):
            parser.parse_args([*common, "--time", bad])


def test_budget_steps_and_flops_give_each_candidate_its_steps(capsys):
    """`--steps N`: every candidate trains N steps; `--flops F`: each gets the steps F training
    FLOPs buy at its own cost (as ledgers count them); the rows' commands train exactly that."""
    parser = plan_parser()
    common = ["plan", "--cap", "1000000", "--family", "cpu-vanilla", "--layers", "1,2,4", "--code-bytes", "50000", "--top", "10", "--matmul-flops", "2e10"]
    args = parser.parse_args([*common, "--steps", "250", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train_budget"] == {"kind": "steps", "amount": 250} and out["time_budget"] is None
    assert {c["steps_in_budget"] for c in out["candidates"]} == {250}
    args = parser.parse_args([*common, "--flops", "5e13", "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    steps = [c["steps_in_budget"] for c in out["candidates"]]
    for c in out["candidates"]:
        assert c["steps_in_budget"] == int(5e13 // (3 * c["forward_flops_per_token"] * c["tokens_per_step"]))
        assert c["tokens_in_budget"] == c["steps_in_budget"] * c["tokens_per_step"]
    costs = sorted((c["forward_flops_per_token"], c["steps_in_budget"]) for c in out["candidates"])
    assert len({f for f, _ in costs}) > 1 and [n for _, n in costs] == sorted((n for _, n in costs), reverse=True)  # costlier: fewer steps
    args = parser.parse_args([*common, "--flops", "5e13"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert f"--steps {steps[0]} --train time_budget=null" in text and "steps each candidate gets in 5e+13 training FLOPs" in text
    # A budget too small for one step of a candidate lists no command that `run` would refuse.
    args = parser.parse_args([*common, "--flops", "1e6"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "--steps 0" not in text and "the budget buys no step of this model: 1e+06 training FLOPs" in text
    for bad in (
        ["--steps", "0"],
        ["--steps", "2.5"],
        ["--flops", "nan"],
        ["--flops", "-1"],
        ["--steps", "5", "--time", "60"],
        ["--steps", "5", "--flops", "1e12"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args([*common, *bad])
    from loopgolf.budget import PlanError, budget_report
    from loopgolf.export.quantize import QuantPolicy

    kw = dict(preset=None, family="cpu-vanilla", policy=QuantPolicy(), codec="auto", weights="trained", code_bytes=0, overrides={}, matmul_flops=1e10)
    with pytest.raises(PlanError, match="one training budget"):
        budget_report(10**6, time_budget=60.0, steps_budget=5, **kw)
    with pytest.raises(PlanError, match="whole number"):
        budget_report(10**6, steps_budget=True, **kw)


def test_budget_does_not_time_steps_too_slow_to_measure(monkeypatch, capsys):
    """A Parameter Golf-scale candidate on this CPU keeps its matmul estimate (measuring three of
    its steps would take minutes), and the report says so."""
    import loopgolf.train.steptime as steptime

    monkeypatch.setattr(steptime, "measure", lambda *a, **kw: pytest.fail("a slow candidate was measured"))
    monkeypatch.setattr(loopgolf.budget, "measure_matmul_rate", lambda: (1e11, "fake"))
    parser = plan_parser()
    args = parser.parse_args(["plan", "--cap", "16000000", "--family", "pg-vanilla", "--top", "1", "--json"])
    assert args.func(args) == 0
    [c] = json.loads(capsys.readouterr().out)["candidates"]
    assert c["est_step_seconds"] > loopgolf.budget.MEASURE_LIMIT_SECONDS and c["step_time"] == "estimate"
    args = parser.parse_args(["plan", "--cap", "16000000", "--family", "pg-vanilla", "--top", "1"])
    assert args.func(args) == 0
    assert "were not measured" in capsys.readouterr().out

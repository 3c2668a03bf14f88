import json

import pytest

from loopgolf.cli import main
from loopgolf.export.pack import load_model

CONTRACT = [
    "val_bpb_pre",
    "val_bpb_post",
    "val_loss_post",
    "artifact_bytes",
    "model_bytes",
    "code_bytes",
    "cap_bytes",
    "unique_params",
    "effective_params",
    "train_tokens",
    "train_seconds",
    "tokens_per_second",
    "steps",
    "device",
    "preset",
    "seed",
    "plan",
    "baseline_xz_bpb",
]


def test_tiny_run_writes_complete_summary(text_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--preset", "debug", "--data", str(text_dataset), "--out", str(out), "--plan", "cycle:2x2", "--seed", "3", "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    for key in CONTRACT:
        assert key in summary, key
    assert printed["val_bpb_post"] == summary["val_bpb_post"]
    assert summary["steps"] == 8 and summary["seed"] == 3 and summary["preset"] == "debug"
    assert summary["plan"]["attn_of"] == [0, 1, 0, 1]
    assert summary["artifact_bytes"] == summary["model_bytes"] + summary["code_bytes"]
    assert summary["model_bytes"] == (out / "artifact.lgz").stat().st_size
    assert summary["unique_params"] < summary["effective_params"]
    assert 0 < summary["val_bpb_pre"] < 20 and abs(summary["val_bpb_post"] - summary["val_bpb_pre"]) < 0.05
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["plan"]["kind"] == "cycle" and config["model"]["vocab_size"] == 384
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "end" and {"train", "val", "eval_pre", "export", "eval_post"} <= set(events)

    # `loopgolf eval` scores the artifact alone and agrees with the run's roundtrip number.
    assert main(["eval", str(out / "artifact.lgz"), "--data", str(text_dataset), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["val_bpb"] == pytest.approx(summary["val_bpb_post"], rel=1e-9)
    model, _ = load_model(out / "artifact.lgz")
    assert model.plan.num_virtual == 4


def test_run_refuses_nonempty_dir_and_bad_data(text_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["run", "--preset", "debug", "--data", str(text_dataset), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").exists()
    assert main(["run", "--preset", "debug", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "--preset", "debug", "--data", str(text_dataset), "--out", str(tmp_path / "r3"), "--model", "vocab_size=100"]) == 2
    assert "must match" in capsys.readouterr().err


def test_params_and_presets_commands(capsys):
    assert main(["params", "--preset", "baseline", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["unique_params"] == 17_059_912
    assert main(["params", "--preset", "pg-vanilla", "--plan", "cycle:3x3", "--json"]) == 0
    cyc = json.loads(capsys.readouterr().out)
    assert cyc["effective_params"] == 17_059_912 and cyc["unique_params"] < 6_500_000
    assert main(["presets"]) == 0
    assert "cpu" in capsys.readouterr().out


def test_params_with_relaxation_flags(capsys):
    from loopgolf.config import get_preset
    from loopgolf.model.gpt import ModelConfig, unique_params_formula

    assert main(["params", "--preset", "cpu-shared", "--lora", "all=4", "--depth-emb", "--per-layer-controls", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = ModelConfig.from_dict(
        {
            **get_preset("cpu-shared").model.to_dict(),
            "lora_ranks": dict.fromkeys(("q", "k", "v", "o", "mlp_in", "mlp_out"), 4),
            "depth_embeddings": True,
            "per_layer_controls": True,
        }
    )
    assert info["unique_params"] == unique_params_formula(cfg)
    assert any(t["name"].startswith("lora.mlp_out.B.5") for t in info["tensors"])
    assert main(["params", "--plan", "mini-loop:6:2-3x2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["virtual_layers"] == 10
    with pytest.raises(SystemExit):
        main(["params", "--lora", "gate=4"])
    assert main(["presets", "--json"]) == 0
    presets = json.loads(capsys.readouterr().out)
    assert {"cpu-shared-lora4", "pg-mini-loop", "cpu-wide"} <= set(presets)


def test_default_preset_stops_on_steps_and_presets_json_shows_the_budget(capsys):
    """The default run is reproducible on a loaded machine: it stops at a fixed step count, not a
    wallclock budget; `--time` makes it a wallclock run; `presets --json` shows each train config."""
    from loopgolf.config import DEFAULT_PRESET
    from loopgolf.run import RunOptions, build_config, describe_budget

    assert main(["presets", "--json"]) == 0
    presets = json.loads(capsys.readouterr().out)
    default = presets[DEFAULT_PRESET]["train"]
    assert default["max_steps"] == 250 and default["time_budget"] is None
    assert presets["pg-vanilla"]["train"] == {**presets["pg-vanilla"]["train"], "max_steps": 20_000, "time_budget": 600.0}
    assert presets["cpu-vanilla"]["train"]["time_budget"] == 600.0 and presets["cpu-vanilla"]["model"]["model_dim"] == 256

    def budget(**kw):
        t = build_config(RunOptions(**kw)).train
        return t.max_steps, t.time_budget

    assert budget() == (250, None)
    assert budget(time_budget=600.0) == (None, 600.0)  # --time alone replaces a steps-only stop
    assert budget(time_budget=60.0, max_steps=40) == (40, 60.0)  # both: whichever comes first
    assert budget(max_steps=10) == (10, None)
    assert budget(preset="pg-vanilla", time_budget=300.0) == (20_000, 300.0)  # a wallclock preset keeps its step cap
    # A wallclock preset trained by steps alone: valid once --steps is in (it failed with "needs a stop").
    assert budget(preset="cpu-vanilla", max_steps=50, train_overrides={"time_budget": None}) == (50, None)
    with pytest.raises(ValueError, match="needs a stop"):
        budget(preset="cpu-vanilla", train_overrides={"time_budget": None})
    assert describe_budget(build_config(RunOptions()).train) == "250 steps"
    assert describe_budget(build_config(RunOptions(preset="pg-vanilla")).train) == "600 s or 20,000 steps (whichever comes first)"


def test_run_with_int6_policy_qat_and_plan_command(text_dataset, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(
        [
            "run",
            "--preset",
            "debug",
            "--data",
            str(text_dataset),
            "--out",
            str(out),
            "--plan",
            "cycle:1x3",
            "--quant",
            "int6,embed=8,fp16max=1024",
            "--qat",
            "ste",
            "--qat-start",
            "0.5",
            "--codec",
            "zlib",
            "--json",
        ]
    )
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["qat"] == {"mode": "ste", "start_frac": 0.5} and "6" in s["quant"] and s["codec"] == "zlib"
    assert s["export"]["codec"] == "zlib" and s["export"]["tensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["export"]["quant"] == "int6,embed=8,fp16max=1024"
    # the artifact holds no fake-quant parametrizations and scores the same standalone
    assert main(["eval", str(out / "artifact.lgz"), "--data", str(text_dataset), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_bpb"] == pytest.approx(s["val_bpb_post"], rel=1e-9)
    assert main(["plan", "--cap", "3000000", "--preset", "cpu-shared", "--json"]) == 0
    cands = json.loads(capsys.readouterr().out)["candidates"]
    assert cands and all(c["predicted_bytes"] <= 3_000_000 for c in cands)


def test_gptq_run_calibrates_from_the_train_shards(text_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--preset", "debug", "--data", str(text_dataset), "--out", str(out), "--quant", "int6,gptq,fp16max=0", "--json"]) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    _, loaded = load_model(out / "artifact.lgz")
    assert loaded.meta["quant"]["gptq"] is True and summary["model_bytes"] == (out / "artifact.lgz").stat().st_size
    assert abs(summary["val_bpb_post"] - summary["val_bpb_pre"]) < 0.1

"""Conversion to (relaxed) recursive transformers: exact imports, exact full-rank conversion,
the init strategies, the SVD factors, and malformed sources."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from hf_models import FAMILIES, VOCAB, build_hf, hf_logits

from loopgolf.cli import main
from loopgolf.convert.recursive import as_vanilla, block_sources, convert, stepwise_layers, truncated_svd_factors
from loopgolf.export.pack import export_model
from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.model.plan import PlanSpec, parse_plan
from loopgolf.sources.hf import ConversionError, import_hf
from loopgolf.sources.load import load_source
from loopgolf.train.checkpoint import save_weights

TOKENS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("hf")
    return {f: (root / f, build_hf(f, root / f)) for f in FAMILIES}


def logits_of(cfg: ModelConfig, state: dict) -> torch.Tensor:
    model = GPT(cfg)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model.eval()(TOKENS)


def full_ranks(cfg: ModelConfig) -> dict[str, int]:
    return {t: max(cfg.lora_shape(t)) for t in cfg.projections}


@pytest.mark.parametrize("family", FAMILIES)
def test_import_reproduces_the_transformers_forward(hf_dirs, family):
    path, hf = hf_dirs[family]
    cfg, state = import_hf(path)
    assert (logits_of(cfg, state) - hf_logits(hf, TOKENS)).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("plan,init", [("cycle:3x2", "stepwise"), ("cycle:2x3", "average"), ("sequence:3x2", "lower")])
def test_full_rank_relaxed_conversion_reproduces_the_source(hf_dirs, family, plan, init):
    path, hf = hf_dirs[family]
    source = as_vanilla(load_source(path))
    # alpha != rank: the factors must be divided by the runtime scale to reproduce the source.
    cfg, state, report = convert(source.config, source.state, parse_plan(plan), init, full_ranks(source.config), lora_alpha=3.0)
    assert cfg.depth_plan.num_attn == int(plan.split(":")[1].split("x")[0])
    assert (logits_of(cfg, state) - hf_logits(hf, TOKENS)).abs().max() <= 1e-4
    assert max(e for layer in report.layer_errors for e in layer.values()) < 1e-5
    # Strict recursion (no adapters) is not the source: the test would catch a no-op conversion.
    cfg0, state0, _ = convert(source.config, source.state, parse_plan(plan), init)
    assert (logits_of(cfg0, state0) - hf_logits(hf, TOKENS)).abs().max() > 1e-2


def randomized_vanilla(layers: int = 6, **kw) -> GPT:
    torch.manual_seed(1)
    model = GPT(tiny_config(vocab_size=VOCAB, plan=PlanSpec("vanilla", layers=layers), **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_loopgolf_run_dir_and_artifact_sources_convert_exactly(tmp_path):
    model = randomized_vanilla(depth_embeddings=True)
    run = tmp_path / "run"
    run.mkdir()
    save_weights(run / "checkpoint.pt", model.state_dict(), {"model": model.config.to_dict()})
    (run / "config.json").write_text(json.dumps({"model": model.config.to_dict()}))
    with torch.no_grad():
        ref = model(TOKENS)
    source = as_vanilla(load_source(run))
    assert source.origin == "run" and source.config.per_layer_controls
    cfg, state, _ = convert(source.config, source.state, parse_plan("cycle:3x2"), "average", full_ranks(source.config))
    assert (logits_of(cfg, state) - ref).abs().max() <= 1e-4
    export_model(model, tmp_path / "a.lgz", bits=8)
    art = as_vanilla(load_source(tmp_path / "a.lgz"))
    assert art.origin == "artifact"
    cfg, state, _ = convert(art.config, art.state, parse_plan("sequence:2x3"), "stepwise", full_ranks(art.config))
    with torch.no_grad():
        assert (logits_of(cfg, state) - art.model()(TOKENS)).abs().max() <= 1e-4


def test_a_source_with_the_records_options_converts_exactly_and_a_parallel_one_is_refused():
    """The record's gates (attention head gate per layer, skip gates, smear gate) are copied like
    the other controls, so full-rank conversion stays exact; a parallel residual names a stored
    layer, which a shared plan renumbers, so it is refused."""
    record = dict(mlp_act="leaky_relu2", ln_scale=True, rope_dims=4, xsa=True, attn_gate=True, gate_window=8, skip_gates=True, smear_gate=True)
    model = randomized_vanilla(per_layer_controls=True, **record)
    with torch.no_grad():
        ref = model(TOKENS)
    cfg, state, _ = convert(model.config, model.state_dict(), parse_plan("cycle:3x2"), "average", full_ranks(model.config))
    assert (logits_of(cfg, state) - ref).abs().max() <= 1e-4
    for extra in (dict(parallel_from=2), dict(parallel_from=2, parallel_lanes=True)):
        source = randomized_vanilla(**extra)
        with pytest.raises(ConversionError, match="from stored layer 2"):
            convert(source.config, source.state_dict(), parse_plan("cycle:3x2"), "stepwise")


def test_svd_factors_leave_the_eckart_young_tail():
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05], dtype=torch.float64)
    residual = (u[:, :8] * s) @ v.T  # (out=12, in=8) with known singular values
    for rank in (1, 3, 8):
        a, b, rel = truncated_svd_factors(residual.float(), rank, scale=0.25)
        assert a.shape == (8, rank) and b.shape == (rank, 12)
        approx = 0.25 * (a.double() @ b.double())  # what the adapter adds: s * A B = R_r^T
        err = float((residual.T - approx).norm())
        tail = float(s[rank:].square().sum().sqrt())
        assert err == pytest.approx(tail, abs=1e-5)
        assert rel == pytest.approx(tail / float(s.square().sum().sqrt()), abs=1e-6)


def test_each_init_picks_the_documented_layers():
    assert stepwise_layers(6, 3) == [0, 2, 5]  # the paper's layers 1, 3, 6 (1-based)
    assert stepwise_layers(6, 2) == [0, 5]
    cycle = [[0, 3], [1, 4], [2, 5]]
    assert block_sources("stepwise", cycle, 6) == [[0], [2], [5]]
    assert block_sources("average", cycle, 6) == cycle
    assert block_sources("lower", cycle, 6) == [[0], [1], [2]]
    assert block_sources("upper", cycle, 6) == [[3], [4], [5]]
    assert block_sources("random", cycle, 6) == [[], [], []]
    model = randomized_vanilla()
    src = {k: v.detach() for k, v in model.state_dict().items()}
    cfg, state, _ = convert(model.config, src, parse_plan("cycle:3x2"), "average", {"q": 2})
    assert torch.allclose(state["attn.1.c_q.weight"], (src["attn.1.c_q.weight"] + src["attn.4.c_q.weight"]) / 2)
    cfg, state, report = convert(model.config, src, parse_plan("cycle:3x2"), "stepwise", {"q": 2})
    assert torch.equal(state["attn.1.c_q.weight"], src["attn.2.c_q.weight"])
    assert torch.equal(state["mlps.2.proj.weight"], src["mlps.5.proj.weight"])
    # Virtual layer 0 runs block 0 = source layer 0: zero residual, so its adapter starts at zero.
    assert not state["lora.q.B.0"].any() and state["lora.q.A.0"].any() and state["lora.q.B.1"].any()
    assert report.layer_errors[0]["q"] == 0.0 and report.layer_errors[5]["q"] == 0.0
    # Shared controls are averaged or picked, never zero.
    cfg, state, _ = convert(model.config, src, parse_plan("cycle:3x2"), "average", per_layer_controls=False)
    assert not cfg.per_layer_controls and state["attn_scale"].shape[0] == 3
    assert torch.allclose(state["attn_scale"][0], src["attn_scale"][[0, 3]].mean(0))


@pytest.mark.parametrize(
    "plan,words",
    [("cycle:4x2", "8 virtual layers"), ("mini-loop:4:1-2x1", "cycle or sequence"), ("vanilla:6", "cycle or sequence"), ("cycle:2x3@mlp", "block sharing")],
)
def test_conversion_refuses_plans_it_cannot_make(plan, words):
    model = randomized_vanilla()
    spec = parse_plan(plan)
    with pytest.raises(ConversionError, match=words):
        convert(model.config, model.state_dict(), spec, "stepwise")


def _cli(args: list[str], capsys) -> tuple[int, str]:
    rc = main(args)
    return rc, capsys.readouterr().err


def test_malformed_sources_fail_clearly_and_write_nothing(hf_dirs, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    llama = hf_dirs["llama"][0]
    out = tmp_path / "out"

    def broken(name: str, edit) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((llama / "config.json").read_text())
        tensors = load_file(str(llama / "model.safetensors"))
        edit(d, tensors)
        return d

    def drop(d, t):
        del t["model.layers.3.mlp.up_proj.weight"]
        save_file(t, str(d / "model.safetensors"))

    def reshape(d, t):
        t["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 32)
        save_file(t, str(d / "model.safetensors"))

    def unsupported(d, t):
        (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "bert", "architectures": ["BertModel"]}))
        save_file(t, str(d / "model.safetensors"))

    def pickle_only(d, t):
        torch.save(t, d / "pytorch_model.bin")

    cases = {
        "missing": (drop, ["model.layers.3.mlp.up_proj.weight", "model.safetensors"]),
        "shape": (reshape, ["model.layers.1.self_attn.k_proj.weight", "(8, 32)", "model.safetensors"]),
        "arch": (unsupported, ["bert", "config.json"]),
        "pickle": (pickle_only, ["pytorch_model.bin", "never unpickles"]),
    }
    for name, (edit, words) in cases.items():
        d = broken(name, edit)
        with pytest.raises(ConversionError) as e:
            load_source(d)
        assert all(w in str(e.value) for w in words), (name, str(e.value))
        rc, err = _cli(["convert", "--from", str(d), "--plan", "cycle:3x2", "--out", str(out)], capsys)
        assert rc == 2 and err.count("\n") == 1 and words[0] in err
        assert not out.exists()


def test_convert_cli_writes_a_directory_that_trains_exports_and_scores(text_dataset, tmp_path, capsys):
    src, conv, up = tmp_path / "src", tmp_path / "conv", tmp_path / "up"
    assert main(["train", "--preset", "debug", "--data", str(text_dataset), "--out", str(src), "--plan", "vanilla:4", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["convert", "--from", str(src), "--plan", "cycle:2x2", "--init", "average", "--lora-ranks", "q=2,mlp_in=4", "--out", str(conv)]) == 0
    printed = capsys.readouterr().out
    assert "relative Frobenius error" in printed and "mlp_in" in printed
    report = json.loads((conv / "convert.json").read_text())
    assert len(report["layer_errors"]) == 4 and report["block_sources"] == [[0, 2], [1, 3]]
    cfg = json.loads((conv / "config.json").read_text())["model"]
    assert cfg["plan"]["kind"] == "cycle" and cfg["lora_ranks"] == {"q": 2, "mlp_in": 4}
    # A converted directory is a start, not a run to resume.
    rc, err = _cli(["run", "--resume", str(conv)], capsys)
    assert rc == 2
    rc = main(
        [
            "run",
            "--preset",
            "debug",
            "--data",
            str(text_dataset),
            "--out",
            str(up),
            "--init-from",
            str(conv),
            "--distill-from",
            str(src),
            "--exit-loss-weight",
            "0.1",
            "--json",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert math.isfinite(summary["val_bpb_post"]) and summary["plan"]["spec"]["kind"] == "cycle"
    assert summary["uptrain"]["teacher_params"] > 0 and summary["uptrain"]["teacher_seconds"] > 0
    records = [json.loads(line) for line in (up / "log.jsonl").read_text().splitlines()]
    parts = [r["parts"] for r in records if r.get("event") == "train"]
    assert parts and all(len(p["loop_ce"]) == 2 and "kd" in p for p in parts)
    assert main(["eval", str(up / "artifact.lgz"), "--data", str(text_dataset), "--json"]) == 0
    # --init-from fixes the model: overrides are refused before anything runs.
    rc, err = _cli(["train", "--preset", "debug", "--data", str(text_dataset), "--out", str(tmp_path / "x"), "--init-from", str(conv), "--dim", "64"], capsys)
    assert rc == 2 and "--init-from" in err and not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------
# Odd inputs (issue 27): one line and exit 2, never a traceback, nothing written


def _hf_copy(src: Path, dest: Path, config_change=None, raw: str | None = None) -> Path:
    import shutil

    shutil.copytree(src, dest)
    if raw is not None:
        (dest / "config.json").write_text(raw)
    elif config_change is not None:
        cfg = json.loads((src / "config.json").read_text())
        config_change(cfg)
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize(
    "family,change,words",
    [
        ("llama", lambda c: c.update(model_type="bert", architectures="BertModel"), ["model_type 'bert' (unknown) is not supported"]),
        ("llama", lambda c: c.update(model_type="bert", architectures=5), ["model_type 'bert' (unknown) is not supported"]),
        ("llama", lambda c: c.update(model_type="bert", architectures=[1, 2]), ["model_type 'bert' (unknown)"]),
        ("llama", lambda c: c.update(model_type=["llama"]), ["model_type ['llama']", "not supported"]),
        ("llama", lambda c: c.update(num_attention_heads=0), ["'num_attention_heads' must be a positive integer, got 0"]),
        ("gpt2", lambda c: c.update(n_head=0), ["'n_head' must be a positive integer, got 0"]),
        ("llama", lambda c: c.update(hidden_size="32"), ["'hidden_size' must be a positive integer, got '32'"]),
        ("llama", lambda c: c.update(num_hidden_layers=6.5), ["'num_hidden_layers' must be a positive integer, got 6.5"]),
        ("llama", lambda c: c.update(num_attention_heads=True), ["'num_attention_heads' must be a positive integer, got True"]),
        ("llama", lambda c: c.update(num_key_value_heads="2"), ["'num_key_value_heads' must be a positive integer"]),
        ("llama", lambda c: c.update(rms_norm_eps="x"), ["'rms_norm_eps' must be a positive finite number, got 'x'"]),
        ("llama", lambda c: c.update(max_position_embeddings="big"), ["'max_position_embeddings' must be a positive integer"]),
        ("llama", lambda c: c.update(hidden_act=["silu"]), ["'hidden_act' must be a string, got ['silu']"]),
        ("llama", lambda c: c.update(rope_parameters=[1]), ["'rope_parameters' must be an object, got [1]"]),
        ("llama", lambda c: c.update(rope_parameters={"rope_theta": "big"}), ["'rope_theta' must be a positive finite number, got 'big'"]),
        ("llama", lambda c: c.update(tie_word_embeddings="false"), ["'tie_word_embeddings' must be true or false"]),
        ("gpt2", lambda c: c.update(n_positions="64"), ["'n_positions' must be a positive integer, got '64'"]),
        ("gpt2", lambda c: c.update(layer_norm_epsilon=None, n_inner="64"), ["'n_inner' must be a positive integer"]),
        ("gpt2", lambda c: c.update(activation_function=["gelu_new"]), ["'activation_function' must be a string"]),
    ],
)
def test_odd_hf_config_values_fail_in_one_line(hf_dirs, tmp_path, capsys, family, change, words):
    d = _hf_copy(hf_dirs[family][0], tmp_path / "src", change)
    out = tmp_path / "out"
    rc, err = _cli(["convert", "--from", str(d), "--plan", "cycle:3x2", "--out", str(out)], capsys)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(d / "config.json") in err and all(w in err for w in words), err
    assert not out.exists()


def test_deeply_nested_hf_config_fails_in_one_line(hf_dirs, tmp_path, capsys):
    text = (hf_dirs["llama"][0] / "config.json").read_text().rstrip().rstrip("}") + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    d = _hf_copy(hf_dirs["llama"][0], tmp_path / "src", raw=text)
    with pytest.raises(ConversionError, match="RecursionError"):
        import_hf(d)
    rc, err = _cli(["convert", "--from", str(d), "--plan", "cycle:3x2", "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "config.json" in err and "not valid JSON" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lora", [[], ["--lora-rank", "4"], ["--lora-rank", "0"]])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_hf_weights_are_refused_naming_the_tensor(hf_dirs, tmp_path, capsys, lora, value):
    from safetensors.torch import load_file, save_file

    d = _hf_copy(hf_dirs["llama"][0], tmp_path / "src")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.2.mlp.up_proj.weight"][3, 1] = value
    save_file(tensors, str(d / "model.safetensors"))
    out = tmp_path / "out"
    rc, err = _cli(["convert", "--from", str(d), "--plan", "cycle:3x2", "--out", str(out), *lora], capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert "model.safetensors: tensor 'model.layers.2.mlp.up_proj.weight' has 1 non-finite value(s)" in err
    assert not out.exists()


def test_non_finite_run_dir_weights_are_refused_naming_the_tensor(tmp_path, capsys):
    model = randomized_vanilla()
    state = model.state_dict()
    state["attn.3.c_v.weight"][0, 0] = float("nan")
    run = tmp_path / "run"
    run.mkdir()
    save_weights(run / "checkpoint.pt", state, {"model": model.config.to_dict()})
    (run / "config.json").write_text(json.dumps({"model": model.config.to_dict()}))
    with pytest.raises(ConversionError, match=r"checkpoint\.pt: tensor 'attn\.3\.c_v\.weight' has 1 non-finite"):
        load_source(run)
    for lora in ([], ["--lora-rank", "4"]):
        rc, err = _cli(["convert", "--from", str(run), "--plan", "cycle:3x2", "--out", str(tmp_path / "out"), *lora], capsys)
        assert rc == 2 and err.count("\n") == 1 and "'attn.3.c_v.weight'" in err
        assert not (tmp_path / "out").exists()
    # The function itself refuses too, whatever the caller checked.
    with pytest.raises(ConversionError, match=r"source tensor 'attn\.3\.c_v\.weight' has non-finite values"):
        convert(model.config, state, parse_plan("cycle:3x2"), "stepwise", {"q": 2})


def test_lora_rank_is_checked_against_the_full_rank_and_zero_means_strict(hf_dirs, tmp_path, capsys):
    """The llama test model: 32 wide, 2 key/value heads of 8 (k, v: 16 x 32), MLP 56 wide."""
    src = hf_dirs["llama"][0]
    convert_args = ["convert", "--from", str(src), "--plan", "cycle:3x2"]
    for ranks, words in (
        (["--lora-rank", "999"], "LoRA rank 999 on 'q' is above its full rank 32"),
        (["--lora-rank", "17"], "LoRA rank 17 on 'k' is above its full rank 16 (a 32 x 16 projection)"),
        (["--lora-ranks", "mlp_in=33"], "LoRA rank 33 on 'mlp_in' is above its full rank 32"),
    ):
        out = tmp_path / "refused"
        rc, err = _cli([*convert_args, "--out", str(out), *ranks], capsys)
        assert rc == 2 and err.count("\n") == 1 and words in err, err
        assert not out.exists()
    gpt2 = ["convert", "--from", str(hf_dirs["gpt2"][0]), "--plan", "cycle:3x2", "--out", str(out), "--lora-ranks", "mlp_gate=2"]
    rc, err = _cli(gpt2, capsys)  # GPT-2 has no gated MLP
    assert rc == 2 and "LoRA target 'mlp_gate' is not a projection of this model" in err and not out.exists()
    # The full rank itself is accepted (and reproduces the source; see the tests above).
    assert main([*convert_args, "--out", str(tmp_path / "full"), "--lora-rank", "16"]) == 0
    assert json.loads((tmp_path / "full" / "config.json").read_text())["model"]["lora_ranks"]["k"] == 16
    assert "strict" not in capsys.readouterr().out
    # Rank 0 is strict recursion, and says so.
    for i, zero in enumerate((["--lora-rank", "0"], ["--lora-ranks", "q=0,k=0"], [])):
        out = tmp_path / f"strict{i}"
        assert main([*convert_args, "--out", str(out), *zero]) == 0
        assert "(strict: no LoRA)" in capsys.readouterr().out.splitlines()[0]
        assert json.loads((out / "config.json").read_text())["model"]["lora_ranks"] == {}
    rc, err = _cli([*convert_args, "--out", str(tmp_path / "alpha"), "--lora-rank", "0", "--lora-alpha", "4"], capsys)
    assert rc == 2 and "--lora-alpha" in err and "strict recursion" in err and not (tmp_path / "alpha").exists()

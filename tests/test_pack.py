"""Model <-> artifact: export under a policy, reload from the file alone, the byte cap and the
counted code bytes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, tiny_model

from loopgolf.codebytes import code_bytes_scoring, scoring_modules
from loopgolf.export.artifact import ArtifactError, dequantize_tensor, read_artifact
from loopgolf.export.gptq import calibration_tokens, collect_hessians
from loopgolf.export.pack import CapReport, export_model, load_model
from loopgolf.export.quantize import QuantPolicy, encode_state, parse_policy
from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.model.plan import PlanSpec

ENCODER_MODULES = ("loopgolf.export.quantize", "loopgolf.export.gptq", "loopgolf.budget", "loopgolf.train.qat")


def trained_like(plan: PlanSpec, seed: int = 0, **kw) -> GPT:
    """A model with non-trivial weights everywhere (zero-init projections would hide bugs)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=128, model_dim=64, num_heads=4, num_kv_heads=2, plan=plan, **kw)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def relaxed_looped(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = tiny_config(
        vocab_size=96,
        num_heads=2,
        num_kv_heads=1,
        plan=PlanSpec("cycle", layers=2, loops=3),
        per_layer_controls=True,
        depth_embeddings=True,
        lora_ranks={"q": 2, "mlp_in": 2},
    )
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


RICH = "int5,embed=6,lora=6,fp16max=32,clip=mse,gptq,outliers=4,lowrank=2"


@pytest.mark.parametrize("plan", [PlanSpec("vanilla", layers=2), PlanSpec("cycle", layers=2, loops=3)])
def test_reload_gives_dequantized_logits(tmp_path, plan):
    model = trained_like(plan)
    path = tmp_path / "a.lgz"
    info = export_model(model, path, codec="zlib")
    assert path.stat().st_size == info.total_bytes
    reloaded, loaded = load_model(path)
    assert loaded.model_config == model.config.to_dict()
    q, _ = encode_state(model.state_dict(), QuantPolicy())  # the default policy, in memory
    reference = GPT(model.config)
    reference.load_state_dict({n: dequantize_tensor(t) for n, t in q.items()}, strict=True)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), reference(x), rtol=0, atol=0)
        # and quantization actually changed something, but not much
        assert not torch.equal(reloaded(x), model(x))
        torch.testing.assert_close(reloaded(x), model(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("text", ["", "int6", RICH])
def test_reloaded_logits_equal_dequantized_logits_under_a_policy(tmp_path, text):
    model = relaxed_looped()
    policy = parse_policy(text)
    calib = calibration_tokens(model, "train", tokens=torch.randint(0, 96, (2000,)), num_seqs=4, seq_len=24) if policy.gptq else None
    info = export_model(model, tmp_path / "a.lgz", policy=policy, codec="zlib", calibration=calib)
    reloaded, loaded = load_model(tmp_path / "a.lgz")
    assert loaded.meta["quant"] == policy.to_dict()
    # The reference: the same encoder applied in memory, dequantized, loaded into a fresh model.
    hessians = collect_hessians(model, calib) if policy.gptq else None
    q, _ = encode_state(model.state_dict(), policy, hessians=hessians)
    reference = GPT(model.config)
    reference.load_state_dict({n: dequantize_tensor(t) for n, t in q.items()}, strict=True)
    x = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), reference(x), rtol=0, atol=0)
        torch.testing.assert_close(reloaded(x), model(x), rtol=0.1, atol=0.1)
    schemes = {r["name"]: r["scheme"] for r in info.tensors}
    if text == RICH:
        assert schemes["mlps.0.fc.weight"] == "int5_row" and schemes["tok_emb.weight"] == "int6_row"
        assert schemes["lora.mlp_in.B.4"] == "int6_row" and schemes["depth_emb"] == "float32"


def test_identical_weights_give_identical_bytes(tmp_path):
    a, b = trained_like(PlanSpec("cycle", layers=2, loops=2)), trained_like(PlanSpec("cycle", layers=2, loops=2))
    export_model(a, tmp_path / "a.lgz")
    export_model(b, tmp_path / "b.lgz")
    assert (tmp_path / "a.lgz").read_bytes() == (tmp_path / "b.lgz").read_bytes()


def test_cycle_artifact_stores_shared_blocks_once(tmp_path):
    # 2 blocks looped 3 times must cost about what 2 unique layers cost, not 6.
    small = export_model(trained_like(PlanSpec("cycle", layers=2, loops=3)), tmp_path / "c.lgz", codec="zlib")
    flat = export_model(trained_like(PlanSpec("vanilla", layers=6)), tmp_path / "v.lgz", codec="zlib")
    assert small.total_bytes < 0.55 * flat.total_bytes
    names = [t["name"] for t in read_artifact(tmp_path / "c.lgz").info.tensors]
    assert sum(n.startswith("attn.") and n.endswith("c_q.weight") for n in names) == 2


def test_shared_blocks_stored_once_and_lora_kept_separate(tmp_path):
    model = relaxed_looped()
    info = export_model(model, tmp_path / "a.lgz", policy=parse_policy("int6"), codec="zlib")
    names = [r["name"] for r in info.tensors]
    assert sorted(n for n in names if n.endswith("c_q.weight")) == ["attn.0.c_q.weight", "attn.1.c_q.weight"]  # 2 stored, 6 virtual
    assert sum(n.startswith("lora.") for n in names) == 2 * 2 * 6  # A and B per target and virtual layer
    loaded = read_artifact(tmp_path / "a.lgz").state_dict
    # The shared weight is the shared weight, not weight + some adapter.
    assert torch.allclose(loaded["attn.0.c_q.weight"], model.attn[0].c_q.weight, atol=0.02)


def test_bits_shorthand_and_conflicts(tmp_path):
    model = relaxed_looped()
    a = export_model(model, tmp_path / "a.lgz", bits=5, codec="zlib")
    b = export_model(model, tmp_path / "b.lgz", policy=QuantPolicy.uniform(5), codec="zlib")
    assert (tmp_path / "a.lgz").read_bytes() == (tmp_path / "b.lgz").read_bytes() and a.total_bytes == b.total_bytes
    with pytest.raises(ArtifactError, match="either bits"):
        export_model(model, tmp_path / "c.lgz", bits=5, policy=QuantPolicy())
    with pytest.raises(ArtifactError, match="calibration"):
        export_model(model, tmp_path / "c.lgz", policy=parse_policy("int6,gptq"))
    with pytest.raises(ArtifactError, match="unknown codec"):
        export_model(model, tmp_path / "c.lgz", codec="gzip")
    assert not (tmp_path / "c.lgz").exists()


def test_over_cap_reports_by_how_much_and_writes_nothing(tmp_path):
    model = trained_like(PlanSpec("vanilla", layers=2))
    size = export_model(model, tmp_path / "ok.lgz", codec="zlib").total_bytes
    report = CapReport(model_bytes=size, code_bytes=1000, cap_bytes=size + 999)
    assert not report.fits and report.headroom == -1
    assert "OVER the cap by 1 bytes" in report.describe()
    with pytest.raises(ArtifactError, match=r"over the \d+-byte cap by 1 bytes; nothing was written"):
        export_model(model, tmp_path / "over.lgz", codec="zlib", cap_bytes=size + 999, code_bytes=1000)
    assert not (tmp_path / "over.lgz").exists()
    assert CapReport(size, 1000, size + 1000).fits
    # Exactly at the cap is fine, and writes the same bytes.
    at_cap = export_model(model, tmp_path / "at.lgz", codec="zlib", cap_bytes=size + 1000, code_bytes=1000)
    assert at_cap.total_bytes == size and (tmp_path / "at.lgz").read_bytes() == (tmp_path / "ok.lgz").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["at.lgz", "ok.lgz"]  # no temp files left


def test_summary_accounting(tmp_path):
    model = relaxed_looped()
    info = export_model(model, tmp_path / "a.lgz", policy=parse_policy("int6,fp16max=64"))
    s = info.to_summary()
    json.dumps(s)  # goes into summary.json as it is
    assert s["codec"] == info.codec and s["model_bytes"] == info.total_bytes == (tmp_path / "a.lgz").stat().st_size
    rows = {r["name"]: r for r in s["tensors"]}
    assert set(rows) == set(model.state_dict())
    assert all(r["compressed_bytes"] > 0 and r["stored_bytes"] > 0 for r in rows.values())
    # The per-tensor shares add up to the compressed payload (minus the header's share).
    assert 0.9 * info.total_bytes < sum(r["compressed_bytes"] for r in rows.values()) < info.total_bytes
    coded = [r for r in rows.values() if r["scheme"].startswith("int")]
    n = sum(torch.Size(r["shape"]).numel() for r in coded)
    assert s["matrix_params"] == n
    assert s["bytes_per_matrix_param"] == pytest.approx(sum(r["compressed_bytes"] for r in coded) / n)
    assert 0.3 < s["bytes_per_matrix_param"] < 1.0
    assert read_artifact(tmp_path / "a.lgz").info.to_summary()["bytes_per_matrix_param"] is None  # shares need the writer


# Loaded by `loopgolf run` but not counted (see loopgolf.codebytes): the command line, the xz
# reference baseline (dataset preparation, which it lives beside) and the script generator that
# does the counting. Counted but not run by `loopgolf run`: the script's entry point.
NOT_COUNTED = ("loopgolf.cli", "loopgolf.commands", "loopgolf.commands.args", "loopgolf.commands.run", "loopgolf.data.corpus", "loopgolf.codebytes")
SCRIPT_ONLY = ("loopgolf.submit", "loopgolf.submit.entry")


def _loaded_loopgolf_files(script: str) -> dict[str, str]:
    """{module: source file} of the loopgolf modules a fresh interpreter has loaded after ``script``."""
    code = script + ("\nimport json, sys\nprint(json.dumps({n: m.__file__ for n, m in sys.modules.items() if n == 'loopgolf' or n.startswith('loopgolf.')}))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("extra", [[], ["--ttt", "rank=2,lr=0.001"]], ids=["plain", "ttt"])
def test_code_bytes_counts_the_files_a_real_run_executes(text_dataset, tmp_path, extra):
    """Independent of the bundler's own closure: run `loopgolf run` (GPTQ export, so the lazily
    imported encoders load too; with and without test-time training at evaluation) in a fresh
    interpreter and list the loopgolf files it loaded. The script it counts embeds exactly those
    files' bytes (plus the script's entry point), and its size is the code_bytes the run reported."""
    from loopgolf.codebytes import Bundle, script_modules
    from loopgolf.rundir import RunDir

    out = tmp_path / "run"
    loaded = _loaded_loopgolf_files(
        "from loopgolf.cli import main\n"
        f"assert main(['run', '--preset', 'debug', '--data', {str(text_dataset)!r}, '--out', {str(out)!r}, '--quant', 'int6,gptq', '--json', *{extra!r}]) == 0"
    )
    summary = json.loads((out / "summary.json").read_text())
    counted = {n: f for n, f in loaded.items() if n not in NOT_COUNTED}
    assert {
        "loopgolf.run",
        "loopgolf.train.trainer",
        "loopgolf.train.optim",
        "loopgolf.export.quantize",
        "loopgolf.export.gptq",
        "loopgolf.export.pack",
        "loopgolf.evaluate",
        "loopgolf.model.gpt",
    } <= set(counted)
    # What the script embeds is what the run executed, nothing more, plus its entry point.
    assert ("loopgolf.ttt" in counted) == bool(extra)
    config = RunDir(out).read_config()
    assert sorted(set(counted) | set(SCRIPT_ONLY)) == script_modules(config)
    bundle = Bundle.of(config)
    for name, path in counted.items():
        assert bundle.sources[name][1].encode("utf-8") == Path(path).read_bytes(), name
    assert summary["code_bytes"] == len(bundle.render().encode("utf-8"))
    assert summary["code_id"] == bundle.code_id
    # The scoring path is a strict part of it, and much smaller.
    assert set(scoring_modules()) < set(counted)
    assert summary["code_bytes_scoring"] == code_bytes_scoring() < 0.7 * summary["code_bytes"]


def test_eval_loads_no_training_code(tmp_path, text_dataset):
    """`loopgolf eval` rebuilds and scores without the trainer, the run orchestration or the encoders."""
    model = tiny_model(seed=0, vocab_size=384, num_heads=2, num_kv_heads=1, plan=PlanSpec("vanilla", layers=2))
    export_model(model, tmp_path / "a.lgz", codec="zlib")
    loaded = _loaded_loopgolf_files(
        f"from loopgolf.cli import main\nassert main(['eval', {str(tmp_path / 'a.lgz')!r}, '--data', {str(text_dataset)!r}, '--json']) == 0"
    )
    for heavy in ("loopgolf.train", "loopgolf.run", "loopgolf.data.corpus", *ENCODER_MODULES):
        assert not any(m == heavy or m.startswith(heavy + ".") for m in loaded), heavy
    # Beyond the scoring path: the command line (the eval command and the early-exit syntax its
    # help names), and the helper that opens any model source (run directories, checkpoints).
    parser = {"loopgolf.cli", "loopgolf.commands", "loopgolf.commands.args", "loopgolf.commands.eval", "loopgolf.serve", "loopgolf.serve.exits"}
    # (loopgolf.export.policies: the policy strings the config's presets name; strings only.)
    opening = {"loopgolf.sources", "loopgolf.sources.open", "loopgolf.rundir", "loopgolf.config", "loopgolf.export.policies", "loopgolf.data.stats"}
    assert set(loaded) - parser - opening <= set(scoring_modules())


def test_reading_and_scoring_never_load_the_encoders(tmp_path):
    export_model(relaxed_looped(), tmp_path / "a.lgz", policy=parse_policy("int6,outliers=2,lowrank=1"), codec="zlib")
    code = (
        "import sys\n"
        "from loopgolf.export.pack import load_model\n"
        "import loopgolf.evaluate\n"
        f"load_model({str(tmp_path / 'a.lgz')!r})\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith('loopgolf'))))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip().split(",")
    assert "loopgolf.export.artifact" in loaded
    for mod in ENCODER_MODULES:  # so they are not counted in code_bytes either
        assert mod not in loaded, mod

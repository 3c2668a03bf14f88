import pytest
import torch

from loopgolf.export.artifact import ArtifactError, read_artifact
from loopgolf.export.budget import CapReport, code_bytes, module_file, scoring_modules
from loopgolf.export.pack import export_model, load_model
from loopgolf.export.quant import dequantize_state_dict, quantize_state_dict
from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.model.plan import PlanSpec


def trained_like(plan: PlanSpec, seed: int = 0, **kw) -> GPT:
    """A model with non-trivial weights everywhere (zero-init projections would hide bugs)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=128, model_dim=64, num_heads=4, num_kv_heads=2, plan=plan, **kw)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("plan", [PlanSpec("vanilla", layers=2), PlanSpec("cycle", layers=2, loops=3)])
def test_reload_gives_dequantized_logits(tmp_path, plan):
    model = trained_like(plan)
    path = tmp_path / "a.lgz"
    info = export_model(model, path, codec="zlib")
    assert path.stat().st_size == info.total_bytes
    reloaded, loaded = load_model(path)
    assert loaded.model_config == model.config.to_dict()
    reference = GPT(model.config)
    reference.load_state_dict(dequantize_state_dict(quantize_state_dict(model.state_dict())), strict=True)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), reference(x), rtol=0, atol=0)
        # and quantization actually changed something, but not much
        assert not torch.equal(reloaded(x), model(x))
        torch.testing.assert_close(reloaded(x), model(x), rtol=0.05, atol=0.05)


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


def test_over_cap_reports_by_how_much_and_writes_nothing(tmp_path):
    model = trained_like(PlanSpec("vanilla", layers=2))
    size = export_model(model, tmp_path / "ok.lgz", codec="zlib").total_bytes
    report = CapReport(model_bytes=size, code_bytes=1000, cap_bytes=size + 999)
    assert not report.fits and report.headroom == -1
    assert "OVER the cap by 1 bytes" in report.describe()
    with pytest.raises(ArtifactError, match="over the .* cap by 1 bytes"):
        export_model(model, tmp_path / "over.lgz", codec="zlib", cap_bytes=size + 999, code_bytes=1000)
    assert not (tmp_path / "over.lgz").exists()
    assert CapReport(size, 1000, size + 1000).fits


def test_code_bytes_counts_exactly_the_scoring_path():
    mods = scoring_modules()
    assert {"loopgolf.export.pack", "loopgolf.evaluate", "loopgolf.model.gpt", "loopgolf.export.artifact"} <= set(mods)
    # Nothing from training, data building, the CLI or the run orchestration is needed to score.
    for heavy in ("loopgolf.train", "loopgolf.cli", "loopgolf.run", "loopgolf.config", "loopgolf.data.corpus"):
        assert not any(m == heavy or m.startswith(heavy + ".") for m in mods), heavy
    expected = sum(len(module_file(m).read_bytes()) for m in mods)
    assert code_bytes() == expected
    assert 10_000 < expected < 200_000

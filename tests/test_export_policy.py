import json
import subprocess
import sys

import pytest
import torch

from loopgolf.export.artifact import ArtifactError, read_artifact
from loopgolf.export.encode import encode_state
from loopgolf.export.gptq import calibration_tokens
from loopgolf.export.pack import export_model, load_model
from loopgolf.export.policy import QuantPolicy, parse_policy
from loopgolf.export.quant import dequantize_tensor
from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.model.plan import PlanSpec

ENCODER_MODULES = ("loopgolf.export.writer", "loopgolf.export.encode", "loopgolf.export.gptq", "loopgolf.export.planner", "loopgolf.export.policy", "loopgolf.export.clip", "loopgolf.train.qat")


def relaxed_looped(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=96, model_dim=32, num_heads=2, num_kv_heads=1, plan=PlanSpec("cycle", layers=2, loops=3),
                      per_layer_controls=True, depth_embeddings=True, lora_ranks={"q": 2, "mlp_in": 2})
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


RICH = "int5,embed=6,lora=6,fp16max=32,clip=mse,gptq,outliers=4,lowrank=2"


@pytest.mark.parametrize("text", ["", "int6", RICH])
def test_reloaded_logits_equal_dequantized_logits(tmp_path, text):
    model = relaxed_looped()
    policy = parse_policy(text)
    calib = calibration_tokens(model, "train", tokens=torch.randint(0, 96, (2000,)), num_seqs=4, seq_len=24) if policy.gptq else None
    info = export_model(model, tmp_path / "a.lgz", policy=policy, codec="zlib", calibration=calib)
    reloaded, loaded = load_model(tmp_path / "a.lgz")
    assert loaded.meta["quant"] == policy.to_dict()
    # The reference: the same encoder applied in memory, dequantized, loaded into a fresh model.
    hessians = None
    if policy.gptq:
        from loopgolf.export.gptq import collect_hessians

        hessians = collect_hessians(model, calib)
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
    assert not (tmp_path / "c.lgz").exists()


def test_cap_failure_says_by_how_much_and_writes_nothing(tmp_path):
    model = relaxed_looped()
    ok = export_model(model, tmp_path / "ok.lgz", policy=parse_policy("int6"), codec="zstd")
    with pytest.raises(ArtifactError, match=r"over the \d+-byte cap by 7 bytes; nothing was written"):
        export_model(model, tmp_path / "over.lgz", policy=parse_policy("int6"), codec="zstd", cap_bytes=ok.total_bytes + 93, code_bytes=100)
    assert not (tmp_path / "over.lgz").exists()


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

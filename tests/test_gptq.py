import numpy as np
import pytest
import torch

from loopgolf.export.clip import choose_scales
from loopgolf.export.gptq import CalibrationError, calibration_tokens, collect_hessians, gptq_quantize, output_error
from loopgolf.export.quant import QuantError, round_codes
from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.model.plan import PlanSpec


def problem(seed: int = 0, d_in: int = 96, d_out: int = 48, n: int = 2048):
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs with uneven variances, as real activations have: GPTQ's room to work.
    X = torch.randn(n, d_in, generator=g) @ (torch.randn(d_in, d_in, generator=g) / d_in**0.5)
    X = X * torch.logspace(-1, 0.5, d_in)
    W = torch.randn(d_out, d_in, generator=g) * 0.05
    return W, X.T @ X / n


@pytest.mark.parametrize("bits", [6, 5, 4])
def test_gptq_beats_round_to_nearest_on_output_error(bits):
    W, H = problem()
    scale = choose_scales(W, bits)
    rtn = round_codes(W, scale, 2 ** (bits - 1) - 1).float() * scale.float()[:, None]
    codes, s = gptq_quantize(W, H, bits, scale16=scale)
    assert torch.equal(s, scale) and codes.dtype == torch.int8
    assert int(codes.abs().max()) <= 2 ** (bits - 1) - 1
    gq = codes.float() * s.float()[:, None]
    assert output_error(W, gq, H) < 0.75 * output_error(W, rtn, H)
    # Without act-order and with tiny blocks it still helps; the lazy block update is exact.
    c2, _ = gptq_quantize(W, H, bits, scale16=scale, act_order=False, block_size=7)
    c3, _ = gptq_quantize(W, H, bits, scale16=scale, act_order=False, block_size=96)
    assert torch.equal(c2, c3)
    assert output_error(W, c2.float() * s.float()[:, None], H) < output_error(W, rtn, H)


def test_gptq_with_identity_hessian_is_round_to_nearest():
    W, _ = problem(1)
    scale = choose_scales(W, 6)
    codes, _ = gptq_quantize(W, torch.eye(W.shape[1]), 6, scale16=scale, damp=0.0)
    assert torch.equal(codes, round_codes(W, scale, 31))


def test_gptq_keep_mask_and_dead_inputs():
    W, H = problem(2)
    H[:, 5] = 0
    H[5, :] = 0  # input 5 never fires
    keep = torch.zeros_like(W, dtype=torch.bool)
    keep[0, 0] = keep[3, 10] = True
    codes, s = gptq_quantize(W, H, 5, keep=keep)
    assert int(codes[0, 0]) == 0 and int(codes[3, 10]) == 0
    assert bool((codes[:, 5] == 0).all())
    with pytest.raises(QuantError, match="GPTQ needs"):
        gptq_quantize(W, H[:10, :10], 5)
    with pytest.raises(QuantError, match="non-finite"):
        gptq_quantize(W, H * float("nan"), 5)


def tiny(plan: PlanSpec, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=64, model_dim=32, num_heads=2, num_kv_heads=1, plan=plan))


def test_hessians_accumulate_over_every_use_of_a_shared_layer():
    model = tiny(PlanSpec("cycle", layers=2, loops=3))
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    handle = model.attn[1].c_q.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, 32)))
    H = collect_hessians(model, tokens, batch_size=3)
    handle.remove()
    assert len(seen) == 3 * 2  # three loops x two batches
    X = torch.cat(seen)
    torch.testing.assert_close(H["attn.1.c_q.weight"], X.T @ X / X.shape[0])
    assert set(H) == {f"attn.{i}.{p}.weight" for i in range(2) for p in ("c_q", "c_k", "c_v", "proj")} | {f"mlps.{i}.{p}.weight" for i in range(2) for p in ("fc", "proj")}
    assert H["mlps.0.proj.weight"].shape == (64, 64)
    assert "tok_emb.weight" in collect_hessians(model, tokens, include_embedding=True)
    with pytest.raises(CalibrationError, match="integer tensor"):
        collect_hessians(model, tokens.float())
    with pytest.raises(CalibrationError, match="lie in"):
        collect_hessians(model, tokens + 64)


def test_calibration_tokens_from_training_data_and_from_the_model():
    model = tiny(PlanSpec("vanilla", layers=1))
    stream = np.arange(1000) % 60
    a = calibration_tokens(model, "train", tokens=stream, num_seqs=5, seq_len=12, seed=3)
    assert a.shape == (5, 12) and a.dtype == torch.long
    assert torch.equal(a, calibration_tokens(model, "train", tokens=stream, num_seqs=5, seq_len=12, seed=3))
    assert bool(((a[:, 1:] - a[:, :-1]) % 60 == 1).all())  # contiguous windows of the stream
    s = calibration_tokens(model, "self", num_seqs=3, seq_len=9, seed=0, batch_size=2)
    assert s.shape == (3, 9) and bool((s[:, 0] == 1).all()) and int(s.max()) < 64
    assert torch.equal(s, calibration_tokens(model, "self", num_seqs=3, seq_len=9, seed=0, batch_size=2))
    with pytest.raises(CalibrationError, match="needs tokens"):
        calibration_tokens(model, "train")
    with pytest.raises(CalibrationError, match="unknown calibration source"):
        calibration_tokens(model, "val", tokens=stream)

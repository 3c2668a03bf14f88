import pytest
import torch

from loopgolf.export.clip import MSE_RATIOS, choose_scales, row_sq_error
from loopgolf.export.encode import EncodeError, encode_state, encode_tensor, lowrank_correction
from loopgolf.export.gptq import output_error
from loopgolf.export.policy import QuantPolicy, parse_policy
from loopgolf.export.quant import QuantError, QuantizedTensor, dequantize_tensor, validate_quantized

NAME = "mlps.0.fc.weight"


def matrix(rows: int = 96, cols: int = 200, seed: int = 0, heavy: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if heavy:  # Laplace-like tails: the max sits far from the bulk
        w = w * torch.randn(rows, cols, generator=g).abs()
    return w * torch.logspace(-2, 0, rows)[:, None]  # rows of very different magnitudes


@pytest.mark.parametrize("bits", [8, 7, 6, 5, 4])
@pytest.mark.parametrize("clip", ["percentile", "mse"])
def test_error_bounds_per_bit_width(bits, clip):
    w = matrix()
    q = encode_tensor(NAME, w, QuantPolicy.uniform(bits, clip=clip, clip_percentile=100.0, float_max_numel=0))
    assert q.scheme == f"int{bits}_row" and q.data.dtype == torch.int8
    qmax = 2 ** (bits - 1) - 1
    assert int(q.data.abs().max()) <= qmax
    s = q.scale.float()[:, None]
    err = (w - dequantize_tensor(q)).abs()
    inside = w.abs() <= qmax * s  # values within the clip are rounded, so off by at most half a step
    assert bool((err <= s / 2 * (1 + 1e-5))[inside].all())
    assert bool((err <= w.abs() - qmax * s + s / 2 + 1e-6)[~inside].all())  # clipped: the clip's own error


@pytest.mark.parametrize("clip", ["percentile", "mse"])
def test_each_extra_bit_cuts_the_error(clip):
    w = matrix(48, 100, seed=4)
    errs = [float((w - dequantize_tensor(encode_tensor(NAME, w, QuantPolicy.uniform(b, clip=clip, float_max_numel=0)))).square().sum()) for b in (4, 5, 6, 7, 8)]
    # One more bit halves the step, so the squared error falls by about 4x.
    assert all(2.5 < a / b < 6.0 for a, b in zip(errs, errs[1:])), errs


@pytest.mark.parametrize("bits", [6, 4])
def test_mse_clip_never_loses_to_the_max_clip(bits):
    w = matrix(seed=1, heavy=True)
    qmax = 2 ** (bits - 1) - 1
    err_max = row_sq_error(w, choose_scales(w, bits, "percentile", 100.0), qmax)
    err_mse = row_sq_error(w, choose_scales(w, bits, "mse"), qmax)
    assert bool((err_mse <= err_max * (1 + 1e-6)).all())
    assert float(err_mse.sum()) < 0.99 * float(err_max.sum())  # heavy tails: clipping pays
    assert MSE_RATIOS[0] == 0.5 and MSE_RATIOS[-1] == 1.0
    with pytest.raises(QuantError, match="clip method"):
        choose_scales(w, bits, "max")


def test_outliers_are_exact_and_do_not_set_the_row_scale():
    w = matrix(seed=2)
    w[3, 5] = 50.0
    w[7, 0] = -40.0
    plain = encode_tensor(NAME, w, QuantPolicy.uniform(6, float_max_numel=0))
    q = encode_tensor(NAME, w, QuantPolicy.uniform(6, float_max_numel=0, outlier_topk=4))
    assert q.outlier_idx.dtype == torch.int32 and q.outlier_val.dtype == torch.float16 and len(q.outlier_idx) == 4
    assert {3 * 200 + 5, 7 * 200} <= set(q.outlier_idx.tolist())
    deq = dequantize_tensor(q)
    flat = q.outlier_idx.long()
    assert torch.equal(deq.view(-1)[flat], w.view(-1)[flat].half().float())
    assert bool((q.data.view(-1)[flat] == 0).all())  # zero codes under the outliers compress well
    assert float(q.scale[3]) < 0.2 * float(plain.scale[3])
    rows = [3, 7]  # the outliers' rows get back a fine grid
    assert float((w - deq)[rows].square().sum()) < 0.01 * float((w - dequantize_tensor(plain))[rows].square().sum())
    assert q.stored_bytes == plain.stored_bytes + 4 * (4 + 2)


def test_lowrank_correction_reduces_error_hessian_weighting_targets_outputs():
    g = torch.Generator().manual_seed(3)
    w = matrix(64, 128, seed=3)
    X = torch.randn(2048, 128, generator=g) @ torch.randn(128, 128, generator=g) * 0.2
    H = X.T @ X / X.shape[0]
    base = encode_tensor(NAME, w, QuantPolicy.uniform(4, float_max_numel=0))
    plain = encode_tensor(NAME, w, QuantPolicy.uniform(4, float_max_numel=0, lowrank_rank=8))
    weighted = encode_tensor(NAME, w, QuantPolicy.uniform(4, float_max_numel=0, lowrank_rank=8), hessian=H)
    e = {k: dequantize_tensor(q) for k, q in {"base": base, "plain": plain, "weighted": weighted}.items()}
    assert plain.lowrank_u.shape == (64, 8) and plain.lowrank_v.shape == (8, 128)
    assert float((w - e["plain"]).square().sum()) < float((w - e["base"]).square().sum())
    assert output_error(w, e["weighted"], H) < output_error(w, e["plain"], H) < output_error(w, e["base"], H)
    # Only the shared blocks get a correction (a LoRA factor stays plain).
    assert encode_tensor("lora.q.A.0", w, QuantPolicy.uniform(4, float_max_numel=0, lowrank_rank=8)).lowrank_u is None
    u, v = lowrank_correction(torch.zeros(5, 7), 10)
    assert u.shape == (5, 5) and v.shape == (5, 7) and not bool(u.isnan().any())


def test_gptq_without_hessian_is_a_clear_error():
    with pytest.raises(EncodeError, match="calibration"):
        encode_tensor("attn.0.c_q.weight", matrix(), QuantPolicy.uniform(6, gptq=True, float_max_numel=0))
    # GPTQ only concerns attention and MLP matrices.
    q = encode_tensor("tok_emb.weight", matrix(), QuantPolicy.uniform(6, gptq=True, float_max_numel=0))
    assert q.scheme == "int6_row"


def test_encode_state_stores_a_tied_tensor_once():
    emb = torch.randn(300, 64)
    state = {"tok_emb.weight": emb, "attn.0.c_q.weight": torch.randn(64, 64), "lm_head.weight": emb, "q_gain": torch.ones(4)}
    q, aliases = encode_state(state, parse_policy("int6,fp16max=100"))
    assert aliases == {"lm_head.weight": "tok_emb.weight"} and "lm_head.weight" not in q
    assert q["q_gain"].scheme == "float32" and q["attn.0.c_q.weight"].scheme == "int6_row"


def test_validation_of_outlier_and_lowrank_parts():
    q = encode_tensor(NAME, matrix(), QuantPolicy.uniform(6, float_max_numel=0, outlier_topk=3, lowrank_rank=2))
    validate_quantized(q)

    def broken(**kw) -> QuantizedTensor:
        fields = dict(q.__dict__)
        fields.update(kw)
        return QuantizedTensor(**fields)

    cases = [
        (dict(outlier_idx=q.outlier_idx.flip(0)), "strictly increasing"),
        (dict(outlier_idx=q.outlier_idx + 10**6), "strictly increasing"),
        (dict(outlier_idx=q.outlier_idx.long()), "int32"),
        (dict(outlier_val=None), "pairs"),
        (dict(outlier_val=q.outlier_val[:2]), "outlier_val"),
        (dict(lowrank_v=q.lowrank_v[:, :5]), "lowrank_v"),
        (dict(lowrank_u=q.lowrank_u.float()), "lowrank_u"),
        (dict(lowrank_u=torch.full_like(q.lowrank_u, float("inf"))), "non-finite"),
    ]
    for kw, message in cases:
        with pytest.raises(QuantError, match=message):
            validate_quantized(broken(**kw))
    f = encode_tensor(NAME, matrix(4, 4), QuantPolicy())
    with pytest.raises(QuantError, match="float scheme"):
        validate_quantized(QuantizedTensor(f.scheme, f.shape, f.data, None, None, outlier_idx=q.outlier_idx, outlier_val=q.outlier_val))

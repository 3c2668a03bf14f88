"""The quantization policy and the encoder: roles, the default (the Parameter Golf baseline),
policy strings, clip searches, outliers, low-rank corrections, and the error bounds of the codes."""

import pytest
import torch
from helpers import output_error, tiny_config

from loopgolf.config import get_preset
from loopgolf.export.artifact import QuantizedTensor, dequantize_tensor
from loopgolf.export.quantize import (
    FLOAT16_BITS,
    MSE_RATIOS,
    PolicyError,
    QuantError,
    QuantPolicy,
    choose_scales,
    encode_state,
    encode_tensor,
    lowrank_correction,
    parse_policy,
    row_quantile,
    row_sq_error,
    stored_scheme,
    tensor_role,
)
from loopgolf.model.gpt import GPT
from loopgolf.model.plan import PlanSpec
from loopgolf.model.roles import UnknownParameterError

NAME = "mlps.0.fc.weight"


def matrix(rows: int = 96, cols: int = 200, seed: int = 0, heavy: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if heavy:  # Laplace-like tails: the max sits far from the bulk
        w = w * torch.randn(rows, cols, generator=g).abs()
    return w * torch.logspace(-2, 0, rows)[:, None]  # rows of very different magnitudes


def big(rows: int = 300, cols: int = 400, seed: int = 0) -> torch.Tensor:
    """Above the default float threshold (65,536 elements), so the default policy codes it."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.logspace(-3, 0, rows)[:, None]


# ------------------------------------------------------------------ the default policy


def test_default_policy_is_the_parameter_golf_baseline_export():
    # The export of the official train_gpt.py (openai/parameter-golf; docs/background.md): at most
    # 65,536 elements stay float (fp32 control tensors, fp16 otherwise); larger 2-D tensors per-row
    # int8, clip at the 99.99984th percentile of |w| per row, scale = clip / 127 stored fp16.
    p = QuantPolicy()
    assert p == parse_policy("") == parse_policy(None)
    assert all(p.bits_for(r) == 8 for r in ("embed", "attn", "mlp", "lora")) and p.bits_for("control") is None
    assert (p.clip, p.clip_percentile, p.float_max_numel, p.control_fp32) == ("percentile", 99.99984, 65536, True)
    assert not p.gptq and p.outlier_topk == 0 and p.lowrank_rank == 0
    with torch.device("meta"):
        baseline = GPT(get_preset("baseline").model)
    schemes = {}
    for name, t in baseline.state_dict().items():
        small = t.numel() <= 65536
        want = ("float32" if tensor_role(name) == "control" else "float16") if small else "int8_row"
        schemes[name] = stored_scheme(name, tuple(t.shape), p)
        assert schemes[name] == want, name
    assert {"float32", "int8_row"} <= set(schemes.values())
    # The codes and scales are exactly the baseline's.
    w = big()
    q = encode_tensor(NAME, w, p)
    clip = torch.quantile(w.abs(), 0.9999984, dim=1)
    scale = (clip / 127).half()
    codes = torch.round(torch.maximum(torch.minimum(w, clip[:, None]), -clip[:, None]) / scale.float()[:, None]).clamp(-127, 127)
    assert q.scheme == "int8_row" and torch.equal(q.scale, scale) and torch.equal(q.data, codes.to(torch.int8))
    assert q.outlier_idx is None and q.lowrank_u is None
    assert torch.equal(dequantize_tensor(q), q.data.float() * q.scale.float()[:, None])
    # The threshold is inclusive: exactly 65,536 elements stays float.
    assert stored_scheme(NAME, (256, 256), p) == "float16" and stored_scheme(NAME, (256, 257), p) == "int8_row"


# ------------------------------------------------------------------ roles and policy strings


def test_roles_of_every_model_tensor_come_from_parameter_role():
    cfg = tiny_config(
        num_heads=2,
        num_kv_heads=1,
        plan=PlanSpec("cycle", layers=2, loops=2),
        per_layer_controls=True,
        depth_embeddings=True,
        lora_ranks={"q": 2, "mlp_out": 1},
        tie_embeddings=False,
    )
    roles = {n: tensor_role(n) for n in GPT(cfg).state_dict()}
    assert roles["tok_emb.weight"] == roles["lm_head.weight"] == "embed"  # the output layer codes like the embedding
    assert roles["attn.1.c_k.weight"] == "attn" and roles["mlps.0.proj.weight"] == "mlp"
    assert roles["lora.q.A.3"] == roles["lora.mlp_out.B.0"] == "lora"
    for name in ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight", "depth_emb"):
        assert roles[name] == "control", name
    assert set(roles.values()) == {"embed", "attn", "mlp", "lora", "control"}
    with pytest.raises(UnknownParameterError):
        tensor_role("something.else")


def test_parse_policy_syntax():
    p = parse_policy("int6")
    assert (p.attn_bits, p.mlp_bits, p.lora_bits, p.embed_bits) == (6, 6, 6, 8)
    p = parse_policy("attn=6, mlp=5, embed=7, gptq")
    assert (p.attn_bits, p.mlp_bits, p.embed_bits, p.gptq) == (6, 5, 7, True)
    p = parse_policy("all=5,embed=fp16,clip=mse,outliers=64,lowrank=4,fp16max=1024,control=fp16,percentile=99.9,damp=0.05,block=64")
    assert p.embed_bits == FLOAT16_BITS and p.attn_bits == 5 and p.clip == "mse" and p.outlier_topk == 64
    assert p.lowrank_rank == 4 and p.float_max_numel == 1024 and not p.control_fp32
    assert p.clip_percentile == 99.9 and p.gptq_damp == 0.05 and p.gptq_block == 64
    assert parse_policy("int4,mlp=int8").mlp_bits == 8  # left to right
    assert parse_policy("gptq=0").gptq is False


@pytest.mark.parametrize("text", ["int6", "attn=6,mlp=5,embed=8,gptq", "all=4,embed=fp16,clip=mse,outliers=3,lowrank=2,control=fp16,fp16max=0"])
def test_describe_and_dict_roundtrip(text):
    p = parse_policy(text)
    assert parse_policy(p.describe()) == p
    assert QuantPolicy.from_dict(p.to_dict()) == p


@pytest.mark.parametrize(
    "text, message",
    [
        ("int9", "attn_bits"),
        ("int1", "attn_bits"),
        ("attn=x", "bit width"),
        ("clip=max", "clip must be"),
        ("bogus=1", "unknown policy item"),
        ("other=6", "unknown policy item"),
        ("int6,,gptq", "empty item"),
        ("outliers=-1", "non-negative"),
        ("control=fp8", "bad value"),
        ("control=6", "bad value"),
        ("percentile=0", "clip_percentile"),
    ],
)
def test_bad_policies_say_what_is_wrong(text, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(text)
    assert issubclass(PolicyError, QuantError) and issubclass(QuantError, ValueError)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(PolicyError, match="unknown policy field"):
        QuantPolicy.from_dict({"bits": 6})


def test_stored_scheme_follows_role_size_and_threshold():
    p = parse_policy("int6,embed=7,lora=fp16,fp16max=100")
    assert stored_scheme("attn.0.c_q.weight", (32, 32), p) == "int6_row"
    assert stored_scheme("tok_emb.weight", (64, 32), p) == "int7_row"
    assert stored_scheme("lm_head.weight", (64, 32), p) == "int7_row"
    assert stored_scheme("lora.q.A.0", (32, 8), p) == "float16"  # fp16 role
    assert stored_scheme("mlps.0.fc.weight", (10, 10), p) == "float16"  # at the threshold
    assert stored_scheme("attn_scale", (2, 1000), p) == "float32"  # control: never coded
    assert stored_scheme("depth_emb", (6, 1000), p) == "float32"
    assert stored_scheme("attn_scale", (2, 4), parse_policy("control=fp16")) == "float16"
    assert stored_scheme("mlps.0.fc.weight", (4, 8, 8), p) == "float16"  # not 2-D
    assert stored_scheme("mlps.0.fc.weight", (64, 32), QuantPolicy.uniform(5, float_max_numel=0)) == "int5_row"


def test_uniform_policy_and_bits_for():
    p = QuantPolicy.uniform(5)
    assert all(p.bits_for(r) == 5 for r in ("embed", "attn", "mlp", "lora"))
    assert p.bits_for("control") is None
    with pytest.raises(PolicyError):
        p.bits_for("head")
    assert p.uses_gptq("attn") is False and QuantPolicy(gptq=True).uses_gptq("embed") is False
    assert QuantPolicy(lowrank_rank=2).uses_lowrank("mlp") and not QuantPolicy(lowrank_rank=2).uses_lowrank("lora")


# ------------------------------------------------------------------ codes and their errors


@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("percentile", [100.0, 99.99984, 99.0])
def test_error_bounded_by_half_scale_for_unclipped_values(bits, percentile):
    w = big()
    q = encode_tensor(NAME, w, QuantPolicy.uniform(bits, clip_percentile=percentile))
    assert q.scheme == f"int{bits}_row" and q.bits == bits
    assert q.data.dtype == torch.int8 and q.scale.dtype == torch.float16
    qmax = 2 ** (bits - 1) - 1
    assert int(q.data.abs().max()) <= qmax
    deq = dequantize_tensor(q)
    s = q.scale.float()[:, None]
    clip = row_quantile(w.abs(), percentile / 100.0)[:, None]
    unclipped = w.abs() <= clip
    err = (w - deq).abs()
    bound = s / 2 * (1 + 1e-5)  # float32 rounding of w / s
    assert bool((err <= bound)[unclipped].all())
    # Clipped values land at most half a step beyond the clip.
    assert bool((deq.abs() <= clip + bound).all())
    if percentile == 100.0:
        assert bool(unclipped.all())


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
    errs = [
        float((w - dequantize_tensor(encode_tensor(NAME, w, QuantPolicy.uniform(b, clip=clip, float_max_numel=0)))).square().sum()) for b in (4, 5, 6, 7, 8)
    ]
    # One more bit halves the step, so the squared error falls by about 4x.
    assert all(2.5 < a / b < 6.0 for a, b in zip(errs, errs[1:])), errs


def test_percentile_clip_keeps_one_huge_weight_from_setting_the_row_scale():
    w = big()
    w[5, 7] = 1000.0
    q = encode_tensor(NAME, w, QuantPolicy(clip_percentile=99.0))
    assert float(q.scale[5]) * 127 < 100.0  # the outlier did not set the scale
    assert float(dequantize_tensor(q)[5, 7]) < 100.0


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


def test_zero_rows_dequantize_to_zero():
    w = big()
    w[3] = 0
    q = encode_tensor(NAME, w, QuantPolicy())
    assert float(q.scale[3]) == 1.0
    assert bool((dequantize_tensor(q)[3] == 0).all())
    assert torch.equal(dequantize_tensor(encode_tensor(NAME, torch.zeros(300, 300), QuantPolicy())), torch.zeros(300, 300))


def test_float_schemes_roundtrip_values():
    t = torch.randn(7, 9)
    assert torch.equal(dequantize_tensor(encode_tensor("q_gain", t, QuantPolicy())), t)
    assert torch.equal(dequantize_tensor(encode_tensor(NAME, t, QuantPolicy())), t.half().float())
    assert encode_tensor(NAME, torch.randn(300, 300).bfloat16(), QuantPolicy()).scheme == "int8_row"
    q = encode_tensor("q_gain", torch.tensor(2.5), QuantPolicy())
    assert q.shape == () and float(dequantize_tensor(q)) == 2.5


def test_row_quantile_matches_torch_quantile():
    x = torch.randn(50, 333)
    for q in (0.0, 0.1, 0.5, 0.9999984, 1.0):
        assert torch.allclose(row_quantile(x, q), torch.quantile(x, q, dim=1), atol=1e-6)


def test_row_quantile_beyond_torch_quantile_size_limit():
    x = torch.rand(2**16 + 1, 256)  # > 2**24 elements: torch.quantile refuses such inputs (flattened)
    got = row_quantile(x, 0.9)
    assert got.shape == (2**16 + 1,)
    assert torch.allclose(got[:500], torch.quantile(x[:500], 0.9, dim=1), atol=1e-6)


@pytest.mark.parametrize(
    "tensor",
    [torch.arange(10), torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 1e6]), "not a tensor"],  # 1e6: beyond fp16
)
def test_bad_tensors_raise_quant_error(tensor):
    with pytest.raises(QuantError):
        encode_tensor(NAME, tensor, QuantPolicy())


def test_a_row_scale_beyond_fp16_is_refused():
    with pytest.raises(QuantError, match="fp16 range"):
        encode_tensor(NAME, torch.full((300, 300), 1e7), QuantPolicy())


# ------------------------------------------------------------------ outliers and low rank


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
    with pytest.raises(QuantError, match="attn.0.c_q.weight: .*calibration"):
        encode_tensor("attn.0.c_q.weight", matrix(), QuantPolicy.uniform(6, gptq=True, float_max_numel=0))
    # GPTQ only concerns attention and MLP matrices.
    q = encode_tensor("tok_emb.weight", matrix(), QuantPolicy.uniform(6, gptq=True, float_max_numel=0))
    assert q.scheme == "int6_row"


def test_encode_state_keeps_order_and_stores_a_tied_tensor_once():
    emb = torch.randn(300, 64)
    state = {"tok_emb.weight": emb, "attn.0.c_q.weight": torch.randn(64, 64), "lm_head.weight": emb, "q_gain": torch.ones(4)}
    q, aliases = encode_state(state, parse_policy("int6,fp16max=100"))
    assert aliases == {"lm_head.weight": "tok_emb.weight"} and list(q) == ["tok_emb.weight", "attn.0.c_q.weight", "q_gain"]
    assert q["q_gain"].scheme == "float32" and q["attn.0.c_q.weight"].scheme == "int6_row"
    assert isinstance(q["tok_emb.weight"], QuantizedTensor) and q["tok_emb.weight"].scheme == "int8_row"

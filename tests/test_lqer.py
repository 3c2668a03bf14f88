"""The Parameter Golf record's export as policy options: sigma clips per role, LQER (low-rank
quantization error reconstruction with quantized factors, top-K tensors), the artifact format
version 3 that stores it, its bounds checks, and that everything else is written exactly as before."""

import hashlib
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import output_error, tiny_model

from loopgolf.export.artifact import (
    FORMAT_VERSION,
    LQER_FORMAT_VERSION,
    ArtifactError,
    QuantizedTensor,
    dequantize_factor,
    dequantize_tensor,
    factor_code_range,
    read_artifact,
    seal,
    unseal,
    validate_quantized,
)
from loopgolf.export.gptq import gptq_quantize
from loopgolf.export.pack import export_model, load_model, pack_quantized, write_blob
from loopgolf.export.quantize import (
    RECORD_POLICY,
    LowRank,
    LowRankCandidate,
    PolicyError,
    QuantError,
    QuantPolicy,
    encode_state,
    encode_tensor,
    fp16_scale,
    lowrank_candidate,
    lqer_correction,
    parse_policy,
    quantize_factor,
    select_lowrank,
    squared_error,
)

ASSETS = Path(__file__).parent / "assets"


def gaussian(rows: int, cols: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale


def heavy(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Laplace-like rows: the max |w| is many standard deviations out."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.randn(rows, cols, generator=g).square()


# ------------------------------------------------------------------ sigma clips

ROLE_NAMES = {"embed": "tok_emb.weight", "attn": "attn.0.c_q.weight", "mlp": "mlps.0.fc.weight", "lora": "lora.q.A.0"}


def test_sigma_clip_is_k_std_per_role():
    policy = parse_policy("int6,embed=7,lora=5,fp16max=0,clip=sigma,embed_sigmas=3,attn_sigmas=2.5,mlp_sigmas=2,lora_sigmas=3.5")
    assert policy.sigmas_for("embed") == 3 and policy.sigmas_for("mlp") == 2
    w = heavy(40, 300, seed=1)
    std, row_max = w.std(dim=1), w.abs().amax(dim=1)
    for role, name in ROLE_NAMES.items():
        k, bits = policy.sigmas_for(role), policy.bits_for(role)
        assert bool((k * std < row_max).all()), role  # the clip is below the max: values are clipped
        q = encode_tensor(name, w, policy)
        qmax = 2 ** (bits - 1) - 1
        assert q.scheme == f"int{bits}_row"
        assert torch.equal(q.scale, (k * std / qmax).half()), role  # the record: K * std / qmax in fp16
        assert int(q.data.abs().max()) == qmax  # the tails saturate at the clip
        deq = dequantize_tensor(q)
        inside = w.abs() <= k * std[:, None]
        assert bool(((w - deq).abs()[inside] <= q.scale.float()[:, None].expand_as(w)[inside] / 2 + 1e-7).all())


def test_sigma_clip_is_not_capped_at_the_row_max_as_in_the_record():
    # At the record's K (13 for attention) a Gaussian row's clip is far above its max |w|: the step
    # is K/qmax standard deviations and the codes never reach +-qmax. That is the record's rule
    # (scale = K std / qmax, no min with the max), and what makes its int6 codes cheap to store.
    w = gaussian(64, 512, seed=2, scale=0.02)
    policy = parse_policy("int6,fp16max=0,clip=sigma")
    q = encode_tensor("attn.0.c_q.weight", w, policy)
    assert policy.attn_sigmas == 13.0
    assert bool((13 * w.std(dim=1) > w.abs().amax(dim=1)).all())
    assert torch.equal(q.scale, (13 * w.std(dim=1) / 31).half())
    assert int(q.data.abs().max()) < 31 // 2
    plain = encode_tensor("attn.0.c_q.weight", w, parse_policy("int6,fp16max=0"))
    assert len(torch.unique(q.data)) < len(torch.unique(plain.data))  # fewer distinct codes


def test_sigma_clip_on_constant_and_zero_rows():
    w = gaussian(4, 50, seed=3)
    w[1] = 0.25  # no spread: falls back to the max, so the value stays representable
    w[2] = 0.0
    q = encode_tensor("mlps.0.fc.weight", w, parse_policy("int6,fp16max=0,clip=sigma"))
    deq = dequantize_tensor(q)
    assert torch.equal(deq[1], torch.full((50,), float(torch.tensor(0.25 / 31).half()) * 31))
    assert bool((q.data[2] == 0).all()) and float(q.scale[2]) == 1.0 and bool((deq[2] == 0).all())


def test_sigma_clip_with_gptq_uses_the_same_row_scales():
    g = torch.Generator().manual_seed(4)
    w = gaussian(48, 96, seed=4)
    X = torch.randn(512, 96, generator=g)
    H = X.T @ X / 512
    policy = parse_policy("int5,fp16max=0,clip=sigma,attn_sigmas=4,gptq")
    q = encode_tensor("attn.0.c_q.weight", w, policy, hessian=H)
    scale = fp16_scale(4 * w.std(dim=1) / 15)
    assert torch.equal(q.scale, scale)
    assert torch.equal(q.data, gptq_quantize(w, H, 5, scale, damp=policy.gptq_damp))


# ------------------------------------------------------------------ quantized factors


@pytest.mark.parametrize("bits, group, n", [(4, 64, 200), (2, 64, 128), (4, 7, 30), (8, 1000, 50), (3, 1, 9)])
def test_factor_codes_are_within_half_a_step(bits, group, n):
    x = heavy(5, n, seed=bits + n)
    x[3, : min(group, n)] = 0.0  # an all-zero group: scale 1, codes 0
    codes, scales = quantize_factor(x, bits, group)
    lo, hi = factor_code_range(bits)
    ngroups = math.ceil(n / group)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and scales.dtype == torch.float16 and scales.shape == (5, ngroups)
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    deq = dequantize_factor(codes, scales, group)
    step = scales.float()[:, torch.arange(n) // group]
    # The bound derived in quantize_factor: every entry within half a step (up to float32 rounding).
    assert bool(((x - deq).abs() <= step / 2 * (1 + 1e-6)).all())
    # ... with the step as small as that allows: a group's max |x| at hi + 1/2 steps, rounded up to fp16.
    padded = torch.nn.functional.pad(x.abs(), (0, ngroups * group - n)).reshape(5, ngroups, group).amax(dim=2)
    nonzero = padded > 0
    assert bool((scales.float() * (hi + 0.5) >= padded).all())
    assert bool((scales.float()[nonzero] <= (padded[nonzero] / (hi + 0.5)).half().float() * (1 + 2**-9)).all())
    assert bool((scales[3, 0] == 1) & (codes[3, : min(group, n)] == 0).all())


def structured_residual(rows: int = 96, cols: int = 128, seed: int = 5) -> torch.Tensor:
    """A quantization error with a strong rank-2 part (a systematic bias) plus rounding noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(rows, 2, generator=g) @ torch.randn(2, cols, generator=g) * 0.05
    return low + torch.rand(rows, cols, generator=g).sub(0.5) * 0.02


def test_lqer_reduces_the_error_of_random_and_structured_residuals():
    w = gaussian(96, 128, seed=6, scale=0.05)
    q = encode_tensor("mlps.0.fc.weight", w, parse_policy("int4,fp16max=0"))
    random_residual = w - dequantize_tensor(q)
    for residual, least in ((random_residual, 0.02), (structured_residual(), 0.8)):
        before = squared_error(residual)
        for bits in ((4, 4), (2, 4), (16, 4), (4, 16)):
            corr = lqer_correction(residual, 4, bits=bits, group=64)
            after = squared_error(residual - corr.product())
            assert after < (1 - least) * before, (bits, after / before)


def test_lqer_error_is_bounded_by_the_factor_rounding():
    # ||E - u_q v_q|| <= ||E - u_q v*|| + ||u_q||_2 ||v* - v_q||_F with v* the refit (least squares)
    # v, and ||v* - v_q||_F <= sqrt(sum over entries of (step/2)^2): what the factor bound gives.
    residual = structured_residual(seed=7)
    corr = lqer_correction(residual, 3, bits=(2, 4), group=32)
    u_q, v_q = corr.factors()
    v_star = torch.linalg.lstsq(u_q.double(), residual.double(), driver="gelsd").solution.float()
    step = corr.vs.float()[:, torch.arange(residual.shape[1]) // 32]
    assert bool(((v_star - v_q).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all())
    bound = float((residual - u_q @ v_star).norm()) + float(torch.linalg.matrix_norm(u_q, 2)) * float((step / 2).square().sum().sqrt())
    assert float((residual - corr.product()).norm()) <= bound * (1 + 1e-5)
    assert float((residual - u_q @ v_star).norm()) <= float(residual.norm())  # a projection never adds error


def test_refit_and_placement_beat_the_records_exact_layout():
    # The record stores u = U S (int2) and v = V (int4) with no refit; the encoder may move S into
    # v and refits v to the rounded u. Same bytes, less error.
    residual = structured_residual(seed=8) + gaussian(96, 128, seed=9, scale=0.01)
    record = lqer_correction(residual, 4, bits=(2, 4), group=64, refit=False, placements=("u",))
    ours = lqer_correction(residual, 4, bits=(2, 4), group=64)
    assert ours.nbytes == record.nbytes
    assert squared_error(residual - ours.product()) < 0.9 * squared_error(residual - record.product())


def test_hessian_weighted_lqer_targets_the_output_error():
    g = torch.Generator().manual_seed(10)
    w = gaussian(64, 128, seed=10, scale=0.05)
    X = torch.randn(2048, 128, generator=g) @ torch.randn(128, 128, generator=g) * 0.2
    H = X.T @ X / X.shape[0]
    policy = parse_policy("int4,fp16max=0,lowrank=8,lqer_bits=4,lqer_group=32")
    base = encode_tensor("mlps.0.fc.weight", w, parse_policy("int4,fp16max=0"))
    plain = encode_tensor("mlps.0.fc.weight", w, policy)
    weighted = encode_tensor("mlps.0.fc.weight", w, policy, hessian=H)
    assert plain.lowrank_bits == weighted.lowrank_bits == (4, 4) and plain.lowrank_group == 32
    e = {k: dequantize_tensor(q) for k, q in {"base": base, "plain": plain, "weighted": weighted}.items()}
    assert output_error(w, e["weighted"], H) < output_error(w, e["plain"], H) < output_error(w, e["base"], H)


@pytest.mark.parametrize("seed", [0, 1])
def test_hessian_rounding_of_v_protects_a_massive_input_channel(seed):
    # One input channel with massive activations (as in trained models' last layers), correlated
    # with a few others; the error's main direction has a large entry in the same scale group
    # as that channel, so rounding v to nearest leaves up to half a coarse step on the channel
    # that weighs most. GPTQ on v pushes that rounding error onto the correlated channels.
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4096, 128, generator=g)
    X[:, 70] = 15 * (0.6 * X[:, 70] + 1.6 * X[:, 71:75].mean(dim=1))
    H = X.T @ X / 4096
    b = torch.randn(128, generator=g) * 0.1
    b[100], b[70] = 1.0, 0.2
    E = torch.outer(torch.randn(64, generator=g), b) * 0.05 + torch.randn(64, 128, generator=g) * 0.0005
    base = squared_error(E, H)
    removed = {hr: 1 - squared_error(E - lqer_correction(E, 2, H, bits=(2, 4), group=64, hessian_rounding=hr).product(), H) / base for hr in (False, True)}
    assert removed[True] > removed[False] + 0.03, removed


def test_a_correction_that_does_not_help_is_not_stored():
    # Values on the int4 grid of their row scale: the codes are exact and there is nothing to correct.
    g = torch.Generator().manual_seed(11)
    codes = torch.randint(-7, 8, (32, 64), generator=g).float()
    codes[:, 0] = 7
    w = codes * 0.125
    q = encode_tensor("mlps.0.fc.weight", w, parse_policy("int4,fp16max=0,lowrank=2,lqer_bits=4"))
    assert torch.equal(dequantize_tensor(q), w) and q.lowrank_u is None and q.lowrank_bits is None


# ------------------------------------------------------------------ top-K selection


def top_k_state() -> dict[str, torch.Tensor]:
    # big: a large, low-amplitude matrix (largest error, least gained per stored byte);
    # small: a small, high-amplitude one (less error in all, more gained per byte).
    return {
        "attn.0.c_q.weight": gaussian(256, 256, seed=12, scale=0.01),
        "mlps.0.fc.weight": gaussian(64, 64, seed=13, scale=0.04),
        "mlps.0.proj.weight": gaussian(64, 64, seed=14, scale=0.02),
        "tok_emb.weight": gaussian(300, 64, seed=15, scale=0.3),
        "attn_scale": torch.ones(64),
    }


@pytest.mark.parametrize("how", ["gain", "norm"])
def test_top_k_picks_the_tensors_it_ranks_first(how):
    state = top_k_state()
    policy = parse_policy(f"int4,fp16max=0,lowrank=4,lqer_bits=4,lqer_top=1,lqer_select={how}")
    q, _ = encode_state(state, policy)
    plain = {n: encode_tensor(n, t, policy, lowrank=False) for n, t in state.items()}
    cands = {n: lowrank_candidate(n, state[n], plain[n], policy) for n in ("attn.0.c_q.weight", "mlps.0.fc.weight", "mlps.0.proj.weight")}
    if how == "gain":
        want = max(cands, key=lambda n: cands[n].gain(False) / cands[n].correction.nbytes)
        assert want == "mlps.0.fc.weight"
    else:
        want = max(cands, key=lambda n: cands[n].plain[0])  # the record: the largest ||W - Q||
        assert want == "attn.0.c_q.weight"
    assert [n for n, t in q.items() if t.lowrank_u is not None] == [want]
    assert torch.equal(dequantize_tensor(q[want]), dequantize_tensor(plain[want]) + cands[want].correction.product())
    assert q["tok_emb.weight"].lowrank_u is None  # not a lowrank role by default
    # lqer_top=0: every tensor where the correction helps; embed joins with lowrank_roles.
    every, _ = encode_state(state, parse_policy("int4,fp16max=0,lowrank=4,lqer_bits=4,lowrank_roles=embed+attn+mlp"))
    assert {n for n, t in every.items() if t.lowrank_u is not None} == {"attn.0.c_q.weight", "mlps.0.fc.weight", "mlps.0.proj.weight", "tok_emb.weight"}


def test_selection_ranks_weighted_gains_only_when_every_candidate_has_a_hessian():
    def cand(name, plain, weighted):
        corr = LowRank(torch.zeros(1, 1, dtype=torch.float16), torch.zeros(1, 49, dtype=torch.float16))  # 100 bytes
        return LowRankCandidate(name, corr, plain, weighted)

    a = cand("a", (10.0, 1.0), (5.0, 4.5))  # plain gain 9, weighted gain 0.5
    b = cand("b", (10.0, 6.0), (5.0, 1.0))  # plain gain 4, weighted gain 4
    assert [c.name for c in select_lowrank([a, b], 1)] == ["b"]
    c = cand("c", (10.0, 8.0), None)  # no Hessian: everything is ranked by plain errors
    assert [x.name for x in select_lowrank([a, b, c], 1)] == ["a"]
    useless = cand("d", (10.0, 10.0), (5.0, 6.0))
    assert [x.name for x in select_lowrank([useless, b], 0)] == ["b"]  # never store what does not help
    assert [x.name for x in select_lowrank([a, b, c], 0, "norm")] == ["a", "b", "c"]  # ties by name


# ------------------------------------------------------------------ the artifact: version 3


LQER_POLICY = "int5,embed=7,fp16max=64,outliers=3,lowrank=3,lqer_ubits=2,lqer_vbits=4,lqer_group=8,lowrank_roles=embed+attn+mlp"


def lqer_state() -> dict[str, torch.Tensor]:
    return {
        "tok_emb.weight": gaussian(40, 16, seed=16),
        "attn.0.c_q.weight": gaussian(16, 20, seed=17, scale=0.1),
        "mlps.0.fc.weight": gaussian(32, 16, seed=18, scale=0.1),
        "attn_scale": 1 + 0.1 * gaussian(2, 16, seed=19),
        "mlps.0.proj.weight": gaussian(4, 4, seed=20),
    }


def lqer_artifact(codec: str = "zlib") -> tuple[bytes, dict[str, QuantizedTensor]]:
    q, aliases = encode_state(lqer_state(), parse_policy(LQER_POLICY))
    blob, _ = pack_quantized({"model_dim": 16}, q, aliases=aliases, codec=codec, meta={"k": 1})
    return blob, q


def split(blob: bytes) -> tuple[str, dict, bytes]:
    codec, payload = unseal(blob)
    (n,) = struct.unpack_from("<I", payload)
    return codec, json.loads(payload[4 : 4 + n]), payload[4 + n :]


def resealed(blob: bytes, edit_header=lambda h: None, edit_data=lambda d: d, version: int = LQER_FORMAT_VERSION) -> bytes:
    """The artifact with its header and/or data edited, its checksum recomputed (a crafted file)."""
    codec, header, data = split(blob)
    edit_header(header)
    raw = json.dumps(header).encode()
    return seal(struct.pack("<I", len(raw)) + raw + bytes(edit_data(bytearray(data))), codec, version)[1]


def test_lqer_artifact_roundtrips_bit_for_bit(tmp_path):
    blob, q = lqer_artifact()
    assert {n for n, t in q.items() if t.lowrank_bits == (2, 4)} == {"tok_emb.weight", "attn.0.c_q.weight", "mlps.0.fc.weight"}
    _, info = pack_quantized({"model_dim": 16}, q, codec="zlib", meta={"k": 1})
    loaded = read_artifact(write_blob(tmp_path / "a.lgz", blob, info).path)
    for name, t in q.items():
        assert torch.equal(loaded.state_dict[name], dequantize_tensor(t)), name
    assert blob[8:10] == struct.pack("<H", LQER_FORMAT_VERSION)
    _, header, _ = split(blob)
    assert header["format_version"] == LQER_FORMAT_VERSION
    entry = next(t for t in header["tensors"] if t["name"] == "attn.0.c_q.weight")
    assert entry["lowrank"] == {"u_bits": 2, "v_bits": 4, "group": 8}
    parts = entry["parts"]
    assert parts["lowrank_u"]["dtype"] == parts["lowrank_v"]["dtype"] == "int8"
    assert parts["lowrank_u"]["shape"] == [16, 3] and parts["lowrank_v"]["shape"] == [3, 20]
    assert parts["lowrank_us"]["shape"] == [3, 2] and parts["lowrank_vs"]["shape"] == [3, 3]  # ceil(16/8), ceil(20/8)
    assert "lowrank" not in next(t for t in header["tensors"] if t["name"] == "attn_scale")


def det_matrix(rows: int, cols: int, salt: int) -> torch.Tensor:
    """The same values on every machine: integer arithmetic, then one correctly rounded division."""
    i = torch.arange(rows, dtype=torch.int64)[:, None]
    j = torch.arange(cols, dtype=torch.int64)[None, :]
    k = (i * 7919 + j * 104729 + salt * 1299709) % 2003 - 1001
    k = k * k * k.sign() // 1001  # heavier tails, still integers
    return k.to(torch.float32) / (1000.0 * (i % 7 + 1).to(torch.float32))


def det_state() -> dict[str, torch.Tensor]:
    return {
        "tok_emb.weight": det_matrix(300, 64, 1),
        "attn.0.c_q.weight": det_matrix(96, 64, 2) / 10,
        "mlps.0.fc.weight": det_matrix(128, 64, 3) / 20,
        "attn_scale": det_matrix(2, 64, 4) / 50 + 1,
        "mlps.0.proj.weight": det_matrix(8, 8, 5),
    }


def test_artifacts_without_lqer_are_version_2_and_byte_identical_to_the_previous_writer():
    # Payload sha256s written by the writer before LQER existed (the same state and policies):
    # the default policy, and others without LQER, still give exactly the same bytes.
    previous = {
        "fp16max=4096": "5423d1de13381a4d1e6c1b838d853818b48f1b153b380352f5f9edf594ed4dfc",
        "int6,embed=7,fp16max=4096,outliers=3": "268fc13715342597677513223ac5ee18a6cb63d7f5070c7e9cbd62949448475a",
        "int5,clip=mse,fp16max=4096,control=fp16": "a2d56c854349e5872a2ac5e0083729ade8b6f66b8f7dd83d608c29c027336092",
    }
    for text, digest in previous.items():
        q, aliases = encode_state(det_state(), parse_policy(text))
        blob, _ = pack_quantized({"d": 1}, q, aliases=aliases, codec="zlib", meta={"quant": parse_policy(text).to_dict()})
        assert blob[8:10] == struct.pack("<H", FORMAT_VERSION) == b"\x02\x00"
        assert hashlib.sha256(unseal(blob)[1]).hexdigest() == digest, text


def test_a_version_2_file_of_the_previous_writer_still_loads():
    # tests/assets/artifact_v2_lowrank.lgz: written by the writer before LQER (int5 codes,
    # outliers, float16 low-rank factors, byte planes, lzma).
    blob = (ASSETS / "artifact_v2_lowrank.lgz").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == "5250c6492832bd35245ed1ae1e0cae03ab3aa4b6faf7eeab99033bc1a1c35eed"
    loaded = read_artifact(blob)
    assert blob[8:10] == b"\x02\x00" and loaded.meta["quant"]["lowrank_rank"] == 2
    assert QuantPolicy.from_dict(loaded.meta["quant"]) == parse_policy("int5,fp16max=64,outliers=3,lowrank=2")
    _, header, data = split(blob)
    for entry in header["tensors"]:
        parts = {}
        for part, p in entry["parts"].items():
            dtype = {"int8": "i1", "float16": "<f2", "float32": "<f4", "int32": "<i4"}[p["dtype"]]
            raw = np.frombuffer(data, np.uint8, p["nbytes"], p["offset"])
            if p.get("layout") == "planes":
                raw = raw.reshape(np.dtype(dtype).itemsize, -1).T.copy()
            parts[part] = raw.view(dtype).reshape(p["shape"]).astype(np.float64)
        if "scale" not in parts:
            want = parts["data"]
        else:  # what the version-2 reader computes: codes * scale + u @ v, outliers replaced
            want = parts["data"] * parts["scale"][:, None] + parts["lowrank_u"] @ parts["lowrank_v"]
            want.reshape(-1)[parts["outlier_idx"].astype(np.int64)] = parts["outlier_val"]
        np.testing.assert_allclose(loaded.state_dict[entry["name"]].numpy(), want, rtol=1e-6, atol=1e-7)


def test_export_and_load_a_model_under_the_record_policy(tmp_path):
    from loopgolf.export.gptq import calibration_tokens

    model = tiny_model(seed=1)
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 64, (4000,), generator=g).numpy()
    calib = calibration_tokens(model, "train", tokens=stream, num_seqs=4, seq_len=16, seed=0)
    policy = parse_policy(RECORD_POLICY + ",fp16max=0")
    info = export_model(model, tmp_path / "r.lgz", policy=policy, codec="lzma", calibration=calib)
    rebuilt, loaded = load_model(tmp_path / "r.lgz")
    assert QuantPolicy.from_dict(loaded.meta["quant"]) == policy
    _, header, _ = split((tmp_path / "r.lgz").read_bytes())
    with_lqer = [t["name"] for t in header["tensors"] if "lowrank" in t]
    assert len(with_lqer) == 3 and all(t["lowrank"] == {"u_bits": 2, "v_bits": 4, "group": 64} for t in header["tensors"] if "lowrank" in t)
    assert header["format_version"] == 3 and info.total_bytes == (tmp_path / "r.lgz").stat().st_size


# ------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "text, message",
    [
        ("lowrank=2,lqer_top=-1", "lqer_top must be a non-negative"),
        ("lowrank=2,lqer_top=2000000", "lqer_top must be at most"),
        ("lowrank=2,lqer_top=x", "bad value"),
        ("clip=sigma,sigmas=nan", "sigmas must be a finite number"),
        ("clip=sigma,sigmas=inf", "sigmas must be a finite number"),
        ("clip=sigma,attn_sigmas=0", "attn_sigmas must be a finite number"),
        ("clip=sigma,mlp_sigmas=-3", "mlp_sigmas must be a finite number"),
        ("clip=sigma,sigmas=1e9", "sigmas must be a finite number"),
        ("clip=sigma,sigmas=abc", "bad value"),
        ("sigmas=12", "only applies with clip=sigma"),
        ("clip=mse,embed_sigmas=12", "only applies with clip=sigma"),
        ("lqer_bits=4", "need a low-rank correction: set lowrank=R"),
        ("lowrank=0,lqer_bits=4", "need a low-rank correction"),
        ("lqer_top=3", "need a low-rank correction"),
        ("lowrank=2,lqer_bits=9", "lqer_ubits must be an integer"),
        ("lowrank=2,lqer_vbits=1", "lqer_vbits must be an integer"),
        ("lowrank=2,lqer_bits=x", "bit width"),
        ("lowrank=2,lqer_bits=4,lqer_group=0", "lqer_group must be an integer in"),
        ("lowrank=2,lqer_bits=4,lqer_group=99999999999", "lqer_group must be an integer in"),
        ("lowrank=2,lqer_group=32", "lqer_group only applies to quantized factors"),
        ("lowrank=-1", "non-negative"),
        ("lowrank=100000000", "lowrank_rank must be at most"),
        ("lowrank=2,lqer_select=best", "lqer_select must be one of"),
        ("lowrank=2,lowrank_roles=attn+control", "lowrank_roles must be distinct roles"),
        ("lowrank=2,lowrank_roles=attn+attn", "lowrank_roles must be distinct roles"),
        ("lowrank=2,lowrank_roles=", "lowrank_roles must be distinct roles"),
        ("lqer=4", "unknown policy item"),
    ],
)
def test_bad_policies_give_one_line_errors(text, message):
    with pytest.raises(PolicyError, match=message) as info:
        parse_policy(text)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


def test_policy_syntax_roundtrips_and_later_items_win():
    p = parse_policy("int6,clip=sigma,sigmas=10,mlp_sigmas=11.5,lowrank=4,lqer_bits=4,lqer_ubits=2,lqer_group=32,lqer_top=3,lowrank_roles=mlp+embed")
    assert (p.embed_sigmas, p.attn_sigmas, p.mlp_sigmas, p.lora_sigmas) == (10, 10, 11.5, 10)
    assert (p.lqer_ubits, p.lqer_vbits, p.lqer_group, p.lqer_top, p.lqer_select) == (2, 4, 32, 3, "gain")
    assert p.lowrank_roles == "embed+mlp" and p.uses_lowrank("embed") and not p.uses_lowrank("attn")
    for policy in (p, parse_policy(RECORD_POLICY), parse_policy("lowrank=2,lqer_vbits=fp16,lqer_ubits=int3")):
        assert parse_policy(policy.describe()) == policy
        assert QuantPolicy.from_dict(policy.to_dict()) == policy
    assert set(QuantPolicy().to_dict()) == {
        "embed_bits", "attn_bits", "mlp_bits", "lora_bits", "float_max_numel", "control_fp32",
        "clip", "clip_percentile", "gptq", "gptq_damp", "gptq_block", "outlier_topk", "lowrank_rank",
    }  # fmt: skip  # the meta of a default artifact is what it was before these options
    with pytest.raises(PolicyError, match="no clip sigmas for role 'control'"):
        p.sigmas_for("control")


def test_quantize_factor_refuses_values_beyond_fp16():
    with pytest.raises(QuantError, match="beyond the fp16 range"):
        quantize_factor(torch.full((1, 4), 1e38), 4, 2)


def _entry(h, name="attn.0.c_q.weight"):
    return next(t for t in h["tensors"] if t["name"] == name)


def _set_lowrank(**kw):
    return lambda h: _entry(h)["lowrank"].update(kw)


def _bump_code(h, data):
    p = _entry(h)["parts"]["lowrank_u"]
    data[p["offset"]] = 2  # u is 2-bit: codes in [-2, 1]
    return data


LQER_CORRUPTIONS = {
    "group 0": (_set_lowrank(group=0), None, "lowrank group must be an int in"),
    "group negative": (_set_lowrank(group=-8), None, "lowrank group must be an int in"),
    "group huge": (_set_lowrank(group=2**70), None, "lowrank group must be an int in"),
    "group a string": (_set_lowrank(group="8"), None, "lowrank group must be an int in"),
    "group a bool": (_set_lowrank(group=True), None, "lowrank group must be an int in"),
    "group changes the scale shape": (_set_lowrank(group=4), None, "lowrank_u scales must be"),
    "bits 9": (_set_lowrank(u_bits=9), None, "u_bits/v_bits must be in"),
    "bits 1": (_set_lowrank(v_bits=1), None, "u_bits/v_bits must be in"),
    "bits null": (_set_lowrank(v_bits=None), None, "u_bits/v_bits must be in"),
    "both float16": (_set_lowrank(u_bits=16, v_bits=16), None, "not both 16"),
    "float16 claimed for int8 codes": (_set_lowrank(u_bits=16), None, "lowrank_u"),
    "wider bits than the codes": (_set_lowrank(u_bits=8), None, None),  # loads: every int8 code is valid at 8 bits
    "missing key": (lambda h: _entry(h)["lowrank"].pop("group"), None, "exactly u_bits, v_bits and group"),
    "extra key": (_set_lowrank(zero_point=1), None, "exactly u_bits, v_bits and group"),
    "not an object": (lambda h: _entry(h).update(lowrank=[2, 4, 8]), None, "exactly u_bits, v_bits and group"),
    "lowrank without factors": (lambda h: _entry(h, "attn_scale").update(lowrank={"u_bits": 2, "v_bits": 4, "group": 8}), None, "float scheme"),
    "scales without lowrank entry": (lambda h: _entry(h).pop("lowrank"), None, "scales or group without low-rank bits"),
    "code out of range": (lambda h: None, _bump_code, "lowrank_u codes outside \\[-2, 1\\]"),
}


@pytest.mark.parametrize("case", list(LQER_CORRUPTIONS))
def test_crafted_lqer_headers_are_rejected_cleanly(case):
    edit_header, edit_data, message = LQER_CORRUPTIONS[case]
    blob, _ = lqer_artifact()
    header = split(blob)[1]
    crafted = resealed(blob, edit_header, (lambda d: d) if edit_data is None else (lambda d: edit_data(header, d)))
    if message is None:
        read_artifact(crafted)
        return
    with pytest.raises(ArtifactError, match=message) as info:
        read_artifact(crafted)
    assert "\n" not in str(info.value)


def test_lqer_needs_version_3():
    blob, _ = lqer_artifact()
    # The same tensors in a version-2 container (and header): refused, not misread.
    as_v2 = resealed(blob, lambda h: h.update(format_version=2), version=2)
    with pytest.raises(ArtifactError, match="need format version 3|optional"):
        read_artifact(as_v2)


def test_fuzzed_lqer_payloads_fail_only_with_artifact_errors():
    blob, _ = lqer_artifact()
    payload = unseal(blob)[1]
    rng = np.random.default_rng(2)
    accepted = 0
    for _ in range(600):
        b = bytearray(payload)
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(len(b)))
            b[pos] = int(rng.integers(256))
        try:
            read_artifact(seal(bytes(b), "zlib", LQER_FORMAT_VERSION)[1])
            accepted += 1
        except ArtifactError:
            pass
    assert 0 < accepted < 600


def test_validate_quantized_checks_lqer_parts():
    _, q = lqer_artifact()
    t = q["attn.0.c_q.weight"]
    validate_quantized(t)

    def broken(**kw) -> QuantizedTensor:
        fields = dict(t.__dict__)
        fields.update(kw)
        return QuantizedTensor(**fields)

    cases = [
        (dict(lowrank_us=None), "needs its group scales"),
        (dict(lowrank_vs=t.lowrank_vs[:, :1]), "lowrank_v scales"),
        (dict(lowrank_vs=t.lowrank_vs.float()), "lowrank_v scales"),
        (dict(lowrank_us=torch.full_like(t.lowrank_us, float("nan"))), "non-finite"),
        (dict(lowrank_bits=(2,)), "lowrank_bits must be two bit widths"),
        (dict(lowrank_bits=[2, 4]), "lowrank_bits must be two bit widths"),
        (dict(lowrank_group=0), "lowrank_group must be an int"),
        (dict(lowrank_v=t.lowrank_v.half()), "lowrank_v codes"),
        (dict(lowrank_bits=None), "without low-rank bits"),
        (dict(lowrank_u=None, lowrank_v=None), "without low-rank factors"),
    ]
    for kw, message in cases:
        with pytest.raises(ArtifactError, match=message):
            validate_quantized(broken(**kw))


# ------------------------------------------------------------------ grouped layout (version 3)


def grouped_artifact(policy: str = "int5,embed=7,fp16max=64,outliers=3") -> tuple[bytes, dict[str, QuantizedTensor]]:
    state = lqer_state()
    state["attn.1.c_q.weight"] = gaussian(16, 20, seed=21, scale=0.1)  # a second matrix of the same kind
    q, aliases = encode_state(state, parse_policy(policy + ",layout=grouped"))
    blob, _ = pack_quantized({"model_dim": 16}, q, aliases=aliases, codec="zlib", layout="grouped")
    return blob, q


def test_grouped_layout_roundtrips_bit_for_bit_with_codes_grouped_by_kind():
    blob, q = grouped_artifact()
    loaded = read_artifact(blob)
    for name, t in q.items():
        assert torch.equal(loaded.state_dict[name], dequantize_tensor(t)), name
    _, header, data = split(blob)
    assert header["format_version"] == 3 and blob[8:10] == b"\x03\x00"
    parts = [(t["name"], p, e) for t in header["tensors"] for p, e in t["parts"].items()]
    order = [(n, p) for n, p, e in sorted(parts, key=lambda x: x[2]["offset"])]
    # codes first, the two attn.*.c_q codes side by side, then scales, other parts, floats last
    assert order[:4] == [("tok_emb.weight", "data"), ("attn.0.c_q.weight", "data"), ("attn.1.c_q.weight", "data"), ("mlps.0.fc.weight", "data")]
    assert [p for _, p in order[4:8]] == ["scale"] * 4 and order[-2:] == [("attn_scale", "data"), ("mlps.0.proj.weight", "data")]
    e = _entry(header)["parts"]["data"]
    assert e["layout"] == "columns" and e["shape"] == [16, 20]
    assert data[e["offset"] : e["offset"] + e["nbytes"]] == q["attn.0.c_q.weight"].data.T.contiguous().numpy().tobytes()
    # and with LQER parts: still bit for bit
    blob, q = grouped_artifact(LQER_POLICY)
    assert all(torch.equal(read_artifact(blob).state_dict[n], dequantize_tensor(t)) for n, t in q.items())


def _shift(name: str, part: str, by: int):
    return lambda h: _entry(h, name)["parts"][part].update(offset=_entry(h, name)["parts"][part]["offset"] + by)


GROUPED_CORRUPTIONS = {
    "overlap": (_shift("attn.0.c_q.weight", "scale", -2), "overlaps the part before it"),
    "gap": (lambda h: [_shift(n, "data", 4)(h) for n in ("mlps.0.proj.weight",)], "unreferenced bytes|outside"),
    "negative offset": (lambda h: _entry(h)["parts"]["data"].update(offset=-1), "outside"),
    "columns on a 1-D part": (lambda h: _entry(h)["parts"]["scale"].update(layout="columns"), "layout 'columns' is not valid for float16"),
    "columns on floats": (lambda h: _entry(h, "mlps.0.proj.weight")["parts"]["data"].update(layout="columns"), "layout 'columns' is not valid"),
    "unknown layout": (lambda h: _entry(h)["parts"]["data"].update(layout="rows"), "layout 'rows' is not valid"),
    "two parts, one place": (
        lambda h: _entry(h, "attn.1.c_q.weight")["parts"]["data"].update(offset=_entry(h)["parts"]["data"]["offset"]),
        "overlaps|unreferenced",
    ),
}


@pytest.mark.parametrize("case", list(GROUPED_CORRUPTIONS))
def test_crafted_grouped_layouts_are_rejected_cleanly(case):
    edit, message = GROUPED_CORRUPTIONS[case]
    blob, _ = grouped_artifact()
    with pytest.raises(ArtifactError, match=message):
        read_artifact(resealed(blob, edit))


def test_grouped_layout_needs_version_3():
    blob, _ = grouped_artifact()
    with pytest.raises(ArtifactError, match="not where the previous tensor ended|layout 'columns' is not valid"):
        read_artifact(resealed(blob, lambda h: h.update(format_version=2), version=2))
    with pytest.raises(PolicyError, match="layout must be one of"):
        parse_policy("layout=sorted")
    with pytest.raises(ArtifactError, match="unknown layout"):
        pack_quantized({}, {}, layout="sorted")


def test_the_byte_planner_takes_the_new_items_and_says_they_are_uncalibrated():
    from loopgolf.budget import predict_bytes
    from loopgolf.config import get_preset

    cfg = get_preset("debug").model
    plain = predict_bytes(cfg, parse_policy("int6,embed=7,gptq"), "brotli")
    record = predict_bytes(cfg, parse_policy(RECORD_POLICY + ",layout=grouped"), "brotli")
    assert plain["uncalibrated"] == ["gptq"] and record["uncalibrated"] == ["gptq", "sigma", "lqer", "layout"]
    assert record["model_bytes"] > 0

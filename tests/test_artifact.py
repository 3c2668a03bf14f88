"""The artifact format: codecs, stored tensors, container and payload, version 1 files, and a
loader that rejects every malformed file with ArtifactError (fuzzed with thousands of mutants)."""

import hashlib
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopgolf.export.artifact import (
    CODECS,
    FORMAT_VERSION,
    MAGIC,
    ArtifactError,
    CodecError,
    QuantizedTensor,
    best_codec,
    compress,
    decompress,
    dequantize_tensor,
    find_aliases,
    read_artifact,
    scheme_bits,
    seal,
    unseal,
    validate_quantized,
)
from loopgolf.export.pack import pack_quantized
from loopgolf.export.quantize import QuantPolicy, encode_state, encode_tensor, parse_policy

# ------------------------------------------------------------------ codecs

SAMPLES = [b"", b"x", os.urandom(3000), bytes(50_000), b"loop golf " * 2000 + os.urandom(100)]


@pytest.mark.parametrize("codec", CODECS)
def test_roundtrip_and_determinism(codec):
    for data in SAMPLES:
        out = compress(data, codec)
        assert out == compress(data, codec)
        assert decompress(out, codec, max_output=len(data)) == data


@pytest.mark.parametrize("codec", CODECS)
def test_bomb_guard_truncation_and_trailing_bytes(codec):
    data = bytes(1_000_000)
    out = compress(data, codec)
    assert len(out) < 10_000  # a real bomb: huge ratio
    with pytest.raises(CodecError, match="beyond the allowed 999999 bytes"):
        decompress(out, codec, max_output=len(data) - 1)
    with pytest.raises(CodecError):
        decompress(out[: len(out) // 2], codec, max_output=len(data))
    with pytest.raises(CodecError):
        decompress(out + b"\x00junk", codec, max_output=len(data))
    with pytest.raises(CodecError):
        decompress(b"\xff" * 40, codec, max_output=len(data))


def test_best_codec_picks_smallest_first_on_ties():
    data = b"abcabcabd" * 5000 + os.urandom(500)
    sizes = {c: len(compress(data, c)) for c in CODECS}
    name, out = best_codec(data)
    assert len(out) == min(sizes.values())
    assert name == next(c for c in CODECS if sizes[c] == min(sizes.values()))
    assert decompress(out, name, len(data)) == data
    # Ties go to the codec listed first.
    assert best_codec(data, ("zlib", "zlib"))[0] == "zlib"
    assert best_codec(data, ("zstd", "zlib"))[0] == ("zlib" if sizes["zlib"] < sizes["zstd"] else "zstd")


def test_zlib_is_level_9():
    data = b"golf " * 10_000 + os.urandom(200)
    assert compress(data, "zlib") == zlib.compress(data, 9)


def test_unknown_codec_lists_valid_ones():
    assert issubclass(CodecError, ArtifactError) and issubclass(ArtifactError, ValueError)
    with pytest.raises(CodecError, match="zlib, lzma, zstd"):
        compress(b"x", "gzip")
    with pytest.raises(ValueError, match="valid codecs"):
        decompress(b"x", "bz2", 10)
    with pytest.raises(ValueError):
        best_codec(b"x", ())
    with pytest.raises(ValueError):
        decompress(compress(b"x", "zlib"), "zlib", -1)


@pytest.mark.skipif("brotli" not in CODECS, reason="brotli not installed")
def test_brotli_is_last_when_available():
    assert CODECS[-1] == "brotli"


# ------------------------------------------------------------------ stored tensors


def test_validate_rejects_inconsistent_tensors():
    q = encode_tensor("mlps.0.fc.weight", torch.randn(300, 300), QuantPolicy.uniform(4))
    bad = QuantizedTensor(q.scheme, q.shape, q.data.clone(), q.scale, q.bits)
    bad.data[0, 0] = 8  # outside [-7, 7]
    with pytest.raises(ArtifactError, match="codes outside"):
        validate_quantized(bad)
    bad.data[0, 0] = -128
    with pytest.raises(ArtifactError, match="codes outside"):
        dequantize_tensor(bad)
    with pytest.raises(ArtifactError, match="scale"):
        dequantize_tensor(QuantizedTensor(q.scheme, q.shape, q.data, None, q.bits))
    with pytest.raises(ArtifactError, match="unknown quantization scheme"):
        scheme_bits("int8_col")
    with pytest.raises(ArtifactError):
        scheme_bits("int12_row")
    assert scheme_bits("int5_row") == 5 and scheme_bits("float16") is None


def test_dequantize_is_codes_times_the_stored_fp16_scale_with_corrections():
    q = encode_tensor("mlps.0.fc.weight", torch.randn(64, 32), parse_policy("int6,fp16max=0,outliers=3,lowrank=2"))
    expect = q.data.float() * q.scale.float()[:, None] + q.lowrank_u.float() @ q.lowrank_v.float()
    expect.view(-1)[q.outlier_idx.long()] = q.outlier_val.float()
    assert torch.equal(dequantize_tensor(q), expect)
    s = QuantizedTensor("float32", (), torch.tensor(2.5), None, None)
    assert dequantize_tensor(s).shape == () and float(dequantize_tensor(s)) == 2.5


def test_validation_of_outlier_and_lowrank_parts():
    q = encode_tensor("mlps.0.fc.weight", torch.randn(96, 200), parse_policy("int6,fp16max=0,outliers=3,lowrank=2"))
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
        with pytest.raises(ArtifactError, match=message):
            validate_quantized(broken(**kw))
    f = encode_tensor("mlps.0.fc.weight", torch.randn(4, 4), QuantPolicy())
    with pytest.raises(ArtifactError, match="float scheme"):
        validate_quantized(QuantizedTensor(f.scheme, f.shape, f.data, None, None, outlier_idx=q.outlier_idx, outlier_val=q.outlier_val))


# ------------------------------------------------------------------ container and payload

CONFIG = {"d_model": 64, "n_layers": 2, "vocab": 300, "tied": True, "loops": [1, 2, 2]}


def make_state(seed: int = 0, tied: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(300, 64, generator=g)
    return {
        "tok_emb.weight": emb,
        "attn.0.c_q.weight": torch.randn(192, 64, generator=g) * 0.05,
        "attn_scale": torch.rand(2, 64, generator=g),
        "resid_mix": torch.rand(2, 2, 64, generator=g),
        "mlps.0.proj.weight": torch.randn(8, 8, generator=g),
        "lm_head.weight": emb if tied else emb.clone(),
    }


def packed(seed=0, tied=True, codec="auto", bits=8, meta=None):
    """An artifact of make_state under a uniform policy; float_max_numel=4096 makes the small test
    matrices take the intN path."""
    state = make_state(seed, tied)
    q, aliases = encode_state(state, QuantPolicy.uniform(bits, float_max_numel=4096))
    return pack_quantized(CONFIG, q, aliases=aliases, names=list(state), codec=codec, meta=meta)


def test_roundtrip_gives_exactly_the_dequantized_tensors():
    state = make_state()
    blob, info = packed(meta={"step": 7, "val_bpb": 1.25})
    loaded = read_artifact(blob)
    q, _ = encode_state(state, QuantPolicy.uniform(8, float_max_numel=4096))
    assert list(loaded.state_dict) == list(state)
    for name, t in q.items():
        assert loaded.state_dict[name].dtype == torch.float32
        assert torch.equal(loaded.state_dict[name], dequantize_tensor(t)), name
    assert loaded.model_config == CONFIG
    assert loaded.meta == {"step": 7, "val_bpb": 1.25}
    assert loaded.codec == info.codec in CODECS
    assert loaded.info.total_bytes == info.total_bytes == len(blob)
    assert loaded.info.tensors == info.tensors
    schemes = {r["name"]: r["scheme"] for r in info.tensors}
    assert schemes["tok_emb.weight"] == "int8_row"
    assert schemes["attn_scale"] == "float32"
    assert schemes["mlps.0.proj.weight"] == "float16"


@pytest.mark.parametrize("codec", CODECS)
def test_each_codec_and_bits(codec):
    blob, info = packed(codec=codec, bits=6)
    loaded = read_artifact(blob)
    assert loaded.codec == info.codec == codec
    assert {r["scheme"] for r in info.tensors} >= {"int6_row"}


def test_auto_codec_picks_the_smallest():
    sizes = {c: packed(codec=c)[1].total_bytes for c in CODECS}
    _, info = packed()
    assert info.total_bytes == min(sizes.values())


def test_identical_weights_give_identical_bytes():
    a, _ = packed(seed=3)
    b, _ = packed(seed=3)  # fresh tensors with the same values
    assert a == b
    assert packed(seed=4)[0] != a


def test_alias_stored_once_and_restored_under_both_names():
    tied_state = make_state(tied=True)
    assert find_aliases(tied_state) == {"lm_head.weight": "tok_emb.weight"}
    tied, tied_info = packed(tied=True, codec="zlib")
    untied, _ = packed(tied=False, codec="zlib")
    assert len(tied) + 10_000 < len(untied)  # the 300x64 int8 copy is gone
    rows = {r["name"]: r for r in tied_info.tensors}
    assert rows["lm_head.weight"]["alias_of"] == "tok_emb.weight"
    assert rows["lm_head.weight"]["stored_bytes"] == 0
    assert rows["lm_head.weight"]["scheme"] == "int8_row"
    loaded = read_artifact(tied).state_dict
    assert loaded["lm_head.weight"] is loaded["tok_emb.weight"]
    # Views with a different offset/shape are NOT aliases.
    base = torch.randn(10, 10)
    assert find_aliases({"a": base, "b": base[1:], "c": base.t(), "d": base.view(10, 10)}) == {"d": "a"}


def test_bad_inputs_to_pack():
    q, aliases = encode_state(make_state(), QuantPolicy.uniform(8, float_max_numel=4096))
    with pytest.raises(ArtifactError, match="JSON"):
        pack_quantized({"f": object()}, q, aliases=aliases)
    with pytest.raises(ArtifactError, match="JSON"):
        pack_quantized({"x": float("nan")}, q, aliases=aliases)
    with pytest.raises(ArtifactError, match="zlib"):
        pack_quantized(CONFIG, q, aliases=aliases, codec="gzip")
    with pytest.raises(ArtifactError, match="alias target"):
        pack_quantized(CONFIG, q, aliases={"lm_head.weight": "nope"}, names=[*q, "lm_head.weight"])
    bad = dict(q)
    bad["attn.0.c_q.weight"] = QuantizedTensor("int8_row", (192, 64), q["attn.0.c_q.weight"].data, None, 8)
    with pytest.raises(ArtifactError, match="scale"):  # the writer refuses what the reader would reject
        pack_quantized(CONFIG, bad)


# ------------------------------------------------------------------ corruption cases


def container(payload: bytes, codec: str = "zlib", *, raw_len=None, comp=None, version=FORMAT_VERSION, magic=MAGIC):
    """Hand-built container with a VALID checksum, so checks behind the checksum are reached."""
    comp = compress(payload, codec) if comp is None else comp
    name = codec.encode()
    body = magic + struct.pack("<HB", version, len(name)) + name
    body += struct.pack("<QQ", len(payload) if raw_len is None else raw_len, len(comp)) + comp
    return body + hashlib.sha256(body).digest()


BASE_PAYLOAD = unseal(packed(codec="zlib")[0])[1]


def payload_with(header_fn, blob_fn=lambda b: b) -> bytes:
    """Valid artifact payload with its JSON header and tensor bytes edited."""
    payload = BASE_PAYLOAD
    (hlen,) = struct.unpack_from("<I", payload)
    header = json.loads(payload[4 : 4 + hlen])
    header_fn(header)
    hb = json.dumps(header).encode()
    return struct.pack("<I", len(hb)) + hb + blob_fn(payload[4 + hlen :])


def test_hand_built_container_matches_writer():
    blob, info = packed(codec="zlib")
    _, payload = unseal(blob)
    assert container(payload) == blob
    assert read_artifact(container(payload_with(lambda h: None))).model_config == CONFIG


def _table(h, name="attn.0.c_q.weight"):
    return next(t for t in h["tensors"] if t["name"] == name)


CORRUPTIONS = {
    "bad magic": (lambda b: b"NOTGOLF!" + b[8:], "bad magic"),
    "empty": (lambda b: b"", "truncated"),
    "short": (lambda b: b[:9], "truncated"),
    "truncated payload": (lambda b: b[: len(b) // 2], "truncated"),
    "missing checksum byte": (lambda b: b[:-1], "truncated"),
    "trailing bytes": (lambda b: b + b"\x00", "trailing"),
    "flipped payload byte": (lambda b: b[:60] + bytes([b[60] ^ 1]) + b[61:], "checksum"),
    "flipped checksum byte": (lambda b: b[:-1] + bytes([b[-1] ^ 0x80]), "checksum"),
    "future version": (lambda b: b[:8] + struct.pack("<H", 4) + b[10:], "unsupported artifact format version 4"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_container_is_rejected(case):
    mutate, message = CORRUPTIONS[case]
    with pytest.raises(ArtifactError, match=message):
        read_artifact(mutate(packed()[0]))


def _set_offset(h):
    _table(h)["parts"]["data"]["offset"] = 10**9


def _set_scheme(h):
    _table(h)["scheme"] = "int8_col"


def _set_dtype(h):
    _table(h)["parts"]["data"]["dtype"] = "float64"


def _grow_nbytes(h):
    _table(h)["parts"]["data"]["nbytes"] += 1


def _bad_alias(h):
    _table(h, "lm_head.weight")["alias_of"] = "nope"


def _bad_bits(h):
    _table(h)["bits"] = 4


PAYLOAD_CORRUPTIONS = {
    "offset outside payload": (payload_with(_set_offset), "offset"),
    "nbytes mismatch": (payload_with(_grow_nbytes), "nbytes"),
    "data beyond payload": (payload_with(lambda h: h.update(data_bytes=h["data_bytes"] + 8), lambda b: b), "tensor data"),
    "unreferenced tensor bytes": (payload_with(lambda h: h.update(data_bytes=h["data_bytes"] + 4), lambda b: b + b"\0" * 4), "not referenced"),
    "unknown scheme": (payload_with(_set_scheme), "unknown quantization scheme"),
    "unknown dtype": (payload_with(_set_dtype), "unknown dtype"),
    "bits disagree": (payload_with(_bad_bits), "bits"),
    "bad alias": (payload_with(_bad_alias), "alias_of"),
    "header not json": (struct.pack("<I", 5) + b"{oops", "not valid JSON"),
    "header length past payload": (struct.pack("<I", 999) + b"{}", "runs past"),
    "wrong inner version": (payload_with(lambda h: h.update(format_version=9)), "format_version"),
    "config not an object": (payload_with(lambda h: h.update(model_config=[1])), "model_config"),
}


@pytest.mark.parametrize("case", list(PAYLOAD_CORRUPTIONS))
def test_corrupt_payload_is_rejected(case):
    payload, message = PAYLOAD_CORRUPTIONS[case]
    with pytest.raises(ArtifactError, match=message):
        read_artifact(container(payload))


def test_out_of_range_codes_rejected():
    def bump(blob: bytes) -> bytes:
        return bytes([128]) + blob[1:]  # first int8 code of the first int tensor -> -128

    with pytest.raises(ArtifactError, match="codes outside"):
        read_artifact(container(payload_with(lambda h: None, bump)))


def test_decompression_bomb_rejected():
    payload = unseal(packed()[0])[1]
    # Claimed size above the sane bound: refused before inflating anything.
    with pytest.raises(ArtifactError, match="sane bound"):
        read_artifact(container(payload, raw_len=2**40))
    with pytest.raises(ArtifactError, match="sane bound"):
        read_artifact(packed()[0], max_payload_bytes=100)
    # A stream that inflates past the size its container declares.
    bomb = bytes(5_000_000)
    for codec in CODECS:
        with pytest.raises(ArtifactError, match="beyond the allowed 1000 bytes"):
            read_artifact(container(bomb, codec, raw_len=1000))
    # ...or that inflates to less.
    with pytest.raises(ArtifactError):
        read_artifact(container(payload, raw_len=len(payload) + 1))


def test_unknown_codec_in_container_rejected():
    with pytest.raises(ArtifactError, match="codec 'zzz'"):
        read_artifact(container(b"x", comp=b"x", codec="zzz"))


# ------------------------------------------------------------------ fuzzing

VALID = container(BASE_PAYLOAD)
VALID_PAYLOAD = BASE_PAYLOAD

mutation = st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(mutation, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, len(VALID))),
    tail=st.binary(max_size=4),
)
def test_fuzzed_artifact_bytes_never_raise_anything_but_artifact_error(edits, cut, tail):
    data = bytearray(VALID)
    for pos, val in edits:
        data[pos] = val
    if cut is not None:
        data = data[:cut]
    data += tail
    try:
        read_artifact(bytes(data))
    except ArtifactError:
        pass


payload_mutation = st.tuples(st.integers(0, len(VALID_PAYLOAD) - 1), st.integers(0, 255))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(payload_mutation, min_size=1, max_size=4), cut=st.one_of(st.none(), st.integers(0, len(VALID_PAYLOAD))))
def test_fuzzed_payload_behind_valid_checksum(edits, cut):
    # Re-sealed with a correct checksum so the mutations reach the header and tensor parsing.
    data = bytearray(VALID_PAYLOAD)
    for pos, val in edits:
        data[pos] = val
    if cut is not None:
        data = data[:cut]
    try:
        read_artifact(seal(bytes(data), "zlib")[1])
    except ArtifactError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=8,
)
PATHS = [
    ("tensors",),
    ("data_bytes",),
    ("model_config",),
    ("tensors", 0),
    ("tensors", 1, "name"),
    ("tensors", 1, "shape"),
    ("tensors", 1, "bits"),
    ("tensors", 1, "scheme"),
    ("tensors", 1, "parts"),
    ("tensors", 1, "parts", "data"),
    ("tensors", 1, "parts", "data", "shape"),
    ("tensors", 1, "parts", "data", "offset"),
    ("tensors", 1, "parts", "scale", "nbytes"),
    ("tensors", 5, "alias_of"),
]


@settings(max_examples=200, deadline=None)
@given(path=st.sampled_from(PATHS), value=json_values)
def test_fuzzed_header_fields(path, value):
    def edit(h):
        node = h
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    try:
        read_artifact(container(payload_with(edit)))
    except ArtifactError:
        pass


# ------------------------------------------------------------------ format version 2 and version 1 files

V2_CONFIG = {"model_dim": 16}


def rich_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tok_emb.weight": torch.randn(40, 16, generator=g),
        "attn.0.c_q.weight": torch.randn(16, 16, generator=g) * 0.1,
        "mlps.0.fc.weight": torch.randn(32, 16, generator=g) * 0.1,
        "attn_scale": 1 + 0.1 * torch.randn(2, 16, generator=g),
        "mlps.0.proj.weight": torch.randn(4, 4, generator=g),
    }


POLICY = parse_policy("int5,embed=7,fp16max=64,outliers=3,lowrank=2")


def rich_artifact(codec: str = "zlib") -> tuple[bytes, dict]:
    q, aliases = encode_state(rich_state(), POLICY)
    blob, _ = pack_quantized(V2_CONFIG, q, aliases=aliases, codec=codec, meta={"k": 1})
    return blob, q


def test_v2_roundtrip_with_all_parts_and_layouts():
    blob, q = rich_artifact()
    loaded = read_artifact(blob)
    for name, qt in q.items():
        assert torch.equal(loaded.state_dict[name], dequantize_tensor(qt)), name
    header = json.loads(unseal(blob)[1][4 : 4 + struct.unpack_from("<I", unseal(blob)[1])[0]])
    assert header["format_version"] == FORMAT_VERSION == 2
    parts = {t["name"]: t["parts"] for t in header["tensors"]}
    assert set(parts["mlps.0.fc.weight"]) == {"data", "scale", "outlier_idx", "outlier_val", "lowrank_u", "lowrank_v"}
    assert "layout" not in parts["mlps.0.fc.weight"]["data"]  # int8 codes: as they are
    assert parts["mlps.0.fc.weight"]["scale"]["layout"] == "planes"
    assert parts["attn_scale"]["data"]["layout"] == "planes" and parts["attn_scale"]["data"]["dtype"] == "float32"
    assert "lowrank_u" not in parts["tok_emb.weight"]  # only shared blocks get the correction


def test_planes_layout_is_byte_planes():
    t = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float16)
    q, _ = encode_state({"attn_scale": t}, parse_policy("control=fp16"))
    payload = unseal(pack_quantized({}, q, codec="zlib")[0])[1]
    raw = t.numpy().tobytes()
    assert payload.endswith(raw[0::2] + raw[1::2])  # all low bytes, then all high bytes


# ------------------------------------------------------------------ version 1 files


def payload_of(header: dict, blob: bytes) -> bytes:
    hb = json.dumps(header).encode()
    return struct.pack("<I", len(hb)) + hb + blob


def v1_file(extra_part: dict | None = None, layout: str | None = None, header_version: int = 1) -> bytes:
    """A version-1 artifact as the version-1 writer laid it out: plain little-endian parts."""
    codes = np.array([[1, -2, 3], [0, 5, -7]], dtype=np.int8)
    scale = np.array([0.5, 0.25], dtype="<f2")
    ctrl = np.array([1.0, 2.0], dtype="<f4")
    blob = codes.tobytes() + scale.tobytes() + ctrl.tobytes()
    scale_part = {"dtype": "float16", "shape": [2], "offset": 6, "nbytes": 4}
    if layout:
        scale_part["layout"] = layout
    tensors = [
        {
            "name": "w",
            "alias_of": None,
            "scheme": "int4_row",
            "bits": 4,
            "shape": [2, 3],
            "parts": {"data": {"dtype": "int8", "shape": [2, 3], "offset": 0, "nbytes": 6}, "scale": scale_part},
        },
        {
            "name": "q_gain",
            "alias_of": None,
            "scheme": "float32",
            "bits": None,
            "shape": [2],
            "parts": {"data": {"dtype": "float32", "shape": [2], "offset": 10, "nbytes": 8}},
        },
    ]
    if extra_part:
        tensors[0]["parts"].update(extra_part)
    header = {"format_version": header_version, "model_config": V2_CONFIG, "meta": {}, "tensors": tensors, "data_bytes": len(blob)}
    return container(payload_of(header, blob), version=1)


def test_version_1_files_still_load():
    loaded = read_artifact(v1_file())
    torch.testing.assert_close(loaded.state_dict["w"], torch.tensor([[0.5, -1.0, 1.5], [0.0, 1.25, -1.75]]))
    assert torch.equal(loaded.state_dict["q_gain"], torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layout": "planes"}, "layout 'planes' is not valid"),
        ({"extra_part": {"outlier_idx": {"dtype": "int32", "shape": [0], "offset": 18, "nbytes": 0}}}, "needs parts"),
        ({"header_version": 2}, "payload format_version 2 != container version 1"),
    ],
)
def test_version_1_files_cannot_use_version_2_features(kwargs, message):
    with pytest.raises(ArtifactError, match=message):
        read_artifact(v1_file(**kwargs))


@pytest.mark.parametrize("version", [0, 4, 65535])
def test_wrong_versions_are_rejected_clearly(version):
    with pytest.raises(ArtifactError, match=f"unsupported artifact format version {version}; this reader supports 1, 2, 3"):
        read_artifact(container(b"{}", version=version))


# ------------------------------------------------------------------ v2 payload corruption


def edited(edit) -> bytes:
    blob, _ = rich_artifact()
    payload = unseal(blob)[1]
    (hlen,) = struct.unpack_from("<I", payload)
    header = json.loads(payload[4 : 4 + hlen])
    data = bytearray(payload[4 + hlen :])
    edit(header, data)
    return container(payload_of(header, bytes(data)), version=2)


def _entry(h, name="mlps.0.fc.weight"):
    return next(t for t in h["tensors"] if t["name"] == name)


def _swap_outliers(h, data):
    p = _entry(h)["parts"]["outlier_idx"]
    o, n = p["offset"], p["nbytes"]
    planes = np.frombuffer(bytes(data[o : o + n]), np.uint8).reshape(4, -1).T.copy().view("<i4").ravel()
    planes = planes[::-1].copy()  # descending: not a valid index list
    data[o : o + n] = planes.view(np.uint8).reshape(-1, 4).T.tobytes()


V2_CORRUPTIONS = {
    "unknown layout": (lambda h, d: _entry(h)["parts"]["scale"].update(layout="zigzag"), "layout 'zigzag'"),
    "planes on int8": (lambda h, d: _entry(h)["parts"]["data"].update(layout="planes"), "layout 'planes' is not valid for int8"),
    "half an outlier pair": (lambda h, d: _entry(h)["parts"].pop("outlier_val"), "offset|pairs"),
    "extras on a float tensor": (lambda h, d: _entry(h, "mlps.0.proj.weight")["parts"].update(lowrank_u={}), "needs parts"),
    "unsorted outlier indices": (_swap_outliers, "strictly increasing"),
    "low-rank shape mismatch": (lambda h, d: _entry(h)["parts"]["lowrank_v"].update(shape=[2, 8], nbytes=32), "nbytes|offset|lowrank"),
}


@pytest.mark.parametrize("case", list(V2_CORRUPTIONS))
def test_v2_corruptions_are_rejected(case):
    edit, message = V2_CORRUPTIONS[case]
    with pytest.raises(ArtifactError, match=message):
        read_artifact(edited(edit))


# ------------------------------------------------------------------ fuzzing (thousands of mutants)


def _mutate(rng: np.random.Generator, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        op = int(rng.integers(0, 5))
        pos = int(rng.integers(0, max(1, len(b))))
        if op == 0 and b:
            b[pos % len(b)] = int(rng.integers(0, 256))
        elif op == 1 and b:
            b[pos % len(b)] ^= 1 << int(rng.integers(0, 8))
        elif op == 2:
            del b[pos:]
        elif op == 3:
            b[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 9))).astype(np.uint8))
        else:
            b[pos : pos + 4] = struct.pack("<I", int(rng.choice([0, 1, 2**31 - 1, 2**32 - 1, len(b)])))[: len(b[pos : pos + 4])]
    return bytes(b)


def _read_never_crashes(data: bytes) -> bool:
    try:
        read_artifact(data)
        return True
    except ArtifactError:
        return False


def test_fuzz_thousands_of_mutated_files():
    blob, _ = rich_artifact()
    rng = np.random.default_rng(0)
    accepted = sum(_read_never_crashes(_mutate(rng, blob)) for _ in range(2500))
    assert accepted < 50  # the checksum stops nearly everything; what passes must load cleanly


def test_fuzz_thousands_of_mutated_payloads_behind_valid_checksums():
    # Re-sealed with a valid checksum, the mutations reach the JSON header, the part table, the
    # layouts and the outlier/low-rank validation.
    blob, _ = rich_artifact()
    payload = unseal(blob)[1]
    rng = np.random.default_rng(1)
    outcomes = [_read_never_crashes(seal(_mutate(rng, payload), "zlib")[1]) for _ in range(2500)]
    assert 0 < sum(outcomes) < len(outcomes)  # mutated tensor bytes may still be valid values


@pytest.mark.parametrize("codec", ["zlib", "lzma", "zstd", "brotli"])
def test_multi_megabyte_streams_inflate_whole(codec):
    # Regression: a brotli stream whose input ran out while the decoder still owed output (a
    # 4 MB payload, compressed to more than one input chunk) was cut short and refused as
    # truncated, so a real cpu-vanilla artifact written with brotli could not be loaded.
    from loopgolf.export.artifact import compress, decompress

    rng = np.random.default_rng(0)
    for raw in (
        rng.normal(0, 8, 4_000_000).clip(-127, 127).astype(np.int8).tobytes(),
        rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes() + bytes(4_000_000),
    ):
        assert decompress(compress(raw, codec), codec, len(raw)) == raw

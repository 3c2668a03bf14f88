import hashlib
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopgolf.export.artifact import (
    FORMAT_VERSION,
    MAGIC,
    ArtifactError,
    find_aliases,
    pack_artifact,
    read_artifact,
    seal,
    unseal,
    write_artifact,
)
from loopgolf.export.codec import CODECS, compress
from loopgolf.export.quant import dequantize_state_dict, quantize_state_dict

CONFIG = {"d_model": 64, "n_layers": 2, "vocab": 300, "tied": True, "loops": [1, 2, 2]}


def make_state(seed: int = 0, tied: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(300, 64, generator=g)
    return {
        "tok_emb.weight": emb,
        "blocks.0.attn.qkv.weight": torch.randn(192, 64, generator=g) * 0.05,
        "blocks.0.attn_scale": torch.rand(64, generator=g),
        "blocks.0.resid_mix": torch.rand(2, 64, generator=g),
        "blocks.0.norm_bias": torch.randn(64, generator=g),
        "lm_head.weight": emb if tied else emb.clone(),
    }


# float_max_numel=4096 makes the small test matrices take the int8 path.
SMALL = {"float_max_numel": 4096}


def packed(seed=0, tied=True, **kw):
    kw = {**SMALL, **kw}
    return pack_artifact(CONFIG, make_state(seed, tied), **kw)


def test_roundtrip_gives_exactly_the_dequantized_tensors():
    state = make_state()
    blob, info = pack_artifact(CONFIG, state, meta={"step": 7, "val_bpb": 1.25}, **SMALL)
    loaded = read_artifact(blob)
    expect = dequantize_state_dict(quantize_state_dict(state, **SMALL))
    assert list(loaded.state_dict) == list(state)
    for name, t in expect.items():
        assert loaded.state_dict[name].dtype == torch.float32
        assert torch.equal(loaded.state_dict[name], t), name
    assert loaded.model_config == CONFIG
    assert loaded.meta == {"step": 7, "val_bpb": 1.25}
    assert loaded.codec == info.codec in CODECS
    assert loaded.info.total_bytes == info.total_bytes == len(blob)
    assert loaded.info.tensors == info.tensors
    schemes = {r["name"]: r["scheme"] for r in info.tensors}
    assert schemes["tok_emb.weight"] == "int8_row"
    assert schemes["blocks.0.attn_scale"] == "float32"
    assert schemes["blocks.0.norm_bias"] == "float16"


@pytest.mark.parametrize("codec", CODECS)
def test_each_codec_and_bits(codec):
    blob, info = packed(codec=codec, bits=6)
    loaded = read_artifact(blob)
    assert loaded.codec == info.codec == codec
    assert {r["scheme"] for r in info.tensors} >= {"int6_row"}


def test_auto_codec_picks_the_smallest():
    sizes = {c: packed(codec=c)[1].total_bytes for c in CODECS}
    blob, info = packed()
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


def test_write_and_read_path(tmp_path):
    path = tmp_path / "sub" / "model.lgz"
    info = write_artifact(path, CONFIG, make_state(), meta={"run": "x"}, **SMALL)
    assert info.path == path and path.stat().st_size == info.total_bytes
    loaded = read_artifact(path)
    assert loaded.info.path == path and loaded.meta == {"run": "x"}
    assert [p.name for p in path.parent.iterdir()] == ["model.lgz"]  # no temp files left


def test_over_cap_write_raises_and_writes_nothing(tmp_path):
    path = tmp_path / "model.lgz"
    blob, info = packed()
    cap = info.total_bytes + 1000
    with pytest.raises(ArtifactError, match=r"over the \d+-byte cap by 234 bytes"):
        write_artifact(path, CONFIG, make_state(), cap_bytes=cap, extra_bytes=1234, **SMALL)
    with pytest.raises(ArtifactError, match="by 1 bytes"):
        write_artifact(path, CONFIG, make_state(), cap_bytes=info.total_bytes - 1, **SMALL)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    ok = write_artifact(path, CONFIG, make_state(), cap_bytes=cap, extra_bytes=1000, **SMALL)  # exactly at cap
    assert ok.total_bytes == info.total_bytes and path.read_bytes() == blob


def test_bad_inputs_to_pack():
    with pytest.raises(ArtifactError, match="JSON"):
        pack_artifact({"f": object()}, make_state(), **SMALL)
    with pytest.raises(ArtifactError, match="JSON"):
        pack_artifact({"x": float("nan")}, make_state(), **SMALL)
    with pytest.raises(ValueError, match="zlib"):
        pack_artifact(CONFIG, make_state(), codec="gzip", **SMALL)
    with pytest.raises(ArtifactError, match="quantize"):
        pack_artifact(CONFIG, {"steps": torch.arange(3)})


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


def _table(h, name="blocks.0.attn.qkv.weight"):
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
    "future version": (lambda b: b[:8] + struct.pack("<H", 3) + b[10:], "unsupported artifact format version 3"),
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

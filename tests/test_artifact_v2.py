"""Format version 2: byte-plane layouts, outlier and low-rank parts, reading version 1, and a
loader that rejects every malformed file with ArtifactError (fuzzed with thousands of mutants)."""

import hashlib
import json
import struct

import numpy as np
import pytest
import torch

from loopgolf.export.artifact import (
    FORMAT_VERSION,
    MAGIC,
    ArtifactError,
    pack_quantized,
    read_artifact,
    seal,
    unseal,
)
from loopgolf.export.codec import compress
from loopgolf.export.encode import encode_state
from loopgolf.export.policy import parse_policy
from loopgolf.export.quant import dequantize_tensor

CONFIG = {"model_dim": 16}


def rich_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tok_emb.weight": torch.randn(40, 16, generator=g),
        "attn.0.c_q.weight": torch.randn(16, 16, generator=g) * 0.1,
        "mlps.0.fc.weight": torch.randn(32, 16, generator=g) * 0.1,
        "attn_scale": 1 + 0.1 * torch.randn(2, 16, generator=g),
        "norm_like": torch.randn(16, generator=g),
    }


POLICY = parse_policy("int5,embed=7,fp16max=64,outliers=3,lowrank=2")


def rich_artifact(codec: str = "zlib") -> tuple[bytes, dict]:
    q, aliases = encode_state(rich_state(), POLICY)
    blob, _ = pack_quantized(CONFIG, q, aliases=aliases, codec=codec, meta={"k": 1})
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
    q, _ = encode_state({"x": t}, parse_policy(""))
    payload = unseal(pack_quantized({}, q, codec="zlib")[0])[1]
    raw = t.numpy().tobytes()
    assert payload.endswith(raw[0::2] + raw[1::2])  # all low bytes, then all high bytes


# ------------------------------------------------------------------ version 1 files


def container(payload: bytes, version: int, codec: str = "zlib") -> bytes:
    comp = compress(payload, codec)
    body = MAGIC + struct.pack("<HB", version, len(codec)) + codec.encode() + struct.pack("<QQ", len(payload), len(comp)) + comp
    return body + hashlib.sha256(body).digest()


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
        {"name": "w", "alias_of": None, "scheme": "int4_row", "bits": 4, "shape": [2, 3],
         "parts": {"data": {"dtype": "int8", "shape": [2, 3], "offset": 0, "nbytes": 6}, "scale": scale_part}},
        {"name": "q_gain", "alias_of": None, "scheme": "float32", "bits": None, "shape": [2],
         "parts": {"data": {"dtype": "float32", "shape": [2], "offset": 10, "nbytes": 8}}},
    ]
    if extra_part:
        tensors[0]["parts"].update(extra_part)
    header = {"format_version": header_version, "model_config": CONFIG, "meta": {}, "tensors": tensors, "data_bytes": len(blob)}
    return container(payload_of(header, blob), 1)


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


@pytest.mark.parametrize("version", [0, 3, 65535])
def test_wrong_versions_are_rejected_clearly(version):
    with pytest.raises(ArtifactError, match=f"unsupported artifact format version {version}; this reader supports 1, 2"):
        read_artifact(container(b"{}", version))


# ------------------------------------------------------------------ v2 payload corruption


def edited(edit) -> bytes:
    blob, _ = rich_artifact()
    payload = unseal(blob)[1]
    (hlen,) = struct.unpack_from("<I", payload)
    header = json.loads(payload[4 : 4 + hlen])
    data = bytearray(payload[4 + hlen :])
    edit(header, data)
    return container(payload_of(header, bytes(data)), 2)


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
    "extras on a float tensor": (lambda h, d: _entry(h, "norm_like")["parts"].update(lowrank_u={}), "needs parts"),
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

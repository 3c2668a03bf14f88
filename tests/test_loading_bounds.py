"""Bounded, honest loading: no artifact or file makes `load_model` allocate or wait without
bound, a header must agree with its tensor table before anything is inflated, and nothing
non-finite is written or loaded. Every failure is an ArtifactError."""

import hashlib
import os
import struct
import threading
import tracemalloc
import zlib

import pytest
import torch

from loopgolf.bench.fuzz_artifact import build_artifact, reseal, split, tiny_model  # the fuzzer's own artifact tools
from loopgolf.export.artifact import MAGIC, ArtifactError, read_artifact
from loopgolf.export.pack import export_model, load_model


@pytest.fixture(scope="module")
def artifact() -> bytes:
    return build_artifact()


def resealed(blob: bytes, edit_header=lambda h: None, edit_data=lambda d: d) -> bytes:
    """The artifact with its header and/or tensor bytes edited and its checksum recomputed."""
    codec, header, data = split(blob)
    edit_header(header)
    return reseal(codec, header, edit_data(bytearray(data)))


def traced_peak(fn) -> int:
    """Peak bytes Python allocated while ``fn`` ran."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_valid_artifact_loads(artifact):
    model, loaded = load_model(artifact)
    assert loaded.model_config["model_dim"] == 32


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model_dim", 2**22, "model_dim must be in"),
        ("mlp_mult", 10**6, "mlp_mult must be in"),
        ("max_seq_len", 2**40, "max_seq_len must be in"),
        ("plan", {"kind": "cycle", "layers": 1, "loops": 10**9}, "virtual layers"),
        ("plan", {"kind": "vanilla", "layers": 10**9}, "virtual layers"),
        ("plan", "x", "cannot parse plan"),
        ("rope_base", float("nan"), "rope_base must be finite"),
        ("logit_softcap", float("nan"), "logit_softcap must be finite"),
        ("logit_softcap", -1.0, "logit_softcap must be in"),
        ("vocab_size", "64", "vocab_size must be int"),
        ("tie_embeddings", 1, "tie_embeddings must be bool"),
        ("lora_ranks", [4], "lora_ranks must be dict"),
        ("mlp_mult", 3, "do not match its model_config"),
        ("model_dim", 64, "do not match its model_config"),
        ("bogus", 1, "unknown model config field"),
    ],
)
def test_bad_model_config_is_refused_before_allocating(artifact, field, value, message):
    blob = resealed(artifact, lambda h: h["model_config"].__setitem__(field, value))
    with pytest.raises(ArtifactError, match=message):
        load_model(blob)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t[0]["parts"]["data"].__setitem__("dtype", 7), "unknown dtype"),
        (lambda t: t[0]["parts"]["data"].__setitem__("dtype", ["float32"]), "unknown dtype"),
        (lambda t: t[0].__setitem__("shape", "x"), "shape must be"),
        (lambda t: t[0].__setitem__("name", 3), "string 'name'"),
        (lambda t: t.pop(), "bytes of tensor data are not referenced|do not match"),
        (lambda t: t[0].__setitem__("name", "not.a.param"), "do not match its model_config"),
    ],
)
def test_bad_tensor_table_gives_only_artifact_errors(artifact, edit, message):
    blob = resealed(artifact, lambda h: edit(h["tensors"]))
    with pytest.raises(ArtifactError, match=message):
        load_model(blob)


def _float_tensor(header: dict) -> tuple[int, int]:
    """(offset, nbytes) of the first float32 tensor in the table."""
    for t in header["tensors"]:
        if t.get("scheme") == "float32":
            return t["parts"]["data"]["offset"], t["parts"]["data"]["nbytes"]
    raise AssertionError("no float32 tensor")


def test_non_finite_tensor_is_refused_at_load(artifact):
    _, header, _ = split(artifact)
    offset, _ = _float_tensor(header)

    def poison(d: bytearray) -> bytearray:
        # planes layout: byte plane 3 holds the sign/exponent byte, plane 2 the exponent's low bit
        n = _float_tensor(header)[1] // 4
        d[offset + 3 * n] = 0x7F
        d[offset + 2 * n] = 0xC0
        return d

    with pytest.raises(ArtifactError, match="non-finite"):
        load_model(resealed(artifact, edit_data=poison))


def test_non_finite_logits_are_refused_at_load(artifact):
    _, header, _ = split(artifact)
    name = next(t["name"] for t in header["tensors"] if t.get("scheme") == "float32" and "scale" in t["name"])
    model, _ = load_model(artifact)
    with torch.no_grad():
        dict(model.named_parameters())[name].fill_(3e38)
    with pytest.raises(ArtifactError, match="non-finite logits"):
        load_model(build_artifact(model))


def test_non_finite_weights_are_refused_at_export(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.tok_emb.weight[3, 5] = float("nan")
    path = tmp_path / "m.lgz"
    with pytest.raises(ArtifactError, match=r"NaN or inf.*tok_emb.weight.*nothing was written"):
        export_model(model, path, codec="zlib")
    assert not path.exists() and not list(tmp_path.iterdir())


def test_bomb_with_a_bad_header_is_refused_after_inflating_little():
    raw_len = 1 << 28  # 256 MiB of zeros: header length 0, then nothing that parses
    comp = zlib.compressobj(1)
    stream = b"".join(comp.compress(bytes(1 << 24)) for _ in range(16)) + comp.flush()
    name = b"zlib"
    body = MAGIC + struct.pack("<HB", 2, len(name)) + name + struct.pack("<QQ", raw_len, len(stream)) + stream
    blob = body + hashlib.sha256(body).digest()

    def refused():
        with pytest.raises(ArtifactError, match="header"):
            read_artifact(blob)

    peak = traced_peak(refused)
    assert peak < len(blob) + (16 << 20), f"peak {peak:,} bytes while refusing a bomb"


def _in_thread(fn, timeout: float = 20.0):
    box: dict = {}

    def target():
        try:
            fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the loader hung"
    return box.get("error")


def test_files_that_are_not_artifacts_are_refused_quickly(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, message in ((tmp_path, "directory"), (fifo, "not a regular file"), ("/dev/zero", "not a regular file"), (tmp_path / "nope", "no such")):
        error = _in_thread(lambda: read_artifact(path))
        assert isinstance(error, ArtifactError) and message in str(error), (path, error)


def test_huge_sparse_files_are_refused_from_their_header(tmp_path):
    bad_magic = tmp_path / "sparse.bin"
    with open(bad_magic, "wb") as f:
        f.truncate(2 << 30)
    with pytest.raises(ArtifactError, match="bad magic"):
        read_artifact(bad_magic)
    # A valid-looking header whose declared sizes match a 2 GiB file: refused before reading it.
    name = b"zlib"
    head = MAGIC + struct.pack("<HB", 2, len(name)) + name
    fixed = len(head) + 16
    comp_len = (2 << 30) - fixed - 32
    good_magic = tmp_path / "sparse.lgz"
    with open(good_magic, "wb") as f:
        f.write(head + struct.pack("<QQ", 1 << 30, comp_len))
        f.truncate(2 << 30)

    def refused():
        with pytest.raises(ArtifactError, match="sane bound"):
            read_artifact(good_magic)

    assert traced_peak(refused) < 1 << 20

"""Versioned, pickle-free model artifact: quantized tensors + JSON header in one compressed payload.

Container (all integers little-endian):

    magic     8 bytes   b"LOOPGOLF"
    version   u16       FORMAT_VERSION (2; version 1 files are still read)
    codec_len u8        then codec_len ASCII bytes naming the codec ("zlib", "lzma", "zstd", "brotli")
    raw_len   u64       uncompressed payload length (the decompression bound)
    comp_len  u64       compressed payload length
    payload   comp_len bytes
    sha256    32 bytes  over everything before it

Payload (uncompressed):

    header_len u32, header (compact UTF-8 JSON, sorted keys), then the tensor blob: raw
    little-endian tensor parts laid out back to back in tensor-table order.

Version 2 adds, per tensor part, ``"layout": "planes"`` (multi-byte values stored byte plane by
byte plane: all first bytes, then all second bytes, ...; measured 4-16% smaller after every codec
for fp16/fp32 values and scales, docs/LOG.md), int32 parts, and the optional outlier and low-rank
parts of ``quant.QuantizedTensor``. One-byte codes are stored as they are (transposing them was
measured not to pay).

Loading parses JSON and copies bytes into numpy arrays; nothing is unpickled or evaluated. Every
field is validated, and any malformed input raises ArtifactError.

This module reads; the writer (``pack_artifact``, ``write_artifact``, ``seal``, ...) lives in
``export.writer`` to keep it out of the scoring path's ``code_bytes``, and its names resolve here
on first use.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopgolf.export import codec as codecs
from loopgolf.export.quant import FLOAT_SCHEMES, PART_NAMES, QuantError, QuantizedTensor, dequantize_tensor, scheme_bits

_WRITER_NAMES = (
    "build_payload", "container_overhead", "find_aliases", "pack_artifact", "pack_quantized", "seal",
    "stored_part_bytes", "tensor_shares", "write_artifact", "write_blob", "write_quantized",
)


def __getattr__(name: str) -> Any:
    # PEP 562: the writer's names, imported on first use (reading never needs them).
    if name in _WRITER_NAMES:
        from loopgolf.export import writer

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ArtifactError(ValueError):
    """An artifact cannot be written (over cap, bad input) or read (corrupt, foreign, unsupported)."""


MAGIC = b"LOOPGOLF"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# A sane ceiling on the uncompressed payload: the capped artifacts hold ~20-40 MB of codes, so a
# claim above 1 GiB is corruption or a decompression bomb, not a model. Readers may raise it.
MAX_PAYLOAD_BYTES = 1 << 30
MAX_CODEC_NAME = 32
MAX_NDIM = 16
MAX_DIM = 1 << 32

_PREFIX = struct.Struct("<8sHB")  # magic, version, codec name length
_LENGTHS = struct.Struct("<QQ")  # raw_len, comp_len
_HEADER_LEN = struct.Struct("<I")
_DIGEST_BYTES = hashlib.sha256().digest_size

# Dtypes a tensor part may be stored in; numpy dtype strings pin the byte order to little-endian.
_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "<f4"),
    "float16": (torch.float16, "<f2"),
    "int8": (torch.int8, "i1"),
    "int32": (torch.int32, "<i4"),
}
_TORCH_TO_NAME = {tdt: name for name, (tdt, _) in _DTYPES.items()}


@dataclass
class ArtifactInfo:
    path: Path | None
    total_bytes: int  # whole artifact file
    codec: str
    payload_bytes: int  # uncompressed payload (header + tensor blob)
    tensors: list[dict] = field(default_factory=list)  # name, scheme, shape, numel, stored_bytes, alias_of
    # name -> share of the compressed payload (see tensor_shares); known for artifacts just written
    compressed_bytes: dict[str, int] | None = None

    def to_summary(self) -> dict:
        """Byte accounting for summary.json: codec, file and payload bytes, per-tensor stored and
        compressed bytes, and compressed bytes per parameter of the intN-coded matrices."""
        comp = self.compressed_bytes or {}
        rows = [r for r in self.tensors if r["alias_of"] is None]
        coded = [r for r in rows if r["scheme"] not in FLOAT_SCHEMES]
        n_coded = sum(r["numel"] for r in coded)
        out = {
            "codec": self.codec,
            "model_bytes": self.total_bytes,
            "payload_bytes": self.payload_bytes,
            "stored_params": sum(r["numel"] for r in rows),
            "matrix_params": n_coded,
            "bytes_per_param": self.total_bytes / max(1, sum(r["numel"] for r in rows)),
            "bytes_per_matrix_param": (sum(comp[r["name"]] for r in coded) / n_coded) if comp and n_coded else None,
            "tensors": [
                {**{k: r[k] for k in ("name", "scheme", "shape", "stored_bytes", "alias_of")}, "compressed_bytes": comp.get(r["name"])}
                for r in self.tensors
            ],
        }
        return out


@dataclass
class LoadedArtifact:
    model_config: dict
    state_dict: dict[str, torch.Tensor]  # dequantized float32; aliases are the same tensor object
    meta: dict
    codec: str
    info: ArtifactInfo


# ----------------------------------------------------------------------------------------------
# Reading


def _info_row(name: str, q: QuantizedTensor, *, stored_bytes: int, alias_of: str | None) -> dict:
    return {
        "name": name,
        "scheme": q.scheme,
        "shape": list(q.shape),
        "numel": math.prod(q.shape),
        "stored_bytes": stored_bytes,
        "alias_of": alias_of,
    }


def unseal(data: bytes, *, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> tuple[str, bytes]:
    """Check the container and return (codec, uncompressed payload)."""
    n = len(data)
    if data[: len(MAGIC)] != MAGIC[: min(n, len(MAGIC))]:
        raise ArtifactError(f"not a loopgolf artifact: bad magic {bytes(data[:len(MAGIC)])!r} (expected {MAGIC!r})")
    if n < _PREFIX.size:
        raise ArtifactError(f"artifact is truncated: {n} bytes, shorter than the fixed header")
    _, version, name_len = _PREFIX.unpack_from(data, 0)
    if version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"unsupported artifact format version {version}; this reader supports {', '.join(map(str, READABLE_VERSIONS))}"
        )
    fixed = _PREFIX.size + name_len + _LENGTHS.size
    if n < fixed:
        raise ArtifactError(f"artifact is truncated: {n} bytes, shorter than its {fixed}-byte header")
    if not 0 < name_len <= MAX_CODEC_NAME:
        raise ArtifactError(f"bad codec name length {name_len}")
    raw_len, comp_len = _LENGTHS.unpack_from(data, _PREFIX.size + name_len)
    expected = fixed + comp_len + _DIGEST_BYTES
    if n < expected:
        raise ArtifactError(f"artifact is truncated: {n} bytes, header says {expected}")
    if n > expected:
        raise ArtifactError(f"artifact has {n - expected} unexpected trailing bytes (expected {expected} bytes)")
    body = data[: n - _DIGEST_BYTES]
    if hashlib.sha256(body).digest() != bytes(data[n - _DIGEST_BYTES :]):
        raise ArtifactError("artifact checksum mismatch: the file is corrupted")
    # Checked only after the checksum so a corrupted byte reads as corruption, not as nonsense.
    try:
        codec = bytes(data[_PREFIX.size : _PREFIX.size + name_len]).decode("ascii")
    except UnicodeDecodeError:
        raise ArtifactError("codec name is not ASCII") from None
    if codec not in codecs.CODECS:
        raise ArtifactError(f"artifact uses codec {codec!r}, not available here (available: {', '.join(codecs.CODECS)})")
    if raw_len > max_payload_bytes:
        raise ArtifactError(
            f"artifact claims a {raw_len}-byte payload, above the sane bound of {max_payload_bytes} bytes "
            "(corrupt or a decompression bomb)"
        )
    try:
        payload = codecs.decompress(bytes(data[fixed : fixed + comp_len]), codec, raw_len)
    except codecs.CodecError as e:
        raise ArtifactError(f"cannot decompress payload: {e}") from None
    if len(payload) != raw_len:
        raise ArtifactError(f"payload decompressed to {len(payload)} bytes, header says {raw_len}")
    return codec, payload


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shape(x: Any, where: str) -> tuple[int, ...]:
    # Bounds keep numpy/torch from failing on absurd (but zero-element) shapes with their own errors.
    if (
        not isinstance(x, list)
        or len(x) > MAX_NDIM
        or not all(_is_int(s) and 0 <= s <= MAX_DIM for s in x)
    ):
        raise ArtifactError(
            f"{where}: shape must be a list of at most {MAX_NDIM} ints in [0, {MAX_DIM}], got {x!r:.200}"
        )
    return tuple(x)


def _read_part(entry: Any, where: str, blob: memoryview, cursor: int, version: int) -> tuple[torch.Tensor, int]:
    if not isinstance(entry, dict):
        raise ArtifactError(f"{where}: part entry must be an object")
    dtype_name, offset, nbytes = entry.get("dtype"), entry.get("offset"), entry.get("nbytes")
    if dtype_name not in _DTYPES or (version == 1 and dtype_name == "int32"):
        raise ArtifactError(f"{where}: unknown dtype {dtype_name!r}; known: {', '.join(_DTYPES)}")
    shape = _shape(entry.get("shape"), where)
    if not (_is_int(offset) and _is_int(nbytes)):
        raise ArtifactError(f"{where}: offset and nbytes must be ints")
    np_dtype = np.dtype(_DTYPES[dtype_name][1])
    numel = math.prod(shape)
    if nbytes != numel * np_dtype.itemsize:
        raise ArtifactError(f"{where}: nbytes {nbytes} does not match shape {list(shape)} of {dtype_name}")
    # The writer lays parts out back to back; anything else (gaps, overlaps, out of range) is corrupt.
    if offset != cursor:
        raise ArtifactError(f"{where}: offset {offset} is not where the previous tensor ended ({cursor})")
    if offset + nbytes > len(blob):
        raise ArtifactError(
            f"{where}: bytes [{offset}, {offset + nbytes}) lie outside the {len(blob)}-byte tensor data"
        )
    layout = entry.get("layout", "plain")
    if layout == "planes" and version >= 2 and np_dtype.itemsize > 1:
        planes = np.frombuffer(blob, dtype=np.uint8, count=nbytes, offset=offset).reshape(np_dtype.itemsize, numel)
        arr = np.ascontiguousarray(planes.T).view(np_dtype).reshape(shape)
    elif layout == "plain":
        arr = np.frombuffer(blob, dtype=np_dtype, count=numel, offset=offset).reshape(shape).copy()
    else:
        raise ArtifactError(f"{where}: layout {layout!r} is not valid for {dtype_name} in format version {version}")
    return torch.from_numpy(arr), offset + nbytes


def _parse_header(payload: bytes) -> tuple[dict, memoryview]:
    if len(payload) < _HEADER_LEN.size:
        raise ArtifactError("payload too short to hold a header")
    (hlen,) = _HEADER_LEN.unpack_from(payload, 0)
    end = _HEADER_LEN.size + hlen
    if end > len(payload):
        raise ArtifactError(f"header length {hlen} runs past the {len(payload)}-byte payload")
    try:
        header = json.loads(payload[_HEADER_LEN.size : end].decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ArtifactError(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ArtifactError("header must be a JSON object")
    return header, memoryview(payload)[end:]


def _load_tensors(header: dict, blob: memoryview, version: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    table = header.get("tensors")
    data_bytes = header.get("data_bytes")
    if not isinstance(table, list):
        raise ArtifactError("header 'tensors' must be a list")
    if not _is_int(data_bytes) or data_bytes != len(blob):
        raise ArtifactError(f"header says {data_bytes!r} bytes of tensor data, payload holds {len(blob)}")
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantizedTensor] = {}
    rows: list[dict] = []
    cursor = 0
    for i, entry in enumerate(table):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ArtifactError(f"tensor table entry {i} must be an object with a string 'name'")
        name = entry["name"]
        where = f"tensor {name!r}"
        if name in state:
            raise ArtifactError(f"{where} appears twice in the tensor table")
        alias_of = entry.get("alias_of")
        if alias_of is not None:
            if not isinstance(alias_of, str) or alias_of not in quantized:
                raise ArtifactError(f"{where}: alias_of {alias_of!r} is not an earlier stored tensor")
            state[name] = state[alias_of]  # the same object, as tied weights were
            rows.append(_info_row(name, quantized[alias_of], stored_bytes=0, alias_of=alias_of))
            continue
        scheme = entry.get("scheme")
        if not isinstance(scheme, str):
            raise ArtifactError(f"{where}: scheme must be a string")
        try:
            bits = scheme_bits(scheme)
        except QuantError as e:
            raise ArtifactError(f"{where}: {e}") from None
        if entry.get("bits") != bits or (bits is not None and not _is_int(entry.get("bits"))):
            raise ArtifactError(f"{where}: bits {entry.get('bits')!r} does not match scheme {scheme!r}")
        shape = _shape(entry.get("shape"), where)
        parts = entry.get("parts")
        want_parts = {"data"} if scheme in FLOAT_SCHEMES else {"data", "scale"}
        # intN tensors of version 2 may add the outlier and low-rank parts (pairs are checked below).
        optional = set(PART_NAMES[2:]) if version >= 2 and scheme not in FLOAT_SCHEMES else set()
        if not isinstance(parts, dict) or not want_parts <= set(parts) <= want_parts | optional:
            raise ArtifactError(f"{where}: scheme {scheme} needs parts {sorted(want_parts)} (optional: {sorted(optional)})")
        arrays: dict[str, torch.Tensor] = {}
        for part in PART_NAMES:  # storage order
            if part in parts:
                arrays[part], cursor = _read_part(parts[part], f"{where} {part}", blob, cursor, version)
        q = QuantizedTensor(scheme, shape, *(arrays.get(p) for p in PART_NAMES[:2]), bits, *(arrays.get(p) for p in PART_NAMES[2:]))
        try:
            state[name] = dequantize_tensor(q, name)
        except QuantError as e:
            raise ArtifactError(f"{where}: {e}") from None
        quantized[name] = q
        rows.append(_info_row(name, q, stored_bytes=q.stored_bytes, alias_of=None))
    if cursor != len(blob):
        raise ArtifactError(f"{len(blob) - cursor} bytes of tensor data are not referenced by any tensor")
    return state, rows


def read_artifact(
    path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview,
    *,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
) -> LoadedArtifact:
    """Load an artifact from a path or its bytes; raises ArtifactError on anything malformed."""
    path: Path | None = None
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
    else:
        path = Path(path_or_bytes)
        data = path.read_bytes()
    codec, payload = unseal(data, max_payload_bytes=max_payload_bytes)
    version = _PREFIX.unpack_from(data, 0)[1]
    header, blob = _parse_header(payload)
    if header.get("format_version") != version:
        raise ArtifactError(f"payload format_version {header.get('format_version')!r} != container version {version}")
    model_config, meta = header.get("model_config"), header.get("meta")
    if not isinstance(model_config, dict) or not isinstance(meta, dict):
        raise ArtifactError("header 'model_config' and 'meta' must be JSON objects")
    state, rows = _load_tensors(header, blob, version)
    info = ArtifactInfo(path, len(data), codec, len(payload), rows)
    return LoadedArtifact(model_config, state, meta, codec, info)

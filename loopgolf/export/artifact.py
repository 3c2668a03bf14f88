"""Versioned, pickle-free model artifact: quantized tensors + JSON header in one compressed payload.

Container (all integers little-endian):

    magic     8 bytes   b"LOOPGOLF"
    version   u16       FORMAT_VERSION
    codec_len u8        then codec_len ASCII bytes naming the codec ("zlib", "lzma", "zstd", ...)
    raw_len   u64       uncompressed payload length (the decompression bound)
    comp_len  u64       compressed payload length
    payload   comp_len bytes
    sha256    32 bytes  over everything before it

Payload (uncompressed):

    header_len u32, header (compact UTF-8 JSON, sorted keys), then the tensor blob: raw
    little-endian tensor bytes laid out back to back in tensor-table order.

Loading parses JSON and copies bytes into numpy arrays; nothing is unpickled or evaluated. Every
field is validated, and any malformed input raises ArtifactError.
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
from loopgolf.export.quant import (
    DEFAULT_CLIP_PERCENTILE,
    DEFAULT_FLOAT_MAX_NUMEL,
    FLOAT_SCHEMES,
    QuantError,
    QuantizedTensor,
    dequantize_tensor,
    quantize_tensor,
    scheme_bits,
    validate_quantized,
)
from loopgolf.util import atomic_write_bytes


class ArtifactError(ValueError):
    """An artifact cannot be written (over cap, bad input) or read (corrupt, foreign, unsupported)."""


MAGIC = b"LOOPGOLF"
FORMAT_VERSION = 1
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
}
_TORCH_TO_NAME = {tdt: name for name, (tdt, _) in _DTYPES.items()}


@dataclass
class ArtifactInfo:
    path: Path | None
    total_bytes: int  # whole artifact file
    codec: str
    payload_bytes: int  # uncompressed payload (header + tensor blob)
    tensors: list[dict] = field(default_factory=list)  # name, scheme, shape, numel, stored_bytes, alias_of


@dataclass
class LoadedArtifact:
    model_config: dict
    state_dict: dict[str, torch.Tensor]  # dequantized float32; aliases are the same tensor object
    meta: dict
    codec: str
    info: ArtifactInfo


# ----------------------------------------------------------------------------------------------
# Writing


def _canonical_json(obj: Any, what: str) -> bytes:
    # sort_keys + fixed separators: identical inputs give identical bytes. allow_nan=False because
    # NaN/Infinity are not JSON and other readers would choke on them.
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{what} is not JSON-serialisable: {e}") from None


def _alias_key(t: torch.Tensor) -> tuple | None:
    """Identity of the memory a tensor views; equal keys mean the tensors are the same values."""
    if t.numel() == 0:
        return None  # empty tensors may all report the same (null) pointer
    return (
        t.device.type,
        t.device.index,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
    )


def find_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{name: first name} for every tensor that views exactly the same memory as an earlier one."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = _alias_key(t)
        if key is None:
            continue
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _part_entry(t: torch.Tensor, offset: int) -> tuple[dict, bytes]:
    dtype_name = _TORCH_TO_NAME.get(t.dtype)
    if dtype_name is None:
        raise ArtifactError(f"cannot store dtype {t.dtype}; storable dtypes: {', '.join(_DTYPES)}")
    raw = np.ascontiguousarray(t.detach().cpu().numpy()).astype(_DTYPES[dtype_name][1], copy=False).tobytes()
    entry = {"dtype": dtype_name, "shape": list(t.shape), "offset": offset, "nbytes": len(raw)}
    return entry, raw


def _build_payload(
    model_config: dict,
    names: list[str],
    qstate: dict[str, QuantizedTensor],
    aliases: dict[str, str],
    meta: dict,
) -> tuple[bytes, list[dict]]:
    if not isinstance(model_config, dict):
        raise ArtifactError(f"model_config must be a dict, got {type(model_config).__name__}")
    if not isinstance(meta, dict):
        raise ArtifactError(f"meta must be a dict, got {type(meta).__name__}")
    position = {n: i for i, n in enumerate(names)}
    table: list[dict] = []
    info_rows: list[dict] = []
    blobs: list[bytes] = []
    offset = 0
    for name in names:
        if not isinstance(name, str):
            raise ArtifactError(f"tensor names must be strings, got {name!r}")
        if name in aliases:
            target = aliases[name]
            if target in aliases or target not in qstate or position.get(target, len(names)) > position[name]:
                raise ArtifactError(f"{name}: alias target {target!r} must be an earlier, stored tensor")
            tq = qstate[target]
            table.append({"name": name, "alias_of": target})
            info_rows.append(_info_row(name, tq, stored_bytes=0, alias_of=target))
            continue
        q = qstate[name]
        try:  # refuse to write what the reader would reject
            validate_quantized(q, name)
        except QuantError as e:
            raise ArtifactError(f"cannot pack: {e}") from None
        parts: dict[str, dict] = {}
        for part_name, t in (("data", q.data), ("scale", q.scale)):
            if t is None:
                continue
            entry, raw = _part_entry(t, offset)
            parts[part_name] = entry
            blobs.append(raw)
            offset += len(raw)
        table.append(
            {"name": name, "alias_of": None, "scheme": q.scheme, "bits": q.bits, "shape": list(q.shape), "parts": parts}
        )
        info_rows.append(_info_row(name, q, stored_bytes=q.stored_bytes, alias_of=None))
    header = {
        "format_version": FORMAT_VERSION,
        "model_config": model_config,
        "meta": meta,
        "tensors": table,
        "data_bytes": offset,
    }
    header_bytes = _canonical_json(header, "artifact header (model_config/meta)")
    payload = _HEADER_LEN.pack(len(header_bytes)) + header_bytes + b"".join(blobs)
    return payload, info_rows


def _info_row(name: str, q: QuantizedTensor, *, stored_bytes: int, alias_of: str | None) -> dict:
    return {
        "name": name,
        "scheme": q.scheme,
        "shape": list(q.shape),
        "numel": math.prod(q.shape),
        "stored_bytes": stored_bytes,
        "alias_of": alias_of,
    }


def seal(payload: bytes, codec: str) -> tuple[str, bytes]:
    """Compress `payload` with `codec` ("auto" = smallest available) and wrap it in the container.

    Returns (codec actually used, artifact bytes)."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ArtifactError(
            f"payload is {len(payload)} bytes, above the {MAX_PAYLOAD_BYTES}-byte limit readers accept"
        )
    try:
        if codec == "auto":
            codec, comp = codecs.best_codec(payload)
        else:
            comp = codecs.compress(payload, codec)
    except codecs.CodecError as e:
        raise ArtifactError(str(e)) from None
    name = codec.encode("ascii")
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(name)) + name + _LENGTHS.pack(len(payload), len(comp))
    body = head + comp
    return codec, body + hashlib.sha256(body).digest()


def pack_quantized(
    model_config: dict,
    qstate: dict[str, QuantizedTensor],
    *,
    aliases: dict[str, str] | None = None,
    names: list[str] | None = None,
    codec: str = "auto",
    meta: dict | None = None,
) -> tuple[bytes, ArtifactInfo]:
    """Artifact bytes for tensors that are already quantized (any scheme quant.py knows).

    `aliases` maps extra names to the stored name they repeat; `names` gives the table order
    (default: qstate's order followed by the aliases).
    """
    aliases = dict(aliases or {})
    if names is None:
        names = list(qstate) + [n for n in aliases if n not in qstate]
    missing = [n for n in names if n not in qstate and n not in aliases]
    if missing or len(set(names)) != len(names):
        raise ArtifactError(f"table names must be unique and all known; unknown: {missing}")
    payload, rows = _build_payload(model_config, names, qstate, aliases, {} if meta is None else meta)
    used, blob = seal(payload, codec)
    return blob, ArtifactInfo(None, len(blob), used, len(payload), rows)


def pack_artifact(
    model_config: dict,
    state: dict[str, torch.Tensor],
    *,
    codec: str = "auto",
    bits: int = 8,
    meta: dict | None = None,
    float_max_numel: int = DEFAULT_FLOAT_MAX_NUMEL,
    clip_percentile: float = DEFAULT_CLIP_PERCENTILE,
) -> tuple[bytes, ArtifactInfo]:
    """Quantize `state` with the baseline scheme and pack it; tied tensors are stored once."""
    if codec != "auto" and codec not in codecs.CODECS:
        raise ArtifactError(f"unknown codec {codec!r}; valid: auto, {', '.join(codecs.CODECS)}")
    aliases = find_aliases(state)
    qstate: dict[str, QuantizedTensor] = {}
    try:
        for name, t in state.items():
            if name not in aliases:
                qstate[name] = quantize_tensor(
                    name, t, bits=bits, float_max_numel=float_max_numel, clip_percentile=clip_percentile
                )
    except QuantError as e:
        raise ArtifactError(f"cannot quantize: {e}") from None
    return pack_quantized(model_config, qstate, aliases=aliases, names=list(state), codec=codec, meta=meta)


def write_artifact(
    path: str | os.PathLike,
    model_config: dict,
    state: dict[str, torch.Tensor],
    *,
    codec: str = "auto",
    bits: int = 8,
    meta: dict | None = None,
    cap_bytes: int | None = None,
    extra_bytes: int = 0,
    float_max_numel: int = DEFAULT_FLOAT_MAX_NUMEL,
    clip_percentile: float = DEFAULT_CLIP_PERCENTILE,
) -> ArtifactInfo:
    """Pack and atomically write an artifact. With `cap_bytes`, refuse (writing nothing) when the
    artifact plus `extra_bytes` (e.g. the code's bytes, which count against the same cap) is over."""
    blob, info = pack_artifact(
        model_config,
        state,
        codec=codec,
        bits=bits,
        meta=meta,
        float_max_numel=float_max_numel,
        clip_percentile=clip_percentile,
    )
    if cap_bytes is not None:
        total = info.total_bytes + extra_bytes
        if total > cap_bytes:
            raise ArtifactError(
                f"artifact is {info.total_bytes} bytes + {extra_bytes} extra = {total} bytes, "
                f"over the {cap_bytes}-byte cap by {total - cap_bytes} bytes; nothing was written"
            )
    atomic_write_bytes(path, blob)
    info.path = Path(path)
    return info


# ----------------------------------------------------------------------------------------------
# Reading


def unseal(data: bytes, *, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> tuple[str, bytes]:
    """Check the container and return (codec, uncompressed payload)."""
    n = len(data)
    if data[: len(MAGIC)] != MAGIC[: min(n, len(MAGIC))]:
        raise ArtifactError(f"not a loopgolf artifact: bad magic {bytes(data[:len(MAGIC)])!r} (expected {MAGIC!r})")
    if n < _PREFIX.size:
        raise ArtifactError(f"artifact is truncated: {n} bytes, shorter than the fixed header")
    _, version, name_len = _PREFIX.unpack_from(data, 0)
    if version != FORMAT_VERSION:
        raise ArtifactError(f"unsupported artifact format version {version}; this reader supports {FORMAT_VERSION}")
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


def _read_part(entry: Any, where: str, blob: memoryview, cursor: int) -> tuple[torch.Tensor, int]:
    if not isinstance(entry, dict):
        raise ArtifactError(f"{where}: part entry must be an object")
    dtype_name, offset, nbytes = entry.get("dtype"), entry.get("offset"), entry.get("nbytes")
    if dtype_name not in _DTYPES:
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
    arr = np.frombuffer(blob, dtype=np_dtype, count=numel, offset=offset).reshape(shape).copy()
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


def _load_tensors(header: dict, blob: memoryview) -> tuple[dict[str, torch.Tensor], list[dict]]:
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
        if not isinstance(parts, dict) or set(parts) != want_parts:
            raise ArtifactError(f"{where}: scheme {scheme} needs parts {sorted(want_parts)}")
        data, cursor = _read_part(parts["data"], f"{where} data", blob, cursor)
        scale = None
        if "scale" in parts:
            scale, cursor = _read_part(parts["scale"], f"{where} scale", blob, cursor)
        q = QuantizedTensor(scheme, shape, data, scale, bits)
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
    header, blob = _parse_header(payload)
    if header.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"payload format_version {header.get('format_version')!r} != {FORMAT_VERSION}")
    model_config, meta = header.get("model_config"), header.get("meta")
    if not isinstance(model_config, dict) or not isinstance(meta, dict):
        raise ArtifactError("header 'model_config' and 'meta' must be JSON objects")
    state, rows = _load_tensors(header, blob)
    info = ArtifactInfo(path, len(data), codec, len(payload), rows)
    return LoadedArtifact(model_config, state, meta, codec, info)

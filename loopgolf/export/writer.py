"""Writing artifacts: quantized tensors -> payload -> compressed, checksummed container.

The container and payload formats are defined in :mod:`loopgolf.export.artifact`, which reads them.
Writing lives here so that the scoring path (which only reads) does not carry this code in its
``code_bytes``; ``artifact.write_artifact`` and the other writer names still resolve, lazily.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loopgolf.export import codec as codecs
from loopgolf.export.artifact import (
    _DIGEST_BYTES,
    _DTYPES,
    _HEADER_LEN,
    _LENGTHS,
    _PREFIX,
    _TORCH_TO_NAME,
    FORMAT_VERSION,
    MAGIC,
    MAX_PAYLOAD_BYTES,
    ArtifactError,
    ArtifactInfo,
    _info_row,
)
from loopgolf.export.quant import (
    DEFAULT_CLIP_PERCENTILE,
    DEFAULT_FLOAT_MAX_NUMEL,
    QuantError,
    QuantizedTensor,
    quantize_tensor,
    validate_quantized,
)
from loopgolf.util import atomic_write_bytes


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


def _part_entry(t: torch.Tensor, offset: int, with_bytes: bool = True) -> tuple[dict, bytes]:
    """(table entry, stored bytes) of one part; without ``with_bytes`` only the entry (so a
    header can be laid out from shapes and dtypes alone, e.g. for meta tensors)."""
    dtype_name = _TORCH_TO_NAME.get(t.dtype)
    if dtype_name is None:
        raise ArtifactError(f"cannot store dtype {t.dtype}; storable dtypes: {', '.join(_DTYPES)}")
    np_dtype = np.dtype(_DTYPES[dtype_name][1])
    entry = {"dtype": dtype_name, "shape": list(t.shape), "offset": offset, "nbytes": t.numel() * np_dtype.itemsize}
    if np_dtype.itemsize > 1:
        # Byte planes: the high bytes of floats (sign, exponent) are few distinct values and
        # compress well once they are not interleaved with the near-random low bytes.
        entry["layout"] = "planes"
    if not with_bytes:
        return entry, b""
    arr = np.ascontiguousarray(t.detach().cpu().numpy()).astype(np_dtype, copy=False)
    if np_dtype.itemsize > 1:
        return entry, arr.reshape(-1).view(np.uint8).reshape(-1, np_dtype.itemsize).T.tobytes()
    return entry, arr.tobytes()


def stored_part_bytes(t: torch.Tensor) -> bytes:
    """The bytes one tensor part occupies in a payload (with its layout), before compression."""
    return _part_entry(t, 0)[1]


def build_payload(
    model_config: dict,
    names: list[str],
    qstate: dict[str, QuantizedTensor],
    aliases: dict[str, str],
    meta: dict,
    *,
    header_only: bool = False,
) -> tuple[bytes, list[dict], list[tuple[int, int]]]:
    """(payload, info rows, each row's byte span in the payload; aliases get empty spans).

    With ``header_only`` the tensors are neither validated nor read (meta tensors will do) and
    the returned payload stops after the header: the byte planner sizes headers this way."""
    if not isinstance(model_config, dict):
        raise ArtifactError(f"model_config must be a dict, got {type(model_config).__name__}")
    if not isinstance(meta, dict):
        raise ArtifactError(f"meta must be a dict, got {type(meta).__name__}")
    position = {n: i for i, n in enumerate(names)}
    table: list[dict] = []
    info_rows: list[dict] = []
    blobs: list[bytes] = []
    spans: list[tuple[int, int]] = []  # in blob coordinates until the header length is known
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
            spans.append((offset, offset))
            continue
        q = qstate[name]
        try:  # refuse to write what the reader would reject
            if not header_only:
                validate_quantized(q, name)
        except QuantError as e:
            raise ArtifactError(f"cannot pack: {e}") from None
        parts: dict[str, dict] = {}
        start = offset
        for part_name, t in q.parts().items():
            entry, raw = _part_entry(t, offset, with_bytes=not header_only)
            parts[part_name] = entry
            blobs.append(raw)
            offset += entry["nbytes"]
        table.append(
            {"name": name, "alias_of": None, "scheme": q.scheme, "bits": q.bits, "shape": list(q.shape), "parts": parts}
        )
        info_rows.append(_info_row(name, q, stored_bytes=q.stored_bytes, alias_of=None))
        spans.append((start, offset))
    header = {
        "format_version": FORMAT_VERSION,
        "model_config": model_config,
        "meta": meta,
        "tensors": table,
        "data_bytes": offset,
    }
    header_bytes = _canonical_json(header, "artifact header (model_config/meta)")
    base = _HEADER_LEN.size + len(header_bytes)
    payload = _HEADER_LEN.pack(len(header_bytes)) + header_bytes + b"".join(blobs)
    return payload, info_rows, [(base + a, base + b) for a, b in spans]


def tensor_shares(payload: bytes, spans: list[tuple[int, int]], codec: str, compressed_len: int) -> list[int]:
    """Each span's share of the compressed payload: its bytes compressed alone with ``codec``,
    scaled so that the shares of all spans plus the header's sum to ``compressed_len``.

    One stream holds all tensors, so no tensor has bytes of its own; compressing each alone is an
    honest measure of what it costs, and the scaling removes the (small) difference between the
    sum of the parts and the whole."""
    head_end = min([a for a, b in spans if b > a], default=len(payload))

    def alone(chunk: bytes) -> int:
        return min(len(chunk), len(codecs.compress(chunk, codec))) if chunk else 0

    sizes = [alone(payload[a:b]) for a, b in spans]
    total = sum(sizes) + alone(payload[:head_end])
    if total == 0:
        return [0] * len(spans)
    return [round(n * compressed_len / total) for n in sizes]


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
    payload, rows, spans = build_payload(model_config, names, qstate, aliases, {} if meta is None else meta)
    used, blob = seal(payload, codec)
    comp_len = len(blob) - container_overhead(used)
    shares = {row["name"]: n for row, n in zip(rows, tensor_shares(payload, spans, used, comp_len))}
    return blob, ArtifactInfo(None, len(blob), used, len(payload), rows, shares)


def container_overhead(codec: str) -> int:
    """Bytes of a container around its compressed payload (fixed header, codec name, checksum)."""
    return _PREFIX.size + len(codec.encode("ascii")) + _LENGTHS.size + _DIGEST_BYTES


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
    return write_blob(path, blob, info, cap_bytes=cap_bytes, extra_bytes=extra_bytes)


def write_quantized(
    path: str | os.PathLike,
    model_config: dict,
    qstate: dict[str, QuantizedTensor],
    *,
    aliases: dict[str, str] | None = None,
    names: list[str] | None = None,
    codec: str = "auto",
    meta: dict | None = None,
    cap_bytes: int | None = None,
    extra_bytes: int = 0,
) -> ArtifactInfo:
    """:func:`pack_quantized` then :func:`write_blob` (same cap rule as :func:`write_artifact`)."""
    if codec != "auto" and codec not in codecs.CODECS:
        raise ArtifactError(f"unknown codec {codec!r}; valid: auto, {', '.join(codecs.CODECS)}")
    blob, info = pack_quantized(model_config, qstate, aliases=aliases, names=names, codec=codec, meta=meta)
    return write_blob(path, blob, info, cap_bytes=cap_bytes, extra_bytes=extra_bytes)


def write_blob(
    path: str | os.PathLike, blob: bytes, info: ArtifactInfo, *, cap_bytes: int | None = None, extra_bytes: int = 0
) -> ArtifactInfo:
    """Atomically write packed artifact bytes, or nothing at all when over the cap."""
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

"""The artifact format: a versioned, pickle-free file of stored tensors and a JSON header in one
compressed payload; how it is written, sealed, checked and read, and the codecs that compress it.

Container (all integers little-endian):

    magic     8 bytes   b"LOOPGOLF"
    version   u16       2, or 3 when the artifact needs it (versions 1 to 3 are read)
    codec_len u8        then codec_len ASCII bytes naming the codec ("zlib", "lzma", "zstd", "brotli")
    raw_len   u64       uncompressed payload length (the decompression bound)
    comp_len  u64       compressed payload length
    payload   comp_len bytes
    sha256    32 bytes  over everything before it

Payload (uncompressed):

    header_len u32, header (compact UTF-8 JSON, sorted keys), then the tensor blob: raw
    little-endian tensor parts laid out back to back in tensor-table order.

Stored tensors (:class:`QuantizedTensor`): ``float32`` / ``float16`` values, or ``intN_row``
(N in 2..8): int8 codes in [-(2**(N-1)-1), 2**(N-1)-1], one per byte, with one fp16 scale per row,
dequantized as exactly ``codes * scale``. Bit-packing was measured on a trained model and loses
after brotli/lzma/zstd: one code per byte is 7-12% smaller at 5-7 bits (the entropy coders model
whole bytes); only at 4 bits would packing save 0.8% with brotli (docs/LOG.md, 2026-11-23). An
intN tensor may carry two optional corrections: outliers (sorted flat int32 indices and fp16
values that replace the coded entries) and a low-rank term ``u @ v`` (fp16 factors) added to
``codes * scale``. How codes are chosen lives in :mod:`loopgolf.export.quantize`; this module only
defines, checks and stores the result. A tensor table entry may instead be an alias (``alias_of``)
of an earlier one: tied weights are stored once.

Version 2 adds, per tensor part, ``"layout": "planes"`` (multi-byte values stored byte plane by
byte plane: all first bytes, then all second bytes, ...; measured 4-16% smaller after every codec
for fp16/fp32 values and scales, docs/LOG.md), int32 parts, and the outlier and low-rank parts.
One-byte codes are stored as they are (transposing them was measured not to pay).

Version 3 (written only when an artifact needs it; everything else is still version 2, byte for
byte as before) adds quantized low-rank factors (LQER): int8 codes in ``lowrank_u``/``lowrank_v``
with fp16 group scales in ``lowrank_us``/``lowrank_vs`` and a ``"lowrank": {"u_bits", "v_bits",
"group"}`` table entry (:func:`lowrank_factors`); and the "grouped" layout: parts in any order
that covers the tensor data exactly once, and 2-D int8 parts stored column by column
(``"layout": "columns"``). Storing the codes of like matrices together and column by column was
measured 0.5-3% smaller with brotli and lzma on a trained model (docs/export.md).

Codecs run at their strongest deterministic setting (the artifact is written once and its size is
the score's budget). Decompression takes the exact output bound so a hostile or corrupted stream
cannot inflate without limit, and it rejects truncated streams and bytes after the end of stream.

Loading parses JSON and copies bytes into numpy arrays; nothing is unpickled or evaluated. Every
field is validated, and any malformed input raises :class:`ArtifactError`.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import os
import re
import stat
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard


class ArtifactError(ValueError):
    """An artifact, or a stored tensor in one, that cannot be written (over cap, bad input) or
    read (corrupt, foreign, unsupported)."""


class CodecError(ArtifactError):
    """Unknown codec, or a stream that does not decode cleanly within its bound."""


# ----------------------------------------------------------------------------------------------
# Codecs


ZLIB_LEVEL = 9
ZSTD_LEVEL = 22
BROTLI_QUALITY = 11
BROTLI_LGWIN = 24
# Raw LZMA2 (no .xz container: 60-odd bytes smaller, and the artifact carries its own checksum).
# The decoder needs the same filter chain, so it is fixed here rather than stored in the stream.
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def _brotli_module():
    """The brotli module if importable AND new enough to bound its output (>= 1.1), else None."""
    try:
        import brotli  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        brotli.Decompressor().process(b"", output_buffer_limit=1)
    except TypeError:  # older brotli: no way to cap output, so no decompression-bomb guard
        return None
    except Exception:
        return None
    return brotli


_brotli = _brotli_module()

CODECS: tuple[str, ...] = ("zlib", "lzma", "zstd") + (("brotli",) if _brotli is not None else ())


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        hint = " (install the 'brotli' package, >= 1.1, to enable it)" if codec == "brotli" else ""
        raise CodecError(f"unknown codec {codec!r}{hint}; valid codecs: {', '.join(CODECS)}")


def compress(data: bytes, codec: str) -> bytes:
    _check_codec(codec)
    data = bytes(data)
    if codec == "zlib":
        return zlib.compress(data, ZLIB_LEVEL)
    if codec == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    if codec == "zstd":
        # Single-threaded (threads=0) for byte-identical output; the frame records its content size
        # so the reader can check the declared size against its bound before inflating anything.
        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0, write_content_size=True, write_checksum=False)
        return cctx.compress(data)
    assert _brotli is not None
    return _brotli.compress(data, quality=BROTLI_QUALITY, lgwin=BROTLI_LGWIN)


def _too_big(codec: str, max_output: int) -> CodecError:
    return CodecError(f"{codec} stream inflates beyond the allowed {max_output} bytes (possible decompression bomb)")


class Inflater:
    """Incremental decoder of one complete ``codec`` stream that never yields more than
    ``max_output`` bytes and never holds much more than what was asked for: the reader takes the
    payload's header first and checks it before it lets the tensor data inflate, so a crafted
    stream with a bad header costs a few KB, not the gigabyte it declares.

    :meth:`read` / :meth:`readinto` hand out output; :meth:`finish` then checks that the stream
    ends exactly there (no more output, an end-of-stream marker, no bytes after it)."""

    IN_CHUNK = 1 << 16  # compressed bytes fed per step
    ZSTD_IN_CHUNK = 1 << 10  # zstd has no output limit per call: 1 KiB of input inflates to 32 MiB at most
    OUT_CHUNK = 1 << 20  # output per step for the codecs that take a limit

    def __init__(self, data: bytes | memoryview, codec: str, max_output: int) -> None:
        _check_codec(codec)
        if isinstance(max_output, bool) or not isinstance(max_output, int) or max_output < 0:
            raise CodecError(f"max_output must be a non-negative int, got {max_output!r}")
        self.codec, self.max_output = codec, max_output
        self._data = memoryview(data)
        self._pos = 0  # compressed bytes consumed
        self._pending = bytearray()  # decoded, not yet handed out
        self._produced = 0  # decoded so far, handed out or pending
        self._done = False  # the decoder has nothing more to give
        self._unused = 0  # compressed bytes after the end of the stream
        if codec == "zlib":
            self._d = zlib.decompressobj()
        elif codec == "lzma":
            self._d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
        elif codec == "zstd":
            # libzstd refuses to produce more than a frame's declared content size: demand one
            # and check it against the bound before inflating anything.
            size = self._guard(lambda: zstandard.get_frame_parameters(bytes(self._data[:18])).content_size)
            if size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
                raise CodecError("zstd frame does not declare its content size")
            if size > max_output:
                raise _too_big("zstd", max_output)
            self._d = zstandard.ZstdDecompressor().decompressobj()
        else:
            assert _brotli is not None
            self._d = _brotli.Decompressor()

    def _guard(self, fn):
        try:
            return fn()
        except CodecError:
            raise
        except (zlib.error, lzma.LZMAError, zstandard.ZstdError, EOFError, ValueError) as e:
            raise CodecError(f"{self.codec} stream is corrupt: {e}") from None
        except Exception as e:  # brotli.error is a plain Exception subclass
            if _brotli is not None and isinstance(e, _brotli.error):
                raise CodecError(f"{self.codec} stream is corrupt: {e}") from None
            raise

    def _after_end(self, unused_data: bytes = b"") -> int:
        """Compressed bytes after the end of the stream: what the decoder did not use of the
        last chunk plus what was never fed."""
        return len(unused_data) + len(self._data) - self._pos

    def _next_input(self, size: int) -> bytes:
        chunk = bytes(self._data[self._pos : self._pos + size])
        self._pos += len(chunk)
        return chunk

    def _step(self) -> bytes:
        """Decode a little more; sets ``_done`` when the decoder can give nothing more."""
        d, n = self._d, self.OUT_CHUNK
        if self.codec == "zlib":
            out = d.decompress(d.unconsumed_tail or self._next_input(self.IN_CHUNK), n)
            if d.eof:
                self._unused = self._after_end(d.unused_data)
                self._done = not d.unconsumed_tail
            elif not out and not d.unconsumed_tail and self._pos >= len(self._data):
                self._done = True
            return out
        if self.codec == "lzma":
            if d.eof:
                self._unused = self._after_end(d.unused_data)
                self._done = True
                return b""
            out = d.decompress(self._next_input(self.IN_CHUNK) if d.needs_input else b"", max_length=n)
            if not d.eof and not out and d.needs_input and self._pos >= len(self._data):
                self._done = True
            if d.eof:
                self._unused = self._after_end(d.unused_data)
            return out
        if self.codec == "zstd":
            if d.eof or self._pos >= len(self._data):
                if d.eof:
                    self._unused = self._after_end(d.unused_data)
                self._done = True
                return b""
            out = d.decompress(self._next_input(self.ZSTD_IN_CHUNK))
            if d.eof:
                self._unused = self._after_end(d.unused_data)
            return out
        if d.is_finished():
            self._unused = self._after_end()
            self._done = True
            return b""
        if d.can_accept_more_data() and self._pos < len(self._data):
            return d.process(self._next_input(self.IN_CHUNK), output_buffer_limit=n)
        # Out of input, or output held back by the limit: brotli may still owe output for input
        # it has already taken (can_accept_more_data() does not say it has none), so ask for it
        # and stop only when it gives nothing.
        out = d.process(b"", output_buffer_limit=n)
        if not out:
            self._done = True
            if d.is_finished():
                self._unused = self._after_end()
        return out

    def _fill(self, n: int) -> None:
        while len(self._pending) < n and not self._done:
            out = self._guard(self._step)
            self._produced += len(out)
            if self._produced > self.max_output:
                raise _too_big(self.codec, self.max_output)
            self._pending += out

    def readinto(self, buf: memoryview) -> int:
        """Fill ``buf`` with the next output; returns how many bytes (fewer only at the end)."""
        filled = 0
        while filled < len(buf):
            self._fill(min(len(buf) - filled, self.OUT_CHUNK))
            if not self._pending:
                break
            k = min(len(buf) - filled, len(self._pending))
            buf[filled : filled + k] = self._pending[:k]
            del self._pending[:k]
            filled += k
        return filled

    def read(self, n: int) -> bytes:
        """Up to ``n`` more bytes of output (fewer only at the end of the stream)."""
        parts, left = [], n
        while left > 0:
            self._fill(min(left, self.OUT_CHUNK))
            if not self._pending:
                break
            k = min(left, len(self._pending))
            parts.append(bytes(self._pending[:k]))
            del self._pending[:k]
            left -= k
        return b"".join(parts)

    def finish(self) -> None:
        """Check that the output has all been read and the stream ends cleanly right there."""
        self._fill(1)
        if self._pending:
            raise _too_big(self.codec, self._produced - len(self._pending))
        eof = self._d.is_finished() if self.codec == "brotli" else self._d.eof
        if not eof:
            raise CodecError(f"{self.codec} stream is truncated (no end-of-stream marker)")
        if self._unused:
            raise CodecError(f"{self.codec} stream is followed by {self._unused} unexpected bytes")


def decompress(data: bytes, codec: str, max_output: int) -> bytes:
    """Decode a complete stream of `codec`, refusing to produce more than `max_output` bytes."""
    inflater = Inflater(data, codec, max_output)
    out = inflater.read(max_output)
    inflater.finish()
    return out


def best_codec(data: bytes, codecs: tuple[str, ...] | list[str] = CODECS) -> tuple[str, bytes]:
    """(codec, compressed) with the smallest output; ties go to the codec listed first."""
    if not codecs:
        raise CodecError("best_codec needs at least one codec")
    best: tuple[str, bytes] | None = None
    for codec in codecs:
        out = compress(data, codec)
        if best is None or len(out) < len(best[1]):
            best = (codec, out)
    assert best is not None
    return best


# ----------------------------------------------------------------------------------------------
# Stored tensors

FLOAT_SCHEMES: tuple[str, ...] = ("float32", "float16")
MIN_BITS = 2  # 1 bit would leave only the code 0 under a symmetric scheme
MAX_BITS = 8  # codes are stored in int8
PART_NAMES: tuple[str, ...] = ("data", "scale", "outlier_idx", "outlier_val", "lowrank_u", "lowrank_v", "lowrank_us", "lowrank_vs")
_INT_ROW_RE = re.compile(r"^int([0-9]+)_row$")
FLOAT16_FACTOR = 16  # a low-rank factor's "bits" of 16: that factor is stored as float16 values


@dataclass
class QuantizedTensor:
    scheme: str  # "float32" | "float16" | "intN_row" (e.g. "int8_row")
    shape: tuple[int, ...]
    data: torch.Tensor  # float32/float16 values, or int8 codes (rows, cols) for intN_row
    scale: torch.Tensor | None  # float16 per-row scale for intN_row, else None
    bits: int | None  # N for intN_row, else None
    outlier_idx: torch.Tensor | None = None  # int32 sorted flat indices kept exactly (intN_row only)
    outlier_val: torch.Tensor | None = None  # float16 values at outlier_idx
    lowrank_u: torch.Tensor | None = None  # float16 (rows, r): low-rank error correction u @ v; int8 codes when quantized
    lowrank_v: torch.Tensor | None = None  # float16 (r, cols); int8 codes when quantized
    # Quantized low-rank factors (format version 3, see :func:`dequantize_factor`): the fp16 group
    # scales of a quantized u (r, ceil(rows/group)) and v (r, ceil(cols/group)), the factors' bits
    # (u, v; 16 = that factor is float16) and the group size. None for float16 factors.
    lowrank_us: torch.Tensor | None = None
    lowrank_vs: torch.Tensor | None = None
    lowrank_bits: tuple[int, int] | None = None
    lowrank_group: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def parts(self) -> dict[str, torch.Tensor]:
        """The stored arrays by part name, in storage order ("data" first)."""
        return {k: t for k, t in zip(PART_NAMES, (self.data, self.scale, *self.extras())) if t is not None}

    def extras(self) -> tuple[torch.Tensor | None, ...]:
        return (self.outlier_idx, self.outlier_val, self.lowrank_u, self.lowrank_v, self.lowrank_us, self.lowrank_vs)

    @property
    def format_version(self) -> int:
        """The oldest artifact format version that can hold this tensor."""
        return LQER_FORMAT_VERSION if self.lowrank_bits is not None else FORMAT_VERSION

    @property
    def stored_bytes(self) -> int:
        """Uncompressed bytes this tensor occupies in an artifact (codes/values, scales, corrections)."""
        return sum(t.numel() * t.element_size() for t in self.parts().values())


def int_row_scheme(bits: int) -> str:
    return f"int{bits}_row"


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ArtifactError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def scheme_bits(scheme: str) -> int | None:
    """Bit width encoded in an `intN_row` scheme name, None for float schemes; ArtifactError otherwise."""
    if scheme in FLOAT_SCHEMES:
        return None
    m = _INT_ROW_RE.match(scheme)
    if m is None:
        raise ArtifactError(f"unknown quantization scheme {scheme!r}; expected one of {FLOAT_SCHEMES} or 'intN_row'")
    bits = int(m.group(1))
    _check_bits(bits)
    return bits


def qmax_for_bits(bits: int) -> int:
    """The largest code of a symmetric ``bits``-bit scheme (127 for 8 bits)."""
    _check_bits(bits)
    return 2 ** (bits - 1) - 1


def validate_quantized(q: QuantizedTensor, name: str = "tensor") -> None:
    """Check that a QuantizedTensor is self-consistent (dtypes, shapes, code range)."""
    bits = scheme_bits(q.scheme)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in q.shape):
        raise ArtifactError(f"{name}: shape must be non-negative ints, got {q.shape!r}")
    if bits is None:
        want = torch.float32 if q.scheme == "float32" else torch.float16
        if q.data.dtype != want or tuple(q.data.shape) != tuple(q.shape):
            raise ArtifactError(f"{name}: scheme {q.scheme} needs {want} data of shape {q.shape}, got {q.data.dtype} {tuple(q.data.shape)}")
        if q.scale is not None or q.bits is not None or any(t is not None for t in q.extras()) or q.lowrank_bits is not None or q.lowrank_group is not None:
            raise ArtifactError(f"{name}: float scheme {q.scheme} must have no scale, bits, outliers or low-rank term")
        if not bool(torch.isfinite(q.data).all()):
            raise ArtifactError(f"{name}: non-finite values (NaN or inf)")
        return
    if q.bits != bits:
        raise ArtifactError(f"{name}: scheme {q.scheme} disagrees with bits={q.bits}")
    if len(q.shape) != 2:
        raise ArtifactError(f"{name}: {q.scheme} needs a 2-D shape, got {q.shape}")
    if q.data.dtype != torch.int8 or tuple(q.data.shape) != tuple(q.shape):
        raise ArtifactError(f"{name}: {q.scheme} needs int8 codes of shape {q.shape}, got {q.data.dtype} {tuple(q.data.shape)}")
    if q.scale is None or q.scale.dtype != torch.float16 or tuple(q.scale.shape) != (q.shape[0],):
        got = None if q.scale is None else f"{q.scale.dtype} {tuple(q.scale.shape)}"
        raise ArtifactError(f"{name}: {q.scheme} needs a float16 scale of shape ({q.shape[0]},), got {got}")
    qmax = qmax_for_bits(bits)
    # min/max rather than abs().max(): abs(-128) wraps around in int8.
    if q.data.numel() and (int(q.data.min()) < -qmax or int(q.data.max()) > qmax):
        raise ArtifactError(f"{name}: codes outside [-{qmax}, {qmax}] for {bits} bits")
    if not bool(torch.isfinite(q.scale).all()):
        raise ArtifactError(f"{name}: non-finite scale")
    _validate_extras(q, name)


def _check_part(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ArtifactError(f"{what} must be {dtype} of shape {shape}, got {t.dtype} {tuple(t.shape)}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ArtifactError(f"{what} has non-finite values")


def _validate_extras(q: QuantizedTensor, name: str) -> None:
    idx, val, u, v, us, vs = q.extras()
    if (idx is None) != (val is None) or (u is None) != (v is None):
        raise ArtifactError(f"{name}: outlier indices/values and low-rank u/v come in pairs")
    if idx is not None:
        k = int(idx.shape[0]) if idx.dim() == 1 else -1
        _check_part(idx, torch.int32, (k,), f"{name}: outlier_idx")
        _check_part(val, torch.float16, (k,), f"{name}: outlier_val")
        # Strictly increasing and in range: every outlier is a distinct entry of this tensor.
        if k and (int(idx[0]) < 0 or int(idx[-1]) >= q.numel or (k > 1 and not bool((idx[1:] > idx[:-1]).all()))):
            raise ArtifactError(f"{name}: outlier indices must be strictly increasing in [0, {q.numel})")
    if u is None:
        if us is not None or vs is not None or q.lowrank_bits is not None or q.lowrank_group is not None:
            raise ArtifactError(f"{name}: low-rank scales, bits or group without low-rank factors")
        return
    r = int(u.shape[1]) if u.dim() == 2 else -1
    if r < 1:
        raise ArtifactError(f"{name}: lowrank_u must be 2-D with rank >= 1, got shape {tuple(u.shape)}")
    if q.lowrank_bits is None:  # float16 factors (format version 2)
        if us is not None or vs is not None or q.lowrank_group is not None:
            raise ArtifactError(f"{name}: low-rank scales or group without low-rank bits")
        _check_part(u, torch.float16, (q.shape[0], r), f"{name}: lowrank_u")
        _check_part(v, torch.float16, (r, q.shape[1]), f"{name}: lowrank_v")
        return
    bits, group = q.lowrank_bits, q.lowrank_group
    if not isinstance(bits, tuple) or len(bits) != 2 or not all(_is_factor_bits(b) for b in bits) or bits == (FLOAT16_FACTOR, FLOAT16_FACTOR):
        raise ArtifactError(
            f"{name}: lowrank_bits must be two bit widths in [{MIN_BITS}, {MAX_BITS}] or {FLOAT16_FACTOR} (float16), not both float16; got {bits!r:.60}"
        )
    if not _is_int(group) or not 1 <= group <= MAX_DIM:
        raise ArtifactError(f"{name}: lowrank_group must be an int in [1, {MAX_DIM}], got {group!r:.60}")
    # u is checked as its transpose: both factors are then (r, n) with groups along n.
    for what, codes, scales, b, n in (("lowrank_u", u.T, us, bits[0], q.shape[0]), ("lowrank_v", v, vs, bits[1], q.shape[1])):
        if b == FLOAT16_FACTOR:
            _check_part(codes, torch.float16, (r, n), f"{name}: {what} (transposed)" if what == "lowrank_u" else f"{name}: {what}")
            if scales is not None:
                raise ArtifactError(f"{name}: a float16 {what} has no scales")
            continue
        _check_part(codes, torch.int8, (r, n), f"{name}: {what} codes" + (" (transposed)" if what == "lowrank_u" else ""))
        if scales is None:
            raise ArtifactError(f"{name}: a {b}-bit {what} needs its group scales")
        _check_part(scales, torch.float16, (r, -(-n // group)), f"{name}: {what} scales")
        lo, hi = factor_code_range(b)
        if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
            raise ArtifactError(f"{name}: {what} codes outside [{lo}, {hi}] for {b} bits")


def _is_factor_bits(b: Any) -> bool:
    return _is_int(b) and (MIN_BITS <= b <= MAX_BITS or b == FLOAT16_FACTOR)


def factor_code_range(bits: int) -> tuple[int, int]:
    """(lowest, highest) code of a quantized low-rank factor: the full two's-complement range
    (e.g. [-8, 7] at 4 bits), as in the Parameter Golf record's LQER (openai/parameter-golf PR
    #1797); the encoder puts a group's largest |x| at 7.5 steps, so no code is wasted."""
    _check_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def dequantize_factor(codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """float32 ``codes * scale`` of a quantized factor stored as (r, n) codes with fp16 scales
    (r, ceil(n / group)): each of the r rows (one rank component) is cut into groups of
    ``group`` consecutive entries, the last one possibly shorter, each with its own scale."""
    n = codes.shape[1]
    which = torch.div(torch.arange(n), group, rounding_mode="floor")  # n indices, never n * group
    return codes.to(torch.float32) * scales.to(torch.float32)[:, which]


def lowrank_factors(q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The float32 factors (u, v) of a (validated) tensor's low-rank correction, or None.

    A quantized u is stored as (rows, r) codes but grouped as its transpose: its groups run down
    each column (one rank component), like v's run along each row, so every group holds entries
    of one rank component only."""
    if q.lowrank_u is None:
        return None
    if q.lowrank_bits is None:
        return q.lowrank_u.to(torch.float32), q.lowrank_v.to(torch.float32)
    ub, vb = q.lowrank_bits
    u = q.lowrank_u.to(torch.float32) if ub == FLOAT16_FACTOR else dequantize_factor(q.lowrank_u.T, q.lowrank_us, q.lowrank_group).T
    v = q.lowrank_v.to(torch.float32) if vb == FLOAT16_FACTOR else dequantize_factor(q.lowrank_v, q.lowrank_vs, q.lowrank_group)
    return u, v


def dequantize_tensor(q: QuantizedTensor, name: str = "tensor") -> torch.Tensor:
    """float32 tensor of q.shape; for intN_row exactly codes * stored fp16 scale (in float32), plus
    the low-rank term, with outlier entries replaced by their stored values."""
    validate_quantized(q, name)
    if q.scale is None:
        return q.data.to(torch.float32).reshape(q.shape).clone()
    w = q.data.to(torch.float32) * q.scale.to(torch.float32)[:, None]
    factors = lowrank_factors(q)
    if factors is not None:
        w += factors[0] @ factors[1]
    if q.outlier_idx is not None:
        w.view(-1)[q.outlier_idx.long()] = q.outlier_val.to(torch.float32)
    return w.reshape(q.shape)


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
    """{name: first name} for every tensor that views exactly the same memory as an earlier one
    (tied weights): the artifact stores those as ``alias_of`` entries."""
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


# ----------------------------------------------------------------------------------------------
# Container and payload layout

MAGIC = b"LOOPGOLF"
# A writer uses the oldest version that holds what it stores, so an artifact without quantized
# low-rank factors is byte for byte what the previous writer made (and older readers still read
# it); only artifacts that need version 3 are written as version 3.
FORMAT_VERSION = 2  # what every artifact without version-3 features is written as
LQER_FORMAT_VERSION = 3  # quantized low-rank factors (the "lowrank" table entry, lowrank_us/vs parts)
GROUPED_FORMAT_VERSION = 3  # parts in any order that tiles the data, and the "columns" layout
READABLE_VERSIONS = (1, 2, 3)
# How a writer orders the tensor data (see build_payload): "plain" in table order, part after
# part; "grouped" (format version 3) the codes of like matrices together, column by column.
LAYOUTS: tuple[str, ...] = ("plain", "grouped")
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
    # name -> share of the compressed payload (see pack.tensor_shares); known for artifacts just written
    compressed_bytes: dict[str, int] | None = None

    def to_summary(self) -> dict:
        """Byte accounting for summary.json: codec, file and payload bytes, per-tensor stored and
        compressed bytes, and compressed bytes per parameter of the intN-coded matrices."""
        comp = self.compressed_bytes or {}
        rows = [r for r in self.tensors if r["alias_of"] is None]
        coded = [r for r in rows if r["scheme"] not in FLOAT_SCHEMES]
        n_coded = sum(r["numel"] for r in coded)
        return {
            "codec": self.codec,
            "model_bytes": self.total_bytes,
            "payload_bytes": self.payload_bytes,
            "stored_params": sum(r["numel"] for r in rows),
            "matrix_params": n_coded,
            "bytes_per_param": self.total_bytes / max(1, sum(r["numel"] for r in rows)),
            "bytes_per_matrix_param": (sum(comp[r["name"]] for r in coded) / n_coded) if comp and n_coded else None,
            "tensors": [
                {**{k: r[k] for k in ("name", "scheme", "shape", "stored_bytes", "alias_of")}, "compressed_bytes": comp.get(r["name"])} for r in self.tensors
            ],
        }


@dataclass
class LoadedArtifact:
    model_config: dict
    state_dict: dict[str, torch.Tensor]  # dequantized float32; aliases are the same tensor object
    meta: dict
    codec: str
    info: ArtifactInfo


def _info_row(name: str, q: QuantizedTensor, *, stored_bytes: int, alias_of: str | None) -> dict:
    return {
        "name": name,
        "scheme": q.scheme,
        "shape": list(q.shape),
        "numel": math.prod(q.shape),
        "stored_bytes": stored_bytes,
        "alias_of": alias_of,
    }


def container_overhead(codec: str) -> int:
    """Bytes of a container around its compressed payload (fixed header, codec name, checksum)."""
    return _PREFIX.size + len(codec.encode("ascii")) + _LENGTHS.size + _DIGEST_BYTES


# ----------------------------------------------------------------------------------------------
# Writing


def _canonical_json(obj: Any, what: str) -> bytes:
    # sort_keys + fixed separators: identical inputs give identical bytes. allow_nan=False because
    # NaN/Infinity are not JSON and other readers would choke on them.
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{what} is not JSON-serialisable: {e}") from None


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


def payload_version(qstate: dict[str, QuantizedTensor], layout: str = "plain") -> int:
    """The format version an artifact of these tensors, laid out as ``layout``, is written in
    (the oldest that holds them)."""
    tensors = max((q.format_version for q in qstate.values()), default=FORMAT_VERSION)
    return max(tensors, GROUPED_FORMAT_VERSION if layout != "plain" else FORMAT_VERSION)


def _group_key(name: str) -> str:
    """Matrices of one kind share a name up to their layer indices ("attn.0.c_q.weight" and
    "attn.3.c_q.weight"): their codes have alike distributions and are stored together."""
    return re.sub(r"\.\d+(?=\.|$)", "", name)


Segments = list[tuple[int, int]]


def build_payload(
    model_config: dict,
    names: list[str],
    qstate: dict[str, QuantizedTensor],
    aliases: dict[str, str],
    meta: dict,
    *,
    header_only: bool = False,
    layout: str = "plain",
) -> tuple[bytes, list[dict], list[Segments]]:
    """(payload, info rows, each row's byte segments in the payload; aliases get none).

    ``layout="plain"`` stores each tensor's parts back to back in table order (what every
    version-2 artifact is). ``"grouped"`` (format version 3) stores first the int codes of all
    coded matrices, those of one kind (:func:`_group_key`) together and each column by column
    (the "columns" layout: the codes of neighbouring rows at one input position are often
    alike, and they become neighbours in the stream), then the row scales, then the other parts
    of coded tensors, then float tensors; each group in table order.

    With ``header_only`` the tensors are neither validated nor read (meta tensors will do) and
    the returned payload stops after the header: the byte planner sizes headers this way."""
    if not isinstance(model_config, dict):
        raise ArtifactError(f"model_config must be a dict, got {type(model_config).__name__}")
    if not isinstance(meta, dict):
        raise ArtifactError(f"meta must be a dict, got {type(meta).__name__}")
    if layout not in LAYOUTS:
        raise ArtifactError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    position = {n: i for i, n in enumerate(names)}
    table: list[dict] = []
    info_rows: list[dict] = []
    # (row, part entry, stored bytes, rank in the storage order); offsets are given afterwards
    stored: list[tuple[int, dict, bytes, tuple]] = []
    groups: dict[str, int] = {}
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
        if not header_only:  # refuse to write what the reader would reject
            validate_quantized(q, name)
        row = len(table)
        parts: dict[str, dict] = {}
        for part_name, t in q.parts().items():
            columns = layout == "grouped" and part_name == "data" and q.scheme not in FLOAT_SCHEMES
            entry, raw = _part_entry(t.T if columns else t, 0, with_bytes=not header_only)
            if columns:
                entry.update(shape=list(t.shape), layout="columns")
            parts[part_name] = entry
            if layout == "plain":
                rank: tuple = ()
            elif part_name == "data" and q.scheme not in FLOAT_SCHEMES:
                rank = (0, groups.setdefault(_group_key(name), len(groups)))
            else:
                rank = (1 if part_name == "scale" else 2 if q.scheme not in FLOAT_SCHEMES else 3,)
            stored.append((row, entry, raw, rank))
        entry = {"name": name, "alias_of": None, "scheme": q.scheme, "bits": q.bits, "shape": list(q.shape), "parts": parts}
        if q.lowrank_bits is not None:
            entry["lowrank"] = {"u_bits": q.lowrank_bits[0], "v_bits": q.lowrank_bits[1], "group": q.lowrank_group}
        table.append(entry)
        info_rows.append(_info_row(name, q, stored_bytes=q.stored_bytes, alias_of=None))
    offset = 0
    segments: list[Segments] = [[] for _ in table]  # in blob coordinates until the header length is known
    blobs: list[bytes] = []
    for row, entry, raw, _ in sorted(stored, key=lambda x: x[3]):  # stable: table order within a rank
        entry["offset"] = offset
        blobs.append(raw)
        segments[row].append((offset, offset + entry["nbytes"]))
        offset += entry["nbytes"]
    header = {
        "format_version": payload_version({n: qstate[n] for n in names if n not in aliases}, layout),
        "model_config": model_config,
        "meta": meta,
        "tensors": table,
        "data_bytes": offset,
    }
    header_bytes = _canonical_json(header, "artifact header (model_config/meta)")
    base = _HEADER_LEN.size + len(header_bytes)
    payload = _HEADER_LEN.pack(len(header_bytes)) + header_bytes + b"".join(blobs)
    return payload, info_rows, [[(base + a, base + b) for a, b in segs] for segs in segments]


def seal(payload: bytes, codec: str, version: int = FORMAT_VERSION) -> tuple[str, bytes]:
    """Compress `payload` with `codec` ("auto" = smallest available) and wrap it in the container
    of format `version` (the payload header's ``format_version``: see :func:`payload_version`).

    Returns (codec actually used, artifact bytes)."""
    if version not in READABLE_VERSIONS:
        raise ArtifactError(f"cannot write format version {version!r}; versions: {', '.join(map(str, READABLE_VERSIONS))}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ArtifactError(f"payload is {len(payload)} bytes, above the {MAX_PAYLOAD_BYTES}-byte limit readers accept")
    if codec == "auto":
        codec, comp = best_codec(payload)
    else:
        comp = compress(payload, codec)
    name = codec.encode("ascii")
    head = _PREFIX.pack(MAGIC, version, len(name)) + name + _LENGTHS.pack(len(payload), len(comp))
    body = head + comp
    return codec, body + hashlib.sha256(body).digest()


# ----------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class _Container:
    version: int
    codec_name: bytes
    raw_len: int
    comp_len: int
    fixed: int  # bytes before the compressed payload

    @property
    def total(self) -> int:
        return self.fixed + self.comp_len + _DIGEST_BYTES


# The fixed header is at most this long: prefix, the longest codec name, the two lengths.
_MAX_FIXED = _PREFIX.size + MAX_CODEC_NAME + _LENGTHS.size


def _parse_container(head: bytes, n: int) -> _Container:
    """Check the fixed header in ``head`` (the file's first bytes) against the file's size ``n``."""
    if head[: len(MAGIC)] != MAGIC[: min(len(head), len(MAGIC))]:
        raise ArtifactError(f"not a loopgolf artifact: bad magic {bytes(head[: len(MAGIC)])!r} (expected {MAGIC!r})")
    if n < _PREFIX.size:
        raise ArtifactError(f"artifact is truncated: {n} bytes, shorter than the fixed header")
    _, version, name_len = _PREFIX.unpack_from(head, 0)
    if version not in READABLE_VERSIONS:
        raise ArtifactError(f"unsupported artifact format version {version}; this reader supports {', '.join(map(str, READABLE_VERSIONS))}")
    fixed = _PREFIX.size + name_len + _LENGTHS.size
    if n < fixed:
        raise ArtifactError(f"artifact is truncated: {n} bytes, shorter than its {fixed}-byte header")
    if not 0 < name_len <= MAX_CODEC_NAME:
        raise ArtifactError(f"bad codec name length {name_len}")
    raw_len, comp_len = _LENGTHS.unpack_from(head, _PREFIX.size + name_len)
    c = _Container(version, bytes(head[_PREFIX.size : _PREFIX.size + name_len]), raw_len, comp_len, fixed)
    if n < c.total:
        raise ArtifactError(f"artifact is truncated: {n} bytes, header says {c.total}")
    if n > c.total:
        raise ArtifactError(f"artifact has {n - c.total} unexpected trailing bytes (expected {c.total} bytes)")
    return c


def _open_container(data: bytes, max_payload_bytes: int) -> tuple[_Container, str, memoryview]:
    """Check the container (header, checksum, codec, declared size); return it, its codec and
    the compressed payload."""
    c = _parse_container(data[:_MAX_FIXED], len(data))
    n = len(data)
    body = memoryview(data)[: n - _DIGEST_BYTES]
    if hashlib.sha256(body).digest() != bytes(data[n - _DIGEST_BYTES :]):
        raise ArtifactError("artifact checksum mismatch: the file is corrupted")
    # Checked only after the checksum so a corrupted byte reads as corruption, not as nonsense.
    try:
        codec = c.codec_name.decode("ascii")
    except UnicodeDecodeError:
        raise ArtifactError("codec name is not ASCII") from None
    if codec not in CODECS:
        raise ArtifactError(f"artifact uses codec {codec!r}, not available here (available: {', '.join(CODECS)})")
    if c.raw_len > max_payload_bytes:
        raise ArtifactError(f"artifact claims a {c.raw_len}-byte payload, above the sane bound of {max_payload_bytes} bytes (corrupt or a decompression bomb)")
    return c, codec, memoryview(data)[c.fixed : c.fixed + c.comp_len]


def unseal(data: bytes, *, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> tuple[str, bytes]:
    """Check the container and return (codec, uncompressed payload)."""
    c, codec, comp = _open_container(bytes(data), max_payload_bytes)
    try:
        payload = decompress(comp, codec, c.raw_len)
    except CodecError as e:
        raise ArtifactError(f"cannot decompress payload: {e}") from None
    if len(payload) != c.raw_len:
        raise ArtifactError(f"payload decompressed to {len(payload)} bytes, header says {c.raw_len}")
    return codec, payload


def _max_file_bytes(max_payload_bytes: int) -> int:
    # Compressed data can be a little larger than the payload (stored blocks, incompressible
    # codes); anything much larger than the payload bound is not an artifact this reader accepts.
    return _MAX_FIXED + max_payload_bytes + max_payload_bytes // 64 + (1 << 16) + _DIGEST_BYTES


def read_file(path: str | os.PathLike, max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> bytes:
    """The bytes of an artifact file, read only after its fixed header checks out: a directory,
    device or pipe is refused without opening it, a file whose size disagrees with its header
    (or is far above the payload bound) is refused after reading its first bytes."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such artifact file") from None
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, pipe or socket)"
        raise ArtifactError(f"{path} is {kind}, not an artifact file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_MAX_FIXED)
            try:
                c = _parse_container(head, size)
            except ArtifactError as e:
                raise ArtifactError(f"{path}: {e}") from None
            if c.total > _max_file_bytes(max_payload_bytes):
                raise ArtifactError(f"{path}: {c.total}-byte artifact is above the sane bound for a {max_payload_bytes}-byte payload")
            data = head + f.read(c.total - len(head) + 1)
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) != size:
        raise ArtifactError(f"{path}: the file changed while it was read")
    return data


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shape(x: Any, where: str) -> tuple[int, ...]:
    # Bounds keep numpy/torch from failing on absurd (but zero-element) shapes with their own errors.
    if not isinstance(x, list) or len(x) > MAX_NDIM or not all(_is_int(s) and 0 <= s <= MAX_DIM for s in x):
        raise ArtifactError(f"{where}: shape must be a list of at most {MAX_NDIM} ints in [0, {MAX_DIM}], got {x!r:.200}")
    return tuple(x)


MAX_HEADER_BYTES = 1 << 26  # a header is a few KB per tensor; 64 MiB is far above any real one


def _parse_header_bytes(raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ArtifactError(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ArtifactError("header must be a JSON object")
    return header


@dataclass
class _PartSpec:
    name: str  # part name ("data", "scale", ...)
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    planes: bool
    columns: bool = False  # a 2-D int8 part stored column by column (its transpose), version 3


@dataclass
class _TensorSpec:
    name: str
    alias_of: str | None
    scheme: str | None = None
    bits: int | None = None
    shape: tuple[int, ...] = ()
    parts: list[_PartSpec] = field(default_factory=list)
    lowrank_bits: tuple[int, int] | None = None
    lowrank_group: int | None = None


def _plan_part(entry: Any, part: str, where: str, cursor: int, data_bytes: int, version: int) -> _PartSpec:
    if not isinstance(entry, dict):
        raise ArtifactError(f"{where}: part entry must be an object")
    dtype_name, offset, nbytes = entry.get("dtype"), entry.get("offset"), entry.get("nbytes")
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES or (version == 1 and dtype_name == "int32"):
        raise ArtifactError(f"{where}: unknown dtype {dtype_name!r:.40}; known: {', '.join(_DTYPES)}")
    shape = _shape(entry.get("shape"), where)
    if not (_is_int(offset) and _is_int(nbytes)):
        raise ArtifactError(f"{where}: offset and nbytes must be ints")
    itemsize = np.dtype(_DTYPES[dtype_name][1]).itemsize
    if nbytes != math.prod(shape) * itemsize:
        raise ArtifactError(f"{where}: nbytes {nbytes} does not match shape {list(shape)} of {dtype_name}")
    # Versions 1-2 lay parts out back to back in table order; anything else (gaps, overlaps, out
    # of range) is corrupt. Version 3 parts may come in any order (checked to tile the data
    # exactly once every part is known, in _check_tiling).
    if version < GROUPED_FORMAT_VERSION and offset != cursor:
        raise ArtifactError(f"{where}: offset {offset} is not where the previous tensor ended ({cursor})")
    if offset < 0 or offset + nbytes > data_bytes:
        raise ArtifactError(f"{where}: bytes [{offset}, {offset + nbytes}) lie outside the {data_bytes}-byte tensor data")
    layout = entry.get("layout", "plain")
    planes = layout == "planes" and version >= 2 and itemsize > 1
    columns = layout == "columns" and version >= GROUPED_FORMAT_VERSION and dtype_name == "int8" and len(shape) == 2
    if not (planes or columns) and layout != "plain":
        raise ArtifactError(f"{where}: layout {layout!r:.40} is not valid for {dtype_name} of shape {list(shape)} in format version {version}")
    return _PartSpec(part, dtype_name, shape, offset, nbytes, planes, columns)


def _check_tiling(specs: list[_TensorSpec], data_bytes: int) -> None:
    """Version-3 parts, in whatever order they are stored, must cover the tensor data exactly:
    no gap, no overlap, nothing past the end."""
    end = 0
    for p in sorted((p for s in specs for p in s.parts), key=lambda p: (p.offset, p.nbytes)):
        if p.offset != end:
            what = "overlaps the part before it" if p.offset < end else f"leaves {p.offset - end} unreferenced bytes before it"
            raise ArtifactError(f"a {p.name} part at offset {p.offset} {what} (tensor data must be covered exactly once)")
        end += p.nbytes
    if end != data_bytes:
        raise ArtifactError(f"{data_bytes - end} bytes of tensor data are not referenced by any tensor")


def _plan_tensors(header: dict, data_bytes: int, version: int) -> list[_TensorSpec]:
    """Validate the tensor table against the header alone (names, schemes, parts, the byte
    layout), before any tensor byte is inflated."""
    table = header.get("tensors")
    if not isinstance(table, list):
        raise ArtifactError("header 'tensors' must be a list")
    if header.get("data_bytes") != data_bytes or not _is_int(header.get("data_bytes")):
        raise ArtifactError(f"header says {header.get('data_bytes')!r:.40} bytes of tensor data, payload holds {data_bytes}")
    specs: list[_TensorSpec] = []
    stored: set[str] = set()
    seen: set[str] = set()
    cursor = 0
    for i, entry in enumerate(table):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ArtifactError(f"tensor table entry {i} must be an object with a string 'name'")
        name = entry["name"]
        where = f"tensor {name!r:.80}"
        if name in seen:
            raise ArtifactError(f"{where} appears twice in the tensor table")
        seen.add(name)
        alias_of = entry.get("alias_of")
        if alias_of is not None:
            if not isinstance(alias_of, str) or alias_of not in stored:
                raise ArtifactError(f"{where}: alias_of {alias_of!r:.80} is not an earlier stored tensor")
            specs.append(_TensorSpec(name, alias_of))
            continue
        scheme = entry.get("scheme")
        if not isinstance(scheme, str):
            raise ArtifactError(f"{where}: scheme must be a string")
        try:
            bits = scheme_bits(scheme)
        except ArtifactError as e:
            raise ArtifactError(f"{where}: {e}") from None
        if entry.get("bits") != bits or (bits is not None and not _is_int(entry.get("bits"))):
            raise ArtifactError(f"{where}: bits {entry.get('bits')!r:.40} does not match scheme {scheme!r}")
        shape = _shape(entry.get("shape"), where)
        parts = entry.get("parts")
        want_parts = {"data"} if scheme in FLOAT_SCHEMES else {"data", "scale"}
        # intN tensors of version 2 may add the outlier and low-rank parts, version 3 the scales
        # of quantized low-rank factors (pairs, shapes and ranges are checked later).
        optional = set() if version < 2 or scheme in FLOAT_SCHEMES else set(PART_NAMES[2:6] if version == 2 else PART_NAMES[2:])
        if not isinstance(parts, dict) or not want_parts <= set(parts) <= want_parts | optional:
            raise ArtifactError(f"{where}: scheme {scheme} needs parts {sorted(want_parts)} (optional: {sorted(optional)})")
        spec = _TensorSpec(name, None, scheme, bits, shape)
        if "lowrank" in entry:
            spec.lowrank_bits, spec.lowrank_group = _plan_lowrank(entry["lowrank"], where, version)
        for part in PART_NAMES:  # storage order
            if part in parts:
                spec.parts.append(_plan_part(parts[part], part, f"{where} {part}", cursor, data_bytes, version))
                cursor += spec.parts[-1].nbytes
        specs.append(spec)
        stored.add(name)
    if version >= GROUPED_FORMAT_VERSION:
        _check_tiling(specs, data_bytes)
    elif cursor != data_bytes:
        raise ArtifactError(f"{data_bytes - cursor} bytes of tensor data are not referenced by any tensor")
    return specs


def _plan_lowrank(x: Any, where: str, version: int) -> tuple[tuple[int, int], int]:
    """(bits of u and v, group) of a table entry's "lowrank" object (format version 3), bounds
    checked here; the parts' shapes and codes are checked against them by validate_quantized."""
    if version < LQER_FORMAT_VERSION:
        raise ArtifactError(f"{where}: quantized low-rank factors need format version {LQER_FORMAT_VERSION}, the file is version {version}")
    if not isinstance(x, dict) or set(x) != {"u_bits", "v_bits", "group"}:
        raise ArtifactError(f"{where}: 'lowrank' must be an object with exactly u_bits, v_bits and group, got {x!r:.80}")
    bits = (x["u_bits"], x["v_bits"])
    if not all(_is_factor_bits(b) for b in bits) or bits == (FLOAT16_FACTOR, FLOAT16_FACTOR):
        raise ArtifactError(f"{where}: lowrank u_bits/v_bits must be in [{MIN_BITS}, {MAX_BITS}] or {FLOAT16_FACTOR} (float16), not both 16; got {bits!r:.80}")
    group = x["group"]
    if not _is_int(group) or not 1 <= group <= MAX_DIM:
        raise ArtifactError(f"{where}: lowrank group must be an int in [1, {MAX_DIM}], got {group!r:.40}")
    return bits, group


def _read_part(p: _PartSpec, blob: memoryview) -> torch.Tensor:
    np_dtype = np.dtype(_DTYPES[p.dtype][1])
    numel = math.prod(p.shape)
    if p.planes:
        planes = np.frombuffer(blob, dtype=np.uint8, count=p.nbytes, offset=p.offset).reshape(np_dtype.itemsize, numel)
        arr = np.ascontiguousarray(planes.T).view(np_dtype).reshape(p.shape)
    elif p.columns:
        arr = np.frombuffer(blob, dtype=np_dtype, count=numel, offset=p.offset).reshape(p.shape[1], p.shape[0]).T.copy()
    else:
        arr = np.frombuffer(blob, dtype=np_dtype, count=numel, offset=p.offset).reshape(p.shape).copy()
    return torch.from_numpy(arr)


def _load_tensors(specs: list[_TensorSpec], blob: memoryview) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantizedTensor] = {}
    rows: list[dict] = []
    for spec in specs:
        if spec.alias_of is not None:
            state[spec.name] = state[spec.alias_of]  # the same object, as tied weights were
            rows.append(_info_row(spec.name, quantized[spec.alias_of], stored_bytes=0, alias_of=spec.alias_of))
            continue
        arrays = {p.name: _read_part(p, blob) for p in spec.parts}
        q = QuantizedTensor(spec.scheme, spec.shape, *(arrays.get(n) for n in PART_NAMES[:2]), spec.bits, *(arrays.get(n) for n in PART_NAMES[2:]))
        q.lowrank_bits, q.lowrank_group = spec.lowrank_bits, spec.lowrank_group
        state[spec.name] = dequantize_tensor(q, f"tensor {spec.name!r:.80}")  # validates the tensor first
        quantized[spec.name] = q
        rows.append(_info_row(spec.name, q, stored_bytes=q.stored_bytes, alias_of=None))
    return state, rows


HeaderCheck = Callable[[dict, dict[str, tuple[int, ...]]], None]


def read_artifact(
    path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview,
    *,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    check_header: HeaderCheck | None = None,
) -> LoadedArtifact:
    """Load an artifact from a path or its bytes; raises ArtifactError on anything malformed.

    Order of work, so that no input costs much more than a real artifact of its declared size:
    the fixed header and the file size (before the file is read), the checksum, then the payload's
    JSON header and tensor table (inflating only that much), then ``check_header(model_config,
    {stored name: shape})`` (e.g. the model's own shapes, see :func:`loopgolf.export.pack.load_model`),
    and only then the tensor data, inflated into a buffer of exactly the size the table accounts for."""
    path: Path | None = None
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
    else:
        path = Path(path_or_bytes)
        data = read_file(path, max_payload_bytes)
    c, codec, comp = _open_container(data, max_payload_bytes)
    try:
        inflater = Inflater(comp, codec, c.raw_len)
        head = inflater.read(_HEADER_LEN.size)
        if len(head) < _HEADER_LEN.size:
            raise ArtifactError("payload too short to hold a header")
        (hlen,) = _HEADER_LEN.unpack(head)
        if _HEADER_LEN.size + hlen > c.raw_len or hlen > MAX_HEADER_BYTES:
            raise ArtifactError(f"header length {hlen} runs past the {c.raw_len}-byte payload (or the {MAX_HEADER_BYTES}-byte header bound)")
        raw_header = inflater.read(hlen)
        if len(raw_header) < hlen:
            raise ArtifactError(f"payload decompressed to {_HEADER_LEN.size + len(raw_header)} bytes, header says {c.raw_len}")
        header = _parse_header_bytes(raw_header)
        if header.get("format_version") != c.version:
            raise ArtifactError(f"payload format_version {header.get('format_version')!r:.40} != container version {c.version}")
        model_config, meta = header.get("model_config"), header.get("meta")
        if not isinstance(model_config, dict) or not isinstance(meta, dict):
            raise ArtifactError("header 'model_config' and 'meta' must be JSON objects")
        data_bytes = c.raw_len - _HEADER_LEN.size - hlen
        specs = _plan_tensors(header, data_bytes, c.version)
        if check_header is not None:
            stored = {s.name: s.shape for s in specs if s.alias_of is None}
            shapes = {s.name: stored[s.alias_of or s.name] for s in specs}
            check_header(model_config, shapes)
        blob = bytearray(data_bytes)
        got = inflater.readinto(memoryview(blob))
        if got != data_bytes:
            raise ArtifactError(f"payload decompressed to {_HEADER_LEN.size + hlen + got} bytes, header says {c.raw_len}")
        inflater.finish()
    except CodecError as e:
        raise ArtifactError(f"cannot decompress payload: {e}") from None
    state, rows = _load_tensors(specs, memoryview(blob))
    info = ArtifactInfo(path, len(data), codec, c.raw_len, rows)
    return LoadedArtifact(model_config, state, meta, codec, info)

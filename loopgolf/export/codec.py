"""Byte codecs for artifact payloads: deterministic max-effort compression, bounded decompression.

Every codec is run at its strongest deterministic setting (the artifact is written once and its size
is the score's budget). Decompression takes the exact output bound so a hostile or corrupted stream
cannot inflate without limit, and it rejects truncated streams and bytes after the end of stream.
"""

from __future__ import annotations

import lzma
import zlib

import zstandard


class CodecError(ValueError):
    """Unknown codec, or a stream that does not decode cleanly within its bound."""


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
    except Exception:  # noqa: BLE001 - any other failure also means "not usable"
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


def _checked_output(codec: str, out: bytes, eof: bool, unused: bytes, max_output: int) -> bytes:
    """``out`` if the stream decoded within bounds and ended exactly where the data ends."""
    if len(out) > max_output:
        raise _too_big(codec, max_output)
    if not eof:
        raise CodecError(f"{codec} stream is truncated (no end-of-stream marker)")
    if unused:
        raise CodecError(f"{codec} stream is followed by {len(unused)} unexpected bytes")
    return out


def _decompress_zlib(data: bytes, max_output: int) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(data, max_output + 1)
    return _checked_output("zlib", out, d.eof, d.unused_data, max_output)


def _decompress_lzma(data: bytes, max_output: int) -> bytes:
    d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    out = d.decompress(data, max_length=max_output + 1)
    return _checked_output("lzma", out, d.eof, d.unused_data, max_output)


def _decompress_zstd(data: bytes, max_output: int) -> bytes:
    # python-zstandard's streaming API has no output cap, but libzstd refuses to produce more than
    # a frame's declared content size. So: demand a declared size, check it against the bound, and
    # let libzstd enforce it while decoding.
    params = zstandard.get_frame_parameters(data)
    size = params.content_size
    if size == zstandard.CONTENTSIZE_UNKNOWN or size == zstandard.CONTENTSIZE_ERROR:
        raise CodecError("zstd frame does not declare its content size")
    if size > max_output:
        raise _too_big("zstd", max_output)
    d = zstandard.ZstdDecompressor().decompressobj()
    out = d.decompress(data)
    if len(out) > max_output:  # defensive: libzstd already enforces the declared size
        raise _too_big("zstd", max_output)
    if not d.eof:
        raise CodecError("zstd stream is truncated (frame not complete)")
    if d.unused_data:
        raise CodecError(f"zstd frame is followed by {len(d.unused_data)} unexpected bytes")
    return out


def _decompress_brotli(data: bytes, max_output: int) -> bytes:
    assert _brotli is not None
    d = _brotli.Decompressor()
    parts = [d.process(data, output_buffer_limit=max_output + 1)]
    total = len(parts[0])
    # With a limit the decoder may hold back output; drain it with empty input until it either
    # finishes, asks for more input (= the stream was truncated), or passes the bound.
    while not d.is_finished() and total <= max_output and not d.can_accept_more_data():
        chunk = d.process(b"", output_buffer_limit=max_output + 1 - total)
        parts.append(chunk)
        total += len(chunk)
    if total > max_output:
        raise _too_big("brotli", max_output)
    if not d.is_finished():
        raise CodecError("brotli stream is truncated")
    return b"".join(parts)


_DECODERS = {
    "zlib": _decompress_zlib,
    "lzma": _decompress_lzma,
    "zstd": _decompress_zstd,
    "brotli": _decompress_brotli,
}


def decompress(data: bytes, codec: str, max_output: int) -> bytes:
    """Decode a complete stream of `codec`, refusing to produce more than `max_output` bytes."""
    _check_codec(codec)
    if isinstance(max_output, bool) or not isinstance(max_output, int) or max_output < 0:
        raise CodecError(f"max_output must be a non-negative int, got {max_output!r}")
    try:
        return _DECODERS[codec](bytes(data), max_output)
    except CodecError:
        raise
    except (zlib.error, lzma.LZMAError, zstandard.ZstdError, EOFError) as e:
        raise CodecError(f"{codec} stream is corrupt: {e}") from None
    except Exception as e:  # brotli.error is a plain Exception subclass; keep the contract anyway
        if _brotli is not None and isinstance(e, _brotli.error):
            raise CodecError(f"{codec} stream is corrupt: {e}") from None
        raise


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

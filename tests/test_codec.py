import os
import zlib

import pytest

from loopgolf.export.codec import CODECS, CodecError, best_codec, compress, decompress

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
    with pytest.raises(ValueError, match="zlib, lzma, zstd"):
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

"""Making byte sidecars: tokenize (transformed) documents and give each token the bytes of the
original text it accounts for (the file format and the scoring side are ``loopgolf.data.sidecar``).

Which token gets which byte: the tokens of a document spell a byte string (byte pieces their
byte, normal pieces their text with "▁" as a space, control/unknown/unused pieces nothing, and
a leading "▁" right after an unknown or control piece other than the document's BOS nothing: the
official rule's convention). That string, read as UTF-8, is transformed text; every character of
it stands for some bytes of the original (``TextTransform.original_bytes``): an operator for 0,
a letter an operator uppercases for the uppercase letter's length, anything else for itself.
A character that stands for as many bytes as it has goes byte by byte to the tokens holding its
bytes (so a character split over byte-fallback pieces gives each piece 1, as the official rule
does); any other goes whole to the token holding its first byte (an operator alone in a token:
0). Per document the counts then sum to the original text's length exactly, when the tokenizer
reproduces the transformed text; :func:`loopgolf.data.sidecar.check_sidecar` verifies the sums
independently, by decoding the tokens and inverting the transform.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from loopgolf.data.caseops import TextTransform, TransformError, utf8_lengths
from loopgolf.data.shards import as_uint16_body
from loopgolf.data.sidecar import (
    DECLARATION_FORMAT,
    DECLARATION_VERSION,
    HEADER_DTYPE,
    HEADER_INTS,
    MAX_TOKEN_BYTES,
    SIDECAR_MAGIC,
    SIDECAR_VERSION,
    PieceText,
    SidecarError,
    declaration_path,
    piece_text,
    spell,
    spelled_text,
)
from loopgolf.util import atomic_write_bytes, atomic_write_text

# SentencePiece settings under which a tokenizer spells back exactly the text it was given: no
# normalization, no whitespace removal, every character representable (byte fallback).
LOSSLESS_TRAINER_SETTINGS: dict = {
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "byte_fallback": True,
}


def write_sidecar(path: str | os.PathLike, counts: np.ndarray | Sequence[int], transform: TextTransform) -> None:
    """Write the per-token byte `counts` of one shard as a sidecar at `path`, atomically."""
    path = Path(path)
    body = as_uint16_body(counts, f"sidecar {path}", items="byte counts", item="byte count", body="sidecar", error=SidecarError)
    header = np.zeros(HEADER_INTS, dtype=HEADER_DTYPE)
    header[0], header[1], header[2], header[3] = SIDECAR_MAGIC, SIDECAR_VERSION, body.size, transform.id
    header[4:6] = np.array([int(body.sum(dtype=np.int64))], dtype="<i8").view(HEADER_DTYPE)
    atomic_write_bytes(path, header.tobytes() + body.tobytes())


def write_declaration(tokenizer: str | os.PathLike, transform: TextTransform) -> Path:
    """Declare that `tokenizer` reads `transform`-ed text (``<model>.transform.json``); returns its path."""
    path = declaration_path(tokenizer)
    atomic_write_text(path, json.dumps({"format": DECLARATION_FORMAT, "version": DECLARATION_VERSION, "transform": transform.name}, indent=2) + "\n")
    return path


def token_original_bytes(ids: np.ndarray | Sequence[int], pieces: PieceText, transform: TextTransform, where: str = "document") -> tuple[np.ndarray, str]:
    """For one document's tokens (no BOS), the original-text bytes of each token (int64) and the
    original text they spell (the transform inverted); see the module docstring for the rule."""
    data, offsets = spell(ids, pieces)
    text = spelled_text(data, where)
    try:
        original = transform.decode(text)
        char_orig = transform.original_bytes(text)
    except TransformError as e:
        raise SidecarError(f"{where}: {e}") from None
    if not text:
        return np.zeros(len(offsets) - 1, dtype=np.int64), original
    clen = utf8_lengths(text)
    whole = char_orig == clen
    per_byte = np.repeat(whole.astype(np.int64), clen)  # continuation bytes: 1 if byte by byte, else 0
    first = np.concatenate([[0], np.cumsum(clen)[:-1]])
    per_byte[first] = np.where(whole, 1, char_orig)
    cum = np.zeros(per_byte.size + 1, dtype=np.int64)
    np.cumsum(per_byte, out=cum[1:])
    return cum[offsets[1:]] - cum[offsets[:-1]], original


def _first_difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at character {i} the tokens give {a[max(0, i - 10) : i + 10]!r} where the text has {b[max(0, i - 10) : i + 10]!r}"


def encode_documents(
    texts: Sequence[str],
    sp: spm.SentencePieceProcessor,
    transform: TextTransform,
    *,
    pieces: PieceText | None = None,
    exact: bool | None = None,
    names: Sequence[str] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Transform and tokenize each text; per text, its tokens (int64, no BOS) and each token's
    original-text bytes (int64).

    `exact` (default: for every transform but identity) requires the tokenizer to spell the
    transformed text back exactly, so that each text's counts sum to
    ``len(text.encode("utf-8"))``; a normalizing tokenizer fails with the first difference. With
    the identity transform and a normalizing tokenizer (the official ones), the counts are the
    bytes the tokens spell, which is what the official rule counts."""
    pieces = piece_text(sp) if pieces is None else pieces
    exact = not transform.is_identity if exact is None else exact
    transformed = [transform.encode(t) for t in texts]
    out = []
    for k, (text, ids) in enumerate(zip(texts, sp.encode(transformed, out_type=int))):
        where = names[k] if names is not None else f"document {k}"
        counts, original = token_original_bytes(ids, pieces, transform, where)
        if exact and original != text:
            raise SidecarError(
                f"{where}: the tokenizer does not spell back the {transform.name}-transformed text ({_first_difference(original, text)}); "
                "a tokenizer for transformed text must be lossless (identity normalization, no whitespace removal, byte fallback), "
                "as `loopgolf data build --transform` trains it"
            )
        if counts.size and int(counts.max()) > MAX_TOKEN_BYTES:
            raise SidecarError(f"{where}: a token accounts for {int(counts.max())} bytes, more than a sidecar entry holds ({MAX_TOKEN_BYTES})")
        out.append((np.asarray(ids, dtype=np.int64), counts))
    return out

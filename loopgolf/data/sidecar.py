"""Byte sidecars: how many bytes of the ORIGINAL text each validation token accounts for.

val_bpb divides by the UTF-8 bytes of the text being predicted. The official rule reads them off
the token pieces (``loopgolf.data.tokenizer``), which is right only when the tokens spell the
original text. A tokenizer for transformed text (``loopgolf.data.caseops``: capitals become
lowercase letters plus operator characters) spells the transformed text instead: its operators
are 3 UTF-8 bytes each that are not in the original, so piece bytes would inflate the
denominator and flatter the score. A sidecar stores the right count per token instead, and a
dataset whose tokenizer declares a transform cannot be scored without one.

File format (``fineweb_val_000000.bytes`` beside ``fineweb_val_000000.bin``): a 1024-byte header
of 256 little-endian int32 (magic 0x42595445, version 1, number of tokens, transform id, the
sum of all counts as a little-endian int64 in words 4-5, zeros), then one little-endian uint16
per token of the shard: the bytes of original text that token accounts for (BOS: 0).

Reading, checking and scoring live here (they are on the scoring path, whose bytes a submission
counts); making sidecars is ``loopgolf.data.sidecar_build`` (dataset preparation, not counted).
:func:`check_sidecar` verifies that a sidecar's counts sum, per document, to the bytes of the
original text its tokens decode to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from loopgolf.data.caseops import TextTransform, TransformError, get_transform, transform_by_id
from loopgolf.data.shards import BOS_ID, read_shard_header
from loopgolf.data.tokenizer import SPACE_MARK, ByteTables

SIDECAR_MAGIC = 0x42595445  # "BYTE"; not the token shards' 20240520, so neither reads as the other
SIDECAR_VERSION = 1
SIDECAR_SUFFIX = ".bytes"  # not .bin: the fineweb_val_*.bin glob must never pick a sidecar up as tokens
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKEN_BYTES = 65535  # body is uint16
DECLARATION_SUFFIX = ".transform.json"
DECLARATION_FORMAT = "loopgolf-text-transform"
DECLARATION_VERSION = 1
_MAX_DECLARATION_BYTES = 1 << 16
HEADER_DTYPE = np.dtype("<i4")
BODY_DTYPE = np.dtype("<u2")


class SidecarError(ValueError):
    """A byte sidecar or transform declaration is missing, malformed, or does not match the tokens."""


# --------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SidecarHeader:
    num_tokens: int
    transform: TextTransform
    total_bytes: int


def sidecar_path(shard: str | os.PathLike) -> Path:
    """Where the sidecar of token shard `shard` lives: same name, ``.bytes`` instead of ``.bin``."""
    return Path(shard).with_suffix(SIDECAR_SUFFIX)


def read_sidecar_header(path: str | os.PathLike) -> SidecarHeader:
    """Check a sidecar's header against its file size (before anything is allocated from it)."""
    path = Path(path)
    if not path.is_file():
        raise SidecarError(f"byte sidecar {path} does not exist (or is not a file)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise SidecarError(f"byte sidecar {path}: {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte header; the file is truncated")
    header = np.frombuffer(raw, dtype=HEADER_DTYPE)
    if int(header[0]) != SIDECAR_MAGIC:
        hint = " (that is a token shard's magic)" if int(header[0]) == 20240520 else ""
        raise SidecarError(f"byte sidecar {path}: wrong magic number {int(header[0])}{hint}, expected {SIDECAR_MAGIC}; not a loopgolf byte sidecar")
    if int(header[1]) != SIDECAR_VERSION:
        raise SidecarError(f"byte sidecar {path}: unsupported version {int(header[1])} (expected {SIDECAR_VERSION})")
    n = int(header[2])
    if n < 0:
        raise SidecarError(f"byte sidecar {path}: negative token count {n} in the header")
    expected = HEADER_BYTES + 2 * n
    if size != expected:
        kind = "truncated" if size < expected else "over-long"
        raise SidecarError(f"byte sidecar {path}: file is {size:,} bytes but the header promises {n:,} tokens ({expected:,} bytes); the file is {kind}")
    transform = transform_by_id(int(header[3]))
    if transform is None:
        raise SidecarError(f"byte sidecar {path}: unknown transform id {int(header[3])} in the header")
    total = int(header[4:6].view("<i8")[0])
    if total < 0:
        raise SidecarError(f"byte sidecar {path}: negative byte total {total} in the header")
    return SidecarHeader(n, transform, total)


def load_sidecar(path: str | os.PathLike, *, num_tokens: int | None = None, transform: TextTransform | None = None) -> np.ndarray:
    """A sidecar's counts (read-only uint16 memmap), checked: header, size, the body's sum against
    the header's total and, when given, the shard's token count and the declared transform."""
    path = Path(path)
    h = read_sidecar_header(path)
    if num_tokens is not None and h.num_tokens != num_tokens:
        raise SidecarError(f"byte sidecar {path} counts {h.num_tokens:,} tokens but its shard holds {num_tokens:,}; they were not written together")
    if transform is not None and h.transform.id != transform.id:
        raise SidecarError(
            f"byte sidecar {path} was made for transform {h.transform.name!r} but the tokenizer's transform is {transform.name!r} (its .transform.json; none means identity)"
        )
    if h.num_tokens == 0:
        body: np.ndarray = np.zeros(0, dtype=BODY_DTYPE)
    else:
        body = np.memmap(path, dtype=BODY_DTYPE, mode="r", offset=HEADER_BYTES, shape=(h.num_tokens,))
    total = int(body.sum(dtype=np.int64))
    if total != h.total_bytes:
        raise SidecarError(f"byte sidecar {path}: its counts sum to {total:,} but the header says {h.total_bytes:,}; the file is corrupt")
    return body


def find_val_sidecars(val_shards: Sequence[Path]) -> list[Path] | None:
    """The sidecar of every validation shard, or None when none has one; a partial set is an error
    (the shards without one would be scored with no valid byte count)."""
    refuse_record_layout(val_shards)
    paths = [sidecar_path(p) for p in val_shards]
    present = [p.is_file() for p in paths]
    if not any(present):
        return None
    if not all(present):
        missing = next(p for p, ok in zip(paths, present) if not ok)
        raise SidecarError(f"byte sidecar {missing} is missing, while other validation shards beside it have one; rebuild the dataset")
    return paths


def refuse_record_layout(val_shards: Sequence[Path]) -> None:
    """The Parameter Golf record stores its sidecars as ``fineweb_val_bytes_*.bin`` token-format
    files, which the ``fineweb_val_*.bin`` glob takes for validation shards: scoring them as
    tokens would give a meaningless number, so they are refused by name."""
    for p in val_shards:
        if Path(p).name.startswith("fineweb_val_bytes_"):
            raise SidecarError(
                f"{p} looks like a byte sidecar in the Parameter Golf record's layout, which would be read as validation tokens; "
                f"move it out of the dataset (loopgolf reads sidecars named <shard>{SIDECAR_SUFFIX} in its own format)"
            )


def load_val_sidecars(val_shards: Sequence[Path], sidecars: Sequence[Path], transform: TextTransform) -> np.ndarray:
    """The sidecars of `val_shards`, checked one by one against their shard and concatenated:
    one count per token of the validation stream."""
    parts = [load_sidecar(s, num_tokens=read_shard_header(v), transform=transform) for v, s in zip(val_shards, sidecars)]
    if not parts:
        raise SidecarError("no validation shards given for the byte sidecars")
    return np.concatenate(parts).astype(BODY_DTYPE, copy=False)


# --------------------------------------------------------------------------------------------
# Transform declaration next to a tokenizer
# --------------------------------------------------------------------------------------------


def declaration_path(tokenizer: str | os.PathLike) -> Path:
    """``tokenizer.model`` -> ``tokenizer.transform.json``: the declaration travels with the model file."""
    return Path(tokenizer).with_suffix(DECLARATION_SUFFIX)


def read_declaration(tokenizer: str | os.PathLike) -> TextTransform | None:
    """The transform `tokenizer` declares (its ``.transform.json``), or None when it has no declaration."""
    path = declaration_path(tokenizer)
    if not path.exists():
        return None
    if not path.is_file() or path.stat().st_size > _MAX_DECLARATION_BYTES:
        raise SidecarError(f"{path}: not a transform declaration (a small JSON file)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SidecarError(f"{path}: transform declaration is not valid JSON ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != DECLARATION_FORMAT or meta.get("version") != DECLARATION_VERSION:
        raise SidecarError(f'{path}: not a transform declaration (expected "format": "{DECLARATION_FORMAT}", "version": {DECLARATION_VERSION})')
    try:
        return get_transform(meta.get("transform"))
    except TransformError as e:
        raise SidecarError(f"{path}: {e}") from None


# --------------------------------------------------------------------------------------------
# What tokens spell, and the check of a sidecar against it
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PieceText:
    """The bytes each piece id spells, flattened: piece i is ``data[start[i] : start[i] + length[i]]``."""

    data: np.ndarray  # uint8
    start: np.ndarray  # int64 (V,)
    length: np.ndarray  # int64 (V,)
    leading_space: np.ndarray  # bool (V,): a normal piece starting with "▁"
    drops_next_space: np.ndarray  # bool (V,): control/unknown/unused other than BOS

    @property
    def vocab_size(self) -> int:
        return int(self.start.shape[0])


def piece_text(sp: spm.SentencePieceProcessor) -> PieceText:
    """What every piece of `sp` spells (see :func:`spell`), built once per tokenizer."""
    n = sp.get_piece_size()
    chunks: list[bytes] = []
    lead = np.zeros(n, dtype=np.bool_)
    drops = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            chunks.append(b"")
            drops[i] = i != BOS_ID
        elif sp.is_byte(i):
            chunks.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))  # "<0xAB>"
        else:
            piece = sp.id_to_piece(i)
            lead[i] = piece.startswith(SPACE_MARK)
            chunks.append(piece.replace(SPACE_MARK, " ").encode("utf-8"))
    length = np.array([len(c) for c in chunks], dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64) if n else np.zeros(0, dtype=np.int64)
    data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    return PieceText(data, start, length, lead, drops)


def spell(ids: np.ndarray | Sequence[int], pieces: PieceText) -> tuple[np.ndarray, np.ndarray]:
    """The bytes `ids` spell (uint8) and each token's offset into them (int64, len(ids) + 1).

    A byte piece spells its byte; a normal piece its text with "▁" as a space; a control, unknown
    or unused piece nothing; and a leading "▁" right after a control, unknown or unused piece
    other than BOS spells nothing either (the official rule's convention; after BOS the space is
    really at the start of the document, so it counts)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= pieces.vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise SidecarError(f"token id {bad} is outside the tokenizer's {pieces.vocab_size} pieces; the tokenizer does not match these tokens")
    start = pieces.start[ids].copy()
    length = pieces.length[ids].copy()
    if ids.size > 1:
        drop = pieces.leading_space[ids[1:]] & pieces.drops_next_space[ids[:-1]]
        start[1:] += drop
        length[1:] -= drop
    offsets = np.zeros(ids.size + 1, dtype=np.int64)
    np.cumsum(length, out=offsets[1:])
    total = int(offsets[-1])
    if total == 0:
        return np.zeros(0, dtype=np.uint8), offsets
    # Byte j of token k is data[start[k] + j]: one gather for the whole sequence.
    index = np.repeat(start - offsets[:-1], length) + np.arange(total, dtype=np.int64)
    return pieces.data[index], offsets


def spelled_text(data: np.ndarray, where: str) -> str:
    """Spelled bytes as text; SidecarError naming `where` when they are not valid UTF-8."""
    try:
        return data.tobytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SidecarError(f"{where}: the tokens spell invalid UTF-8 at byte {e.start} ({e.reason})") from None


def check_sidecar(tokens: np.ndarray, counts: np.ndarray, pieces: PieceText, transform: TextTransform, where: str = "validation data") -> int:
    """Per document (a BOS to the next), the sidecar's counts must sum to the byte length of the
    original text its tokens decode to (spelled bytes -> transformed text -> inverse transform ->
    UTF-8), computed here without the per-token attribution. Returns the total; SidecarError
    naming the first document that differs."""
    if len(tokens) != len(counts):
        raise SidecarError(f"{where}: {len(counts):,} byte counts for {len(tokens):,} tokens")
    tokens = np.asarray(tokens)
    bounds = np.flatnonzero(tokens == BOS_ID)
    starts = bounds if bounds.size and bounds[0] == 0 else np.concatenate([[0], bounds]).astype(np.int64)
    ends = np.append(starts[1:], len(tokens))
    cum = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, dtype=np.int64, out=cum[1:])
    total = 0
    for doc, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        data, _ = spell(tokens[a:b], pieces)
        text = spelled_text(data, f"{where}, document {doc} (tokens {a:,} to {b:,})")
        try:
            want = data.size if transform.is_identity else len(transform.decode(text).encode("utf-8"))
        except TransformError as e:
            raise SidecarError(f"{where}, document {doc} (tokens {a:,} to {b:,}): {e}") from None
        got = int(cum[b] - cum[a])
        if got != want:
            raise SidecarError(
                f"{where}, document {doc} (tokens {a:,} to {b:,}): the byte sidecar gives {got:,} bytes but the tokens decode to "
                f"{want:,} bytes of original text; the sidecar does not belong to these tokens, tokenizer or transform"
            )
        total += want
    return total


# --------------------------------------------------------------------------------------------
# What evaluation reads
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SidecarTables:
    """Byte counts for scoring validation data that has a sidecar: passed where plain
    :class:`~loopgolf.data.tokenizer.ByteTables` would be. A target's bytes come from its stream
    position, not its id, so a scoring path must hand positions to
    :meth:`bytes_at`; one that reads piece bytes instead is refused (``has_leading_space`` and
    ``is_boundary`` raise), so that no path can quietly fall back to piece bytes."""

    pieces: ByteTables  # the tokenizer's piece tables: vocabulary size and id checks
    target_bytes: np.ndarray  # uint16 (N,): original bytes of the token at each stream position
    transform: str
    source: str  # where the counts came from, for messages

    @property
    def base_bytes(self) -> np.ndarray:
        return self.pieces.base_bytes  # read for its shape (the vocabulary size) by scoring paths

    @property
    def vocab_size(self) -> int:
        return self.pieces.vocab_size

    def _refuse(self) -> SidecarError:
        return SidecarError(
            f"this scoring path counts bytes from token pieces, but {self.source} has a byte sidecar (tokenizer transform {self.transform!r}): "
            "piece bytes are not the original text's bytes; score with loopgolf.evaluate.evaluate_bpb, which reads the sidecar"
        )

    @property
    def has_leading_space(self) -> np.ndarray:
        raise self._refuse()

    @property
    def is_boundary(self) -> np.ndarray:
        raise self._refuse()

    def check_stream(self, tokens: np.ndarray) -> None:
        """The tokens scored must be the stream the sidecar was made for (a prefix is cut later)."""
        if len(tokens) != len(self.target_bytes):
            raise SidecarError(f"{len(tokens):,} validation tokens given, but the byte sidecar of {self.source} covers {len(self.target_bytes):,}")

    def bytes_at(self, positions: np.ndarray) -> int:
        """Summed original bytes of the targets at stream `positions`."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size == 0:
            return 0
        if int(positions.min()) < 0 or int(positions.max()) >= len(self.target_bytes):
            raise SidecarError(f"target position {int(positions.max())} is outside the byte sidecar of {self.source} ({len(self.target_bytes):,} tokens)")
        return int(self.target_bytes[positions].sum(dtype=np.int64))

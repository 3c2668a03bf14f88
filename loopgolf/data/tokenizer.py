"""SentencePiece tokenizers: loading, training with the official settings, and the byte tables
that turn a token-level loss into the tokenizer-agnostic bits-per-byte.

Byte rule (must match the official scorer exactly): target y after previous token x counts
  0                                 if y is a control, unknown or unused piece,
  1                                 if y is a byte-fallback piece,
  len(utf8(piece without "▁")) + 1  if the piece starts with "▁" and x is not control/unknown/unused,
  len(utf8(piece without "▁"))      otherwise.
The "+1" is the space the "▁" stands for; after a document boundary (BOS) it is not in the text.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from loopgolf.util import atomic_write_bytes, atomic_write_text

SPACE_MARK = "\u2581"  # "▁", SentencePiece's stand-in for a space
_CHUNK = 1 << 22  # tokens per chunk when counting bytes: bounded memory on 100M-token arrays


class TokenizerError(ValueError):
    """A tokenizer file is missing or invalid, or does not match the model/data vocabulary."""


def load_tokenizer(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model file."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer {path} does not exist (or is not a file)")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"tokenizer {path} is not a valid SentencePiece model: {e}") from e
    return sp


# --------------------------------------------------------------------------------------------
# Byte tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ByteTables:
    """Per-id lookups for the official byte count (see the module docstring)."""

    base_bytes: np.ndarray  # int64 (V,): UTF-8 length without leading "▁"; 1 for byte pieces; 0 boundary
    has_leading_space: np.ndarray  # bool (V,): a normal piece starting with "▁"
    is_boundary: np.ndarray  # bool (V,): control, unknown or unused piece (incl. vocab padding)

    @property
    def vocab_size(self) -> int:
        return int(self.base_bytes.shape[0])


def build_byte_tables(sp: spm.SentencePieceProcessor, vocab_size: int | None = None) -> ByteTables:
    """Build the byte tables for `sp`, padded to `vocab_size` (a model may round its vocab up).

    Padding ids never occur in real text; they count as boundaries with 0 bytes.
    """
    n = sp.get_piece_size()
    size = n if vocab_size is None else int(vocab_size)
    if size < n:
        raise TokenizerError(f"vocab_size {size} is smaller than the tokenizer's {n} pieces; the tokenizer and the model vocabulary do not match")
    base = np.zeros(size, dtype=np.int64)
    lead = np.zeros(size, dtype=np.bool_)
    boundary = np.ones(size, dtype=np.bool_)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_MARK):
            lead[i] = True
            piece = piece[len(SPACE_MARK) :]
        base[i] = len(piece.encode("utf-8"))
    for arr in (base, lead, boundary):
        arr.setflags(write=False)  # shared lookups: accidental writes would corrupt every score
    return ByteTables(base_bytes=base, has_leading_space=lead, is_boundary=boundary)


def target_byte_counts(prev_ids: np.ndarray, target_ids: np.ndarray, tables: ByteTables) -> np.ndarray:
    """Bytes of each target given its previous token (int64, same shape as `target_ids`)."""
    prev = np.asarray(prev_ids)
    tgt = np.asarray(target_ids)
    if prev.shape != tgt.shape:
        raise ValueError(f"prev_ids shape {prev.shape} != target_ids shape {tgt.shape}")
    if tgt.size:
        hi = max(int(prev.max()), int(tgt.max()))
        lo = min(int(prev.min()), int(tgt.min()))
        if lo < 0 or hi >= tables.vocab_size:
            bad = lo if lo < 0 else hi
            raise TokenizerError(f"token id {bad} is outside the byte tables' vocabulary [0, {tables.vocab_size}); the tokenizer does not match these tokens")
    counts = tables.base_bytes[tgt]
    extra = tables.has_leading_space[tgt] & ~tables.is_boundary[prev]
    return counts + extra.astype(np.int64)


def count_target_bytes(tokens: np.ndarray, tables: ByteTables) -> tuple[int, int]:
    """(num_targets, total_target_bytes) for targets tokens[1:] after tokens[:-1].

    Works chunk by chunk (overlapping by one token) so a memory-mapped 100M-token shard is never
    materialized as int64 all at once.
    """
    n = int(len(tokens))
    if n < 2:
        return 0, 0
    total = 0
    for start in range(1, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        prev = np.asarray(tokens[start - 1 : stop - 1])
        tgt = np.asarray(tokens[start:stop])
        total += int(target_byte_counts(prev, tgt, tables).sum())
    return n - 1, total


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

OFFICIAL_TRAINER_SETTINGS: dict = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
}


def _training_sentences(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Split documents into non-empty lines no longer than `max_bytes` UTF-8 bytes.

    SentencePiece silently drops sentences over max_sentence_length, so long lines are cut (at
    character boundaries) instead of lost.
    """
    for doc in documents:
        if not isinstance(doc, str):
            raise TokenizerError(f"training documents must be str, got {type(doc).__name__}")
        for line in doc.splitlines():
            if not line.strip():
                continue
            data = line.encode("utf-8")
            if len(data) <= max_bytes:
                yield line
                continue
            start = 0
            while start < len(data):
                stop = min(start + max_bytes, len(data))
                while stop < len(data) and (data[stop] & 0xC0) == 0x80:  # not inside a character
                    stop -= 1
                yield data[start:stop].decode("utf-8")
                start = stop


def _vocab_text(model_proto: bytes) -> str:
    """The .vocab companion file (piece TAB score per line), as SentencePiece writes it."""
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))


def train_tokenizer(
    documents: Iterable[str],
    vocab_size: int,
    model_prefix: str | os.PathLike,
    *,
    byte_fallback: bool = True,
    seed: int = 1337,
    max_sentence_length: int = 16384,
    threads: int = 2,
    extra_settings: dict | None = None,
) -> Path:
    """Train a SentencePiece BPE tokenizer with the official settings; return `<prefix>.model`.

    Documents are streamed to the trainer (no temporary text file), split into lines. The model
    comes back in memory and is written atomically with its `.vocab`; its bytes hold no paths,
    so the same inputs give byte-identical files. `extra_settings` (SentencePiece trainer options)
    replace official ones, e.g. the lossless settings a tokenizer for transformed text needs.
    """
    if vocab_size <= 0:
        raise TokenizerError(f"vocab_size must be positive, got {vocab_size}")
    if max_sentence_length <= 0:
        raise TokenizerError(f"max_sentence_length must be positive, got {max_sentence_length}")
    prefix = Path(model_prefix)
    model_path = prefix.with_name(prefix.name + ".model")
    vocab_path = prefix.with_name(prefix.name + ".vocab")
    settings = {**OFFICIAL_TRAINER_SETTINGS, "byte_fallback": bool(byte_fallback), **(extra_settings or {})}
    seen = [0]

    def sentences() -> Iterator[str]:
        for line in _training_sentences(documents, max_sentence_length):
            seen[0] += 1
            yield line

    spm.set_random_generator_seed(int(seed))
    proto: list[bytes] = []

    class _Writer:  # receives the serialized model instead of files under a temp prefix
        def write(self, data: bytes) -> None:
            proto.append(bytes(data))

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=_Writer(),
            vocab_size=int(vocab_size),
            max_sentence_length=int(max_sentence_length),
            num_threads=int(threads),
            minloglevel=2,
            **settings,
        )
    except RuntimeError as e:
        msg = str(e)
        if seen[0] == 0:
            raise TokenizerError(f"cannot train tokenizer {model_path}: the corpus has no non-empty lines") from e
        if "smaller than required_chars" in msg:
            raise TokenizerError(
                f"cannot train a {vocab_size}-piece tokenizer for {model_path}: the special, byte "
                f"and required character pieces alone need more ids (sentencepiece: {msg.strip()}); "
                "use a larger vocab_size"
            ) from e
        if "Vocabulary size" in msg or "vocab_size" in msg:
            raise TokenizerError(
                f"cannot train a {vocab_size}-piece tokenizer for {model_path}: the corpus is too "
                f"small or too uniform to yield that many pieces (sentencepiece: {msg.strip()}); "
                "use more text or a smaller vocab_size"
            ) from e
        raise TokenizerError(f"tokenizer training for {model_path} failed: {msg.strip()}") from e
    if not proto:
        raise TokenizerError(f"tokenizer training for {model_path} produced no model (empty corpus?)")
    model_bytes = b"".join(proto)
    vocab_text = _vocab_text(model_bytes)
    # .vocab first: a reader keyed on the .model never sees a model without its companion.
    atomic_write_text(vocab_path, vocab_text)
    atomic_write_bytes(model_path, model_bytes)
    return model_path

"""Text corpora -> datasets in the official shard format.

A dataset directory built here looks like the official FineWeb one (`fineweb_train_000000.bin`,
`fineweb_val_000000.bin`, ...), so every loader and scorer works on it unchanged, plus
`tokenizer.model` (+ `tokenizer.vocab`) and a `manifest.json` that records what went in, the
size and sha256 of every shard and the sha256 of the tokenizer they were encoded with.

Inputs: `.txt` files (one document each), `.jsonl` files (one JSON object per line with a string
"text" field) and folders of them; each a regular file (or a symlink to one) of bounded size. Validation documents are held out by a seeded random choice
before the tokenizer is trained, so the tokenizer never sees validation text.

Shard order: validation documents keep their source order (a fixed split, like the official one).
Training documents are shuffled with the same seed by default, because the loader reads a shard as
one contiguous stream: in source order a sorted corpus (by date, topic, file name) would feed the
model one slice of it at a time, and a short run would only ever see one slice. `shuffle=False`
keeps source order. The manifest records which (`train_order`, `shuffle_seed`).
"""

from __future__ import annotations

import contextlib
import json
import lzma
import os
import random
import re
import shutil
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from loopgolf import __version__
from loopgolf.data.caseops import TextTransform, TransformError, get_transform
from loopgolf.data.dataset import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    CorpusError,
    _file_sha256,
    load_manifest,
    tokenizer_sha256,
    verify_shards,
    verify_tokenizer,
)
from loopgolf.data.shards import BOS_ID, ShardError, find_shards, load_tokens, read_shard_header, write_shard
from loopgolf.data.sidecar import SidecarError, piece_text, read_declaration, sidecar_path
from loopgolf.data.tokenizer import TokenizerError, load_tokenizer, train_tokenizer
from loopgolf.util import atomic_directory, atomic_write_json

TOKENIZER_NAME = "tokenizer.model"
SUPPORTED_SUFFIXES = (".txt", ".jsonl")
DEFAULT_VAL_FRACTION = 0.05
MAX_VOCAB = 1 << 16  # shard bodies are uint16
# Per input file: the corpus is held in memory, and a file that keeps growing must not be read forever.
MAX_INPUT_BYTES = 8 * 2**30
_ENCODE_BATCH = 256  # documents per SentencePiece call: amortizes call overhead, bounded memory
_XZ_PRESET = 9


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # where it came from, e.g. "path/a.jsonl:17", for error messages and provenance


# --------------------------------------------------------------------------------------------
# Reading documents
# --------------------------------------------------------------------------------------------


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _check_input_file(path: Path, max_bytes: int) -> None:
    """A corpus file must be a regular file (a symlink to one is fine) of at most `max_bytes`:
    a FIFO would block the build and a device (/dev/zero) would never end. Only stats."""
    try:
        st = path.stat()
    except OSError as e:
        raise CorpusError(f"corpus input {path} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CorpusError(f"corpus input {path} is {_kind(st.st_mode)}, not a regular file; give .txt/.jsonl files or folders of them")
    if st.st_size > max_bytes:
        raise CorpusError(f"corpus input {path} is {st.st_size:,} bytes, more than the {max_bytes:,} allowed per file (--max-input-bytes); split it")


@contextlib.contextmanager
def _open_input(path: Path, max_bytes: int) -> Iterator[BinaryIO]:
    """`path` opened for reading after the checks of `_check_input_file`, opened non-blocking and
    checked again on the open descriptor (the file may have been swapped after the stat)."""
    _check_input_file(path, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CorpusError(f"corpus input {path} cannot be read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            raise CorpusError(f"corpus input {path} changed while being opened ({_kind(st.st_mode)}, {st.st_size:,} bytes)")
        yield f


def _too_big(path: Path, max_bytes: int) -> CorpusError:
    return CorpusError(f"corpus input {path} grew past the {max_bytes:,} bytes allowed per file while being read")


def _expand_inputs(inputs: Sequence[str | os.PathLike], max_bytes: int = MAX_INPUT_BYTES) -> list[Path]:
    """Input paths -> the files to read, in order. Folders are walked recursively, sorted. Every
    file is checked (`_check_input_file`) before any is read."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # a lone path is a common slip; a str would otherwise iterate by char
    files: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise CorpusError(f"corpus input {path} does not exist")
        if path.is_dir():
            found = [
                p
                for p in path.rglob("*")
                if p.suffix.lower() in SUPPORTED_SUFFIXES
                and not p.is_dir()
                # hidden files and folders (.git, .ipynb_checkpoints) are not corpus text
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ]
            files.extend(sorted(found, key=lambda p: p.relative_to(path).as_posix()))
        elif path.suffix.lower() in SUPPORTED_SUFFIXES:
            files.append(path)
        else:
            raise CorpusError(
                f"corpus input {path}: unsupported file type {path.suffix or '(no extension)'!r}; expected one of {', '.join(SUPPORTED_SUFFIXES)} or a folder"
            )
    for path in files:
        _check_input_file(path, max_bytes)
    return files


def _decode(data: bytes, path: Path, base_offset: int = 0, line: int | None = None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{path}:{line}" if line is not None else str(path)
        raise CorpusError(f"{where}: invalid UTF-8 at byte offset {base_offset + e.start} of the file ({e.reason}); convert the file to UTF-8") from None


def _read_txt(path: Path, max_bytes: int = MAX_INPUT_BYTES) -> Iterator[Document]:
    with _open_input(path, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_big(path, max_bytes)
    text = _decode(data, path)
    text = text.removeprefix("\ufeff")  # a BOM is an encoding marker, not text
    if text.strip():
        yield Document(text=text, source=str(path))


def _read_jsonl(path: Path, max_bytes: int = MAX_INPUT_BYTES) -> Iterator[Document]:
    offset = 0
    with _open_input(path, max_bytes) as f:
        lineno = 0
        while raw := f.readline(max_bytes + 1 - offset):
            lineno += 1
            line_offset, offset = offset, offset + len(raw)
            if offset > max_bytes:
                raise _too_big(path, max_bytes)
            line = _decode(raw, path, line_offset, lineno)
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                why = f"{e.msg}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                raise CorpusError(f"{path}:{lineno}: invalid JSON ({why})") from None
            if not isinstance(obj, dict):
                raise CorpusError(f'{path}:{lineno}: expected a JSON object with a "text" field, got {type(obj).__name__}')
            if "text" not in obj:
                keys = ", ".join(sorted(obj)[:8]) or "none"
                raise CorpusError(f'{path}:{lineno}: missing "text" field (fields: {keys})')
            text = obj["text"]
            if not isinstance(text, str):
                raise CorpusError(f'{path}:{lineno}: "text" must be a string, got {type(text).__name__}')
            if text.strip():
                yield Document(text=text, source=f"{path}:{lineno}")


def iter_documents(inputs: Sequence[str | os.PathLike], *, max_bytes: int = MAX_INPUT_BYTES) -> Iterator[Document]:
    """Yield the non-empty documents of `inputs` (files and folders), in order.

    All paths are checked before the first document is yielded, so a typo in the last input fails
    at once rather than after reading everything else. Every file must be a regular file (a
    symlink to one is fine) of at most `max_bytes`; FIFOs, devices and sockets are refused.
    """
    for path in _expand_inputs(inputs, max_bytes):
        if path.suffix.lower() == ".txt":
            yield from _read_txt(path, max_bytes)
        else:
            yield from _read_jsonl(path, max_bytes)


# --------------------------------------------------------------------------------------------
# Building a dataset
# --------------------------------------------------------------------------------------------


def _shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


class _ShardWriter:
    """Accumulates token arrays and writes shards of exactly `shard_tokens` (the last: fewer).

    Documents may straddle shard boundaries, as in the official export: the stream is what counts.
    With `sidecar` (a transform), each shard gets a byte sidecar cut at the same token.
    """

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, vocab_size: int, sidecar: TextTransform | None = None) -> None:
        self.out_dir, self.split = out_dir, split
        self.shard_tokens, self.vocab_size = shard_tokens, vocab_size
        self.sidecar = sidecar
        self.pending: list[np.ndarray] = []
        self.pending_counts: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray, counts: np.ndarray | None = None) -> None:
        self.pending.append(tokens)
        if self.sidecar is not None:
            self.pending_counts.append(counts)
        self.pending_tokens += len(tokens)
        while self.pending_tokens >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> list[dict]:
        if self.pending_tokens:
            self._flush(self.pending_tokens)
        return self.shards

    def _flush(self, n: int) -> None:
        flat = np.concatenate(self.pending)
        body, rest = flat[:n], flat[n:]
        self.pending = [rest] if len(rest) else []
        self.pending_tokens = len(rest)
        path = self.out_dir / _shard_name(self.split, len(self.shards))
        write_shard(path, body, vocab_size=self.vocab_size)
        if self.sidecar is not None:
            from loopgolf.data.sidecar_build import write_sidecar  # dataset preparation only: not in a run's counted code

            counts = np.concatenate(self.pending_counts)
            self.pending_counts = [counts[n:]] if len(rest) else []
            write_sidecar(sidecar_path(path), counts[:n], self.sidecar)
        self.shards.append({"file": path.name, "tokens": int(n), "bytes": path.stat().st_size, "sha256": _file_sha256(path)})


def _write_split(
    sp, docs: list[Document], out_dir: Path, split: str, shard_tokens: int, vocab_size: int, progress: bool, transform: TextTransform | None = None
) -> dict:
    """Encode `docs` into shards; with `transform`, the transformed text, and for the validation
    split a byte sidecar per shard (the original text's bytes of every token)."""
    sidecar = transform if transform is not None and split == "val" else None
    writer = _ShardWriter(out_dir, split, shard_tokens, vocab_size, sidecar)
    pieces = piece_text(sp) if sidecar is not None else None
    total = 0
    with tqdm(total=len(docs), desc=f"encode {split}", unit="doc", disable=not progress) as bar:
        for start in range(0, len(docs), _ENCODE_BATCH):
            batch = docs[start : start + _ENCODE_BATCH]
            texts = [d.text for d in batch]
            if sidecar is not None:
                from loopgolf.data.sidecar_build import encode_documents  # dataset preparation only: not in a run's counted code

                encoded = encode_documents(texts, sp, sidecar, pieces=pieces, names=[d.source for d in batch])
            else:
                texts = [transform.encode(t) for t in texts] if transform is not None else texts
                encoded = [(ids, None) for ids in sp.encode(texts, out_type=int)]
            for doc, (ids, counts) in zip(batch, encoded):
                arr = np.empty(len(ids) + 1, dtype=np.int64)
                arr[0] = BOS_ID
                arr[1:] = ids
                if len(ids) and (arr.max() >= vocab_size or arr.min() < 0):
                    raise CorpusError(f"{doc.source}: token id {int(arr.max())} does not fit vocab_size {vocab_size}")
                writer.add(arr.astype(np.uint16), None if counts is None else np.concatenate([[0], counts]))  # BOS: 0 bytes
                total += len(arr)
            bar.update(len(batch))
    shards = writer.close()
    assert sum(s["tokens"] for s in shards) == total
    return {
        "documents": len(docs),
        "tokens": total,
        "text_bytes": sum(len(d.text.encode("utf-8")) for d in docs),
        "shards": shards,
    }


def _val_count(n: int, val_docs: int | None, val_fraction: float | None) -> int:
    if val_docs is not None and val_fraction is not None:
        raise CorpusError("give val_docs or val_fraction, not both")
    if val_docs is not None:
        if val_docs < 1:
            raise CorpusError(f"val_docs must be at least 1, got {val_docs}")
        n_val = int(val_docs)
    else:
        frac = DEFAULT_VAL_FRACTION if val_fraction is None else float(val_fraction)
        if not 0.0 < frac < 1.0:
            raise CorpusError(f"val_fraction must be in (0, 1), got {frac}")
        n_val = max(1, round(n * frac))
    if n_val >= n:
        raise CorpusError(
            f"the corpus has {n} document(s) and {n_val} would go to validation; at least one "
            "validation and one training document are needed (add documents or lower val_docs/val_fraction)"
        )
    return n_val


def _copy_tokenizer(src: Path, dest_dir: Path) -> None:
    shutil.copyfile(src, dest_dir / TOKENIZER_NAME)
    vocab = src.with_suffix(".vocab")
    if vocab.is_file():
        shutil.copyfile(vocab, dest_dir / "tokenizer.vocab")


def build_dataset(
    inputs: Sequence[str | os.PathLike] | None,
    out_dir: str | os.PathLike,
    *,
    documents: Iterable[Document] | None = None,
    vocab_size: int = 1024,
    tokenizer: str | os.PathLike | None = None,
    val_docs: int | None = None,
    val_fraction: float | None = None,
    seed: int = 1337,
    shard_tokens: int = 100_000_000,
    byte_fallback: bool = True,
    shuffle: bool = True,
    force: bool = False,
    progress: bool = True,
    source_names: list[str] | None = None,
    max_input_bytes: int = MAX_INPUT_BYTES,
    transform: str | None = None,
) -> dict:
    """Build an official-format dataset in `out_dir` from text; return its manifest.

    Either `inputs` (paths) or `documents` is given. With `tokenizer`, that SentencePiece model is
    used (and copied in; its size overrides `vocab_size`); otherwise one is trained on the train
    documents only. `seed` draws the validation documents and then, with `shuffle` (the default),
    the order of the training documents; validation documents always keep their source order.
    Each input file must be a regular file of at most `max_input_bytes`. The directory appears
    complete or not at all.

    `transform` (``loopgolf.data.caseops``; default: the one a given `tokenizer` declares, else
    none) is applied to every document before tokenizing; a tokenizer trained here for it uses
    the lossless SentencePiece settings and keeps the transform's operators as single pieces.
    The validation shards then get byte sidecars, the tokenizer a ``tokenizer.transform.json``
    declaration and the manifest a ``text_transform``; ``text_bytes`` stays the original text's.
    """
    out_dir = Path(out_dir)
    # Cheap checks first: a bad argument should not cost a pass over a large corpus.
    if (inputs is None) == (documents is None):
        raise CorpusError("give either inputs (paths) or documents, exactly one of them")
    if shard_tokens < 1:
        raise CorpusError(f"shard_tokens must be positive, got {shard_tokens}")
    if max_input_bytes < 1:
        raise CorpusError(f"max_input_bytes must be positive, got {max_input_bytes}")
    if val_docs is not None and val_fraction is not None:
        raise CorpusError("give val_docs or val_fraction, not both")
    if out_dir.exists() and not out_dir.is_dir():
        raise CorpusError(f"output {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise CorpusError(f"output directory {out_dir} exists and is not empty; pass force=True (--force) to replace it")
    tokenizer_path = Path(tokenizer) if tokenizer is not None else None
    if tokenizer_path is not None:
        try:
            sp_given = load_tokenizer(tokenizer_path)  # fails fast on a missing or invalid model
        except TokenizerError as e:
            raise CorpusError(str(e)) from e
        vocab_size = int(sp_given.get_piece_size())
    elif not 0 < vocab_size <= MAX_VOCAB:
        raise CorpusError(f"vocab_size must be in [1, {MAX_VOCAB}] (shards store uint16), got {vocab_size}")
    try:
        tf = get_transform(transform) if transform is not None else None
        given_tf = read_declaration(tokenizer_path) if tokenizer_path is not None else None
    except (TransformError, SidecarError) as e:
        raise CorpusError(str(e)) from None
    if given_tf is not None and tf is not None and given_tf.name != tf.name:
        raise CorpusError(f"tokenizer {tokenizer_path} declares the text transform {given_tf.name!r}, not {tf.name!r}")
    tf = tf or given_tf
    if tf is not None and not tf.is_identity and tokenizer_path is None and not byte_fallback:
        raise CorpusError(f"the {tf.name} transform needs a tokenizer with byte fallback (it must spell back every character); drop --no-byte-fallback")

    if inputs is not None:
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        _expand_inputs(inputs, max_input_bytes)  # path errors before any reading
        docs = list(tqdm(iter_documents(inputs, max_bytes=max_input_bytes), desc="read", unit="doc", disable=not progress))
        sources = list(source_names) if source_names is not None else [str(p) for p in inputs]
    else:
        docs = [d for d in documents if d.text.strip()]  # type: ignore[union-attr]
        sources = list(source_names) if source_names is not None else []
    if not docs:
        raise CorpusError(f"empty corpus: no non-empty documents in {', '.join(sources) or 'the given documents'}")

    n_val = _val_count(len(docs), val_docs, val_fraction)
    rng = random.Random(seed)
    val_idx = set(rng.sample(range(len(docs)), n_val))  # first draw: the split does not depend on `shuffle`
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]  # source order: a fixed split
    if shuffle:
        rng.shuffle(train)

    if tf is not None:
        from loopgolf.data.sidecar_build import LOSSLESS_TRAINER_SETTINGS, write_declaration  # dataset preparation only: not in a run's counted code
    tmp_name = None
    try:
        with atomic_directory(out_dir, overwrite=force) as tmp:
            tmp_name = str(tmp)
            if tokenizer_path is not None:
                _copy_tokenizer(tokenizer_path, tmp)
            elif tf is not None and not tf.is_identity:
                lossless = dict(LOSSLESS_TRAINER_SETTINGS, user_defined_symbols=list(tf.reserved))
                train_tokenizer((tf.encode(d.text) for d in train), vocab_size, tmp / "tokenizer", seed=seed, extra_settings=lossless)
            else:
                train_tokenizer((d.text for d in train), vocab_size, tmp / "tokenizer", byte_fallback=byte_fallback, seed=seed)
            if tf is not None:
                write_declaration(tmp / TOKENIZER_NAME, tf)
            sp = load_tokenizer(tmp / TOKENIZER_NAME)
            vocab_size = int(sp.get_piece_size())  # the trainer may not reach the requested size
            if vocab_size > MAX_VOCAB:
                raise CorpusError(f"tokenizer has {vocab_size} pieces; shards store uint16 ids (max {MAX_VOCAB})")
            splits = {
                "train": _write_split(sp, train, tmp, "train", shard_tokens, vocab_size, progress, tf),
                "val": _write_split(sp, val, tmp, "val", shard_tokens, vocab_size, progress, tf),
            }
            val_text = "\n".join(d.text for d in val).encode("utf-8")
            splits["val"]["text_xz_bytes"] = len(lzma.compress(val_text, preset=_XZ_PRESET))
            manifest = {
                "format": MANIFEST_FORMAT,
                "version": MANIFEST_VERSION,
                "loopgolf_version": __version__,
                "sources": sources,
                "tokenizer": TOKENIZER_NAME,
                "tokenizer_sha256": tokenizer_sha256(tmp / TOKENIZER_NAME),  # checked where the shards are
                "tokenizer_trained": tokenizer_path is None,
                "vocab_size": vocab_size,
                "seed": seed,
                "train_order": "shuffled" if shuffle else "source",
                "shuffle_seed": seed if shuffle else None,
                "shard_tokens": shard_tokens,
                **({"text_transform": tf.name} if tf is not None else {}),
                "splits": splits,
            }
            atomic_write_json(tmp / MANIFEST_NAME, manifest)
    except (ShardError, TokenizerError, SidecarError) as e:
        # Name the output directory, not the temporary one that no longer exists.
        msg = str(e).replace(tmp_name, str(out_dir)) if tmp_name else str(e)
        raise CorpusError(msg) from e
    return manifest


# --------------------------------------------------------------------------------------------
# Reading, verifying and scoring a dataset
# --------------------------------------------------------------------------------------------


def verify_dataset(data_dir: str | os.PathLike, *, splits: Sequence[str] = ("train", "val"), cache: dict | None = None) -> None:
    """Check the shards of `splits` and the tokenizer against the manifest (see
    `loopgolf.data.dataset`: the manifest's fields, the file set, sizes and sha256 of the shards
    (`cache` None hashes every file afresh), the tokenizer's sha256). Without a manifest, only the shard headers can be checked (official
    downloads have none). Raises CorpusError naming the first bad file.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CorpusError(f"dataset directory {data_dir} does not exist")
    manifest = load_manifest(data_dir)
    if manifest is None:
        found = sorted(data_dir.glob("fineweb_*_*.bin"))
        if not found:
            raise CorpusError(f"{data_dir} has neither {MANIFEST_NAME} nor fineweb_*.bin shards")
        for path in found:
            try:
                read_shard_header(path)
            except ShardError as e:
                raise CorpusError(str(e)) from e
        return
    verify_shards(data_dir, manifest, splits, cache)
    verify_tokenizer(data_dir, manifest)


def _official_tokenizer_guess(data_dir: Path) -> Path | None:
    """Official layout: OUT/datasets/fineweb10B_sp1024 -> OUT/tokenizers/fineweb_1024_bpe.model."""
    m = re.search(r"_sp(\d+)$", data_dir.resolve().name)
    if not m:
        return None
    path = data_dir.resolve().parent.parent / "tokenizers" / f"fineweb_{m.group(1)}_bpe.model"
    return path if path.is_file() else None


@dataclass(frozen=True)
class XzBaseline:
    """xz's bits per byte on the validation text (see `baseline_xz_bpb`).

    `approximate` is True when the text had to be decoded from the shards: decoding gives the
    tokenizer-normalized text (runs of whitespace and newlines become single spaces, text the
    tokenizer could not represent becomes " ⁇ "), so the figure is close to, not exactly, xz on
    the original documents. `unknown_targets` is then the number of validation targets that are
    the unknown piece, each standing for original text the figure never saw; it is 0 when the
    figure comes from the original text (the manifest).
    """

    bpb: float
    approximate: bool
    unknown_targets: int


def baseline_xz_bpb(data_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None, progress: bool = False) -> XzBaseline:
    """Bits per byte of xz (preset 9) on the validation text: the score any model should beat.

    Exact from the manifest when it records the original text's numbers (datasets built here).
    Otherwise (official downloads) the val shards are decoded with the dataset's tokenizer
    (documents split at BOS, joined by newlines) and the result is marked approximate, with the
    count of unknown-piece targets.
    """
    data_dir = Path(data_dir)
    try:
        manifest = load_manifest(data_dir)
    except CorpusError:
        manifest = None  # only reached unchecked (--no-verify-data): decode the shards instead
    if manifest is not None:
        val = manifest["splits"].get("val", {})
        if val.get("text_xz_bytes") and val.get("text_bytes"):
            return XzBaseline(bpb=8.0 * val["text_xz_bytes"] / val["text_bytes"], approximate=False, unknown_targets=0)
    if tokenizer is None:
        own = data_dir / (manifest or {}).get("tokenizer", TOKENIZER_NAME)
        tokenizer = own if own.is_file() else _official_tokenizer_guess(data_dir)
        if tokenizer is None:
            raise CorpusError(f"{data_dir}: no tokenizer found to decode the validation shards; pass one")
    sp = load_tokenizer(tokenizer)
    try:
        paths = find_shards(data_dir, "val")
    except ValueError as e:
        raise CorpusError(str(e)) from e
    # Concatenated first: a document may straddle a shard boundary.
    tokens = load_tokens(paths)
    unk_id = int(sp.unk_id())
    # Targets are every token but the first, as in val_bpb; unk_id is -1 when the model has none.
    unknown = int(np.count_nonzero(tokens[1:] == unk_id)) if unk_id >= 0 else 0
    starts = np.flatnonzero(tokens == BOS_ID).tolist()
    bounds = sorted({0, *starts, len(tokens)})
    compressor = lzma.LZMACompressor(preset=_XZ_PRESET)
    xz_bytes = text_bytes = 0
    segments = list(zip(bounds[:-1], bounds[1:]))
    for k, (a, b) in enumerate(tqdm(segments, desc="decode val", unit="doc", disable=not progress)):
        ids = tokens[a:b].tolist()
        if ids[0] == BOS_ID:
            ids = ids[1:]
        data = (("\n" if k else "") + sp.decode(ids)).encode("utf-8")
        text_bytes += len(data)
        xz_bytes += len(compressor.compress(data))
    xz_bytes += len(compressor.flush())
    if text_bytes == 0:
        raise CorpusError(f"{data_dir}: validation shards decode to no text")
    return XzBaseline(bpb=8.0 * xz_bytes / text_bytes, approximate=True, unknown_targets=unknown)

"""One prepared dataset directory: its train/val shards, tokenizer and official byte tables.

What both training (``loopgolf run``) and scoring (``loopgolf eval``) open; it imports no training
code. It also holds the manifest checks (read and verify ``manifest.json``) that
``loopgolf.data.corpus`` re-exports: they run on every open, so they live on the counted path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np

from loopgolf.data.shards import find_shards, load_tokens
from loopgolf.data.stats import find_tokenizer
from loopgolf.data.tokenizer import ByteTables, build_byte_tables, load_tokenizer

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "loopgolf-dataset"
MANIFEST_VERSION = 1
SKIP_FLAG = "--no-verify-data"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
# A digest is cached only for a file last modified at least this long before it was hashed:
# a write within the file system's timestamp granularity (coarse kernel clock, 1-2 s on some
# network/FAT file systems) would otherwise leave (size, mtime_ns, inode) unchanged.
_RACY_NS = 2_000_000_000
# sha256 of shard files by (resolved path, size, st_mtime_ns, st_ino): one hash per file per process.
_SHA256_CACHE: dict[tuple[str, int, int, int], str] = {}


class CorpusError(ValueError):
    """Bad corpus input (missing file, bad encoding or JSON) or a bad/corrupt dataset directory."""


def load_manifest(data_dir: str | os.PathLike) -> dict | None:
    """The dataset's manifest, or None when it has none (e.g. an official FineWeb download)."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorpusError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CorpusError(f'{path}: not a loopgolf dataset manifest (no "format": "{MANIFEST_FORMAT}")')
    if manifest.get("version") != MANIFEST_VERSION:
        raise CorpusError(f"{path}: unsupported manifest version {manifest.get('version')!r} (expected {MANIFEST_VERSION})")
    return manifest


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stat_key(path: Path, st: os.stat_result) -> tuple[str, int, int, int]:
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def _sha256(path: Path, st: os.stat_result, cache: dict | None) -> str:
    """`path`'s sha256, from `cache` when its stat key (taken as `st`) is there; else hashed and
    cached, unless the file changed while being read or was modified too recently to trust."""
    if cache is None:
        return _file_sha256(path)
    key = _stat_key(path, st)
    digest = cache.get(key)
    if digest is None:
        now = time.time_ns()
        digest = _file_sha256(path)
        if now - st.st_mtime_ns >= _RACY_NS and _stat_key(path, path.stat()) == key:
            cache[key] = digest
    return digest


def _shard_entries(manifest: dict, where: Path, splits: Sequence[str]) -> dict[str, list[dict]]:
    """The manifest's shard entries of `splits`, checked for shape; CorpusError naming what is wrong."""
    table = manifest.get("splits")
    if not isinstance(table, dict):
        raise CorpusError(f'{where}: malformed manifest: no "splits" table')
    out = {}
    for split in splits:
        entries = table[split].get("shards") if isinstance(table.get(split), dict) else None
        if not isinstance(entries, list):
            raise CorpusError(f'{where}: malformed manifest: split {split!r} has no "shards" list')
        pattern = f"fineweb_{split}_*.bin"
        checks = (
            ("file", lambda v: isinstance(v, str) and fnmatchcase(v, pattern) and "/" not in v and os.sep not in v, f"a {pattern} file name"),
            ("bytes", lambda v: type(v) is int and v >= 0, "a byte count"),
            ("sha256", lambda v: isinstance(v, str) and _HEX64.fullmatch(v) is not None, "64 hex digits"),
        )
        seen = set()
        for i, entry in enumerate(entries):
            at = f"{where}: malformed manifest: splits.{split}.shards[{i}]"
            if not isinstance(entry, dict):
                raise CorpusError(f"{at} is {type(entry).__name__}, not an object with file, bytes and sha256")
            for key, ok, what in checks:
                if key not in entry:
                    raise CorpusError(f"{at} has no {key!r}")
                if not ok(entry[key]):
                    raise CorpusError(f"{at}: {key!r} must be {what}, got {entry[key]!r:.80}")
            if entry["file"] in seen:
                raise CorpusError(f"{at}: {entry['file']} is listed twice")
            seen.add(entry["file"])
        out[split] = entries
    return out


def verify_shards(data_dir: Path, manifest: dict, splits: Sequence[str] = ("train", "val"), cache: dict | None = None) -> None:
    """Check the shards of `splits` against `manifest`: its shape, then the file set (every listed
    shard present, no unlisted ``fineweb_{split}_*.bin``) and every size (stats only, all splits),
    then every sha256 (reading each file; `cache`, when given, maps stat keys to digests so an
    unchanged file is read once). Raises CorpusError naming the manifest or the first bad file."""
    data_dir = Path(data_dir)
    if isinstance(splits, str):
        splits = (splits,)
    todo = []
    for split, entries in _shard_entries(manifest, data_dir / MANIFEST_NAME, splits).items():
        listed = {e["file"] for e in entries}
        # A stray shard would be picked up by find_shards and silently change the data.
        extra = sorted(p.name for p in data_dir.glob(f"fineweb_{split}_*.bin") if p.name not in listed)
        if extra:
            raise CorpusError(f"{data_dir / extra[0]}: shard not listed in {MANIFEST_NAME}")
        for entry in entries:
            path = data_dir / entry["file"]
            try:
                st = path.stat()
            except OSError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                raise CorpusError(f"{path}: shard listed in {MANIFEST_NAME} is missing")
            if st.st_size != entry["bytes"]:
                raise CorpusError(f"{path}: {st.st_size} bytes, manifest says {entry['bytes']}")
            todo.append((path, st, entry["sha256"].lower()))
    for path, st, want in todo:
        digest = _sha256(path, st, cache)
        if digest != want:
            raise CorpusError(f"{path}: sha256 {digest[:16]}... does not match the manifest ({want[:16]}...)")


@dataclass
class Dataset:
    """Shards, tokenizer and byte tables of one prepared dataset directory.

    :meth:`open` verifies a dataset built by loopgolf (one with a ``manifest.json``) before using
    it, for the shards of `splits` only: the manifest's shape (its ``splits`` table, a ``shards``
    list per split, ``file``/``bytes``/``sha256`` per entry), the file set (no listed shard
    missing, no unlisted ``fineweb_{split}_*.bin``), each shard's size, then each shard's sha256.
    Cost: one stat per shard, plus reading every byte once per process (0.12 s for a 100M-token,
    200 MB shard from the page cache, about 1.6 GB/s on one core; from a cold disk, the disk's read
    time). The digest is cached by (resolved path, size, mtime_ns, inode), so a second open in the
    same process only stats, unless the file changed or was modified under 2 s before it was
    hashed. A change after `open` returns is not noticed. ``verify=False`` (``--no-verify-data``)
    skips all of it. Datasets without a manifest (official FineWeb downloads) open unchecked.
    """

    root: Path
    train_shards: list[Path]
    val_shards: list[Path]
    tokenizer_path: Path
    vocab_size: int
    tables: ByteTables

    @classmethod
    def open(cls, root: Path, tokenizer: Path | None = None, *, verify: bool = True, splits: Sequence[str] = ("train", "val")) -> Dataset:
        root = Path(root)
        if not root.is_dir():
            what = "is a file, not a dataset directory" if root.exists() else "does not exist"
            raise ValueError(f"data directory {root} {what} (a directory of fineweb_*.bin shards and a tokenizer)")
        if verify:
            try:
                manifest = load_manifest(root)
                if manifest is not None:
                    verify_shards(root, manifest, splits, _SHA256_CACHE)
            except CorpusError as e:
                raise CorpusError(f"{e}; rebuild the dataset (loopgolf data build), or pass {SKIP_FLAG} to use it unchecked") from None
        tok = Path(tokenizer) if tokenizer else find_tokenizer(root)
        if tok is None:
            raise ValueError(f"no tokenizer found for {root}: pass --tokenizer MODEL (a SentencePiece .model file)")
        sp = load_tokenizer(tok)
        vocab = sp.get_piece_size()
        return cls(root, find_shards(root, "train"), find_shards(root, "val"), tok, vocab, build_byte_tables(sp, vocab))

    def val_tokens(self) -> np.ndarray:
        return load_tokens(self.val_shards, vocab_size=self.vocab_size)

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
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np

from loopgolf.data.caseops import IDENTITY, TRANSFORMS
from loopgolf.data.shards import find_shards, load_tokens
from loopgolf.data.sidecar import (
    SidecarError,
    SidecarTables,
    check_sidecar,
    declaration_path,
    find_val_sidecars,
    load_val_sidecars,
    piece_text,
    read_declaration,
)
from loopgolf.data.stats import find_tokenizer
from loopgolf.data.tokenizer import ByteTables, build_byte_tables, load_tokenizer

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "loopgolf-dataset"
MANIFEST_VERSION = 1
SKIP_FLAG = "--no-verify-data"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_MAX_MANIFEST_BYTES = 64 * 2**20  # a manifest lists a few hundred shards; anything far bigger is not one
_MAX_TOKENIZER_BYTES = 256 * 2**20  # a 65536-piece SentencePiece model is about 1 MB
_WARNED: set[str] = set()  # manifests already warned about (once per process)
# A digest is cached only for a file last modified at least this long before it was hashed:
# a write within the file system's timestamp granularity (coarse kernel clock, 1-2 s on some
# network/FAT file systems) would otherwise leave (size, mtime_ns, inode) unchanged.
_RACY_NS = 2_000_000_000
# sha256 of shard files by (resolved path, size, st_mtime_ns, st_ino): one hash per file per process.
_SHA256_CACHE: dict[tuple[str, int, int, int], str] = {}
# Validation data whose byte sidecar passed check_sidecar, by the stat keys of every file involved.
_SIDECAR_CHECKED: set[tuple] = set()


class CorpusError(ValueError):
    """Bad corpus input (missing file, bad encoding or JSON) or a bad/corrupt dataset directory."""


def _nat(v) -> bool:
    return type(v) is int and v >= 0


def _hex64(v) -> bool:
    return isinstance(v, str) and _HEX64.fullmatch(v) is not None


def _relative_name(v) -> bool:
    return isinstance(v, str) and v != "" and not Path(v).is_absolute() and ".." not in Path(v).parts


# Manifest fields, checked when present (older manifests lack some): (name, test, what it must be).
_FIELDS = (
    ("loopgolf_version", lambda v: isinstance(v, str), "a string"),
    ("sources", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    ("tokenizer", _relative_name, "a file name inside the dataset directory"),
    ("tokenizer_trained", lambda v: type(v) is bool, "true or false"),
    ("tokenizer_sha256", _hex64, "64 hex digits"),
    ("vocab_size", lambda v: type(v) is int and 1 <= v <= 1 << 16, "an integer in [1, 65536]"),
    ("seed", lambda v: type(v) is int, "an integer"),
    ("train_order", lambda v: v in ("shuffled", "source"), '"shuffled" or "source"'),
    ("shuffle_seed", lambda v: v is None or type(v) is int, "an integer or null"),
    ("shard_tokens", lambda v: type(v) is int and v >= 1, "a positive integer"),
    ("text_transform", lambda v: v in TRANSFORMS, f"a known text transform ({', '.join(TRANSFORMS)})"),
)
_SPLIT_FIELDS = ("documents", "tokens", "text_bytes", "text_xz_bytes")  # non-negative integers when present


def check_manifest(manifest: dict, where: Path) -> None:
    """Every field of a loaded manifest has its type (what later reads it, e.g. the xz baseline at
    the end of a run, relies on it): CorpusError naming the file and the field."""
    for key, ok, what in _FIELDS:
        if key in manifest and not ok(manifest[key]):
            raise CorpusError(f"{where}: malformed manifest: {key!r} must be {what}, got {manifest[key]!r:.80}")
    table = manifest.get("splits")
    if not isinstance(table, dict):
        raise CorpusError(f'{where}: malformed manifest: no "splits" table')
    for split, info in table.items():
        if not isinstance(info, dict):
            raise CorpusError(f'{where}: malformed manifest: split {split!r} has no "shards" list')
        for key in _SPLIT_FIELDS:
            if key in info and not _nat(info[key]):
                raise CorpusError(f"{where}: malformed manifest: splits.{split}.{key} must be a non-negative integer, got {info[key]!r:.80}")
        _shard_entries(manifest, where, (split,))


def load_manifest(data_dir: str | os.PathLike) -> dict | None:
    """The dataset's manifest, checked (:func:`check_manifest`), or None when it has none (e.g. an
    official FineWeb download)."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    if path.stat().st_size > _MAX_MANIFEST_BYTES:
        raise CorpusError(f"{path}: {path.stat().st_size:,} bytes, not a manifest loopgolf writes")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorpusError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CorpusError(f'{path}: not a loopgolf dataset manifest (no "format": "{MANIFEST_FORMAT}")')
    if manifest.get("version") != MANIFEST_VERSION:
        raise CorpusError(f"{path}: unsupported manifest version {manifest.get('version')!r} (expected {MANIFEST_VERSION})")
    check_manifest(manifest, path)
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
        checks = (  # (key, required, test, what it must be)
            ("file", True, lambda v: isinstance(v, str) and fnmatchcase(v, pattern) and "/" not in v and os.sep not in v, f"a {pattern} file name"),
            ("bytes", True, _nat, "a byte count"),
            ("sha256", True, _hex64, "64 hex digits"),
            ("tokens", False, _nat, "a token count"),
        )
        seen = set()
        for i, entry in enumerate(entries):
            at = f"{where}: malformed manifest: splits.{split}.shards[{i}]"
            if not isinstance(entry, dict):
                raise CorpusError(f"{at} is {type(entry).__name__}, not an object with file, bytes and sha256")
            for key, required, ok, what in checks:
                if key not in entry:
                    if required:
                        raise CorpusError(f"{at} has no {key!r}")
                elif not ok(entry[key]):
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


def tokenizer_sha256(path: Path) -> str:
    """sha256 of a tokenizer file: a regular file (a symlink to one is fine) of a bounded size."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CorpusError(f"{path}: tokenizer cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_TOKENIZER_BYTES:
        raise CorpusError(f"{path}: not a tokenizer model (a regular file of at most {_MAX_TOKENIZER_BYTES:,} bytes)")
    with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:  # a FIFO swapped in cannot block
        return hashlib.sha256(f.read(_MAX_TOKENIZER_BYTES + 1)).hexdigest()


def verify_tokenizer(data_dir: Path, manifest: dict, tokenizer: Path | None = None) -> Path:
    """Check `tokenizer` (default: the manifest's own) against the sha256 the manifest recorded when
    the shards were encoded with it (a different tokenizer gives a wrong val_bpb, silently). A
    manifest from before loopgolf recorded it has none: a warning says so (once per process) and
    the tokenizer is used unchecked. Returns the tokenizer's path."""
    where = Path(data_dir) / MANIFEST_NAME
    tok = Path(tokenizer) if tokenizer is not None else Path(data_dir) / manifest.get("tokenizer", "tokenizer.model")
    if tokenizer is None and not tok.is_file():
        raise CorpusError(f"{tok}: tokenizer listed in {where} is missing")
    want = manifest.get("tokenizer_sha256")
    if want is None:
        if str(where) not in _WARNED:
            _WARNED.add(str(where))
            print(
                f"loopgolf: warning: {where} records no tokenizer_sha256 (made by an older loopgolf), so {tok} is not checked "
                "against the tokenizer the shards were encoded with; rebuild the dataset to have it checked",
                file=sys.stderr,
            )
        return tok
    got = tokenizer_sha256(tok)
    if got != want.lower():
        raise CorpusError(f"{tok}: sha256 {got[:16]}... is not the tokenizer the shards were encoded with ({where} says {want[:16]}...)")
    return tok


def val_byte_counts(
    root: Path, tok: Path, sp, val_shards: list[Path], tables: ByteTables, manifest: dict | None, check: bool
) -> tuple[ByteTables | SidecarTables, str]:
    """What scoring counts as the bytes of the validation targets, and the tokenizer's transform.

    The transform is what the tokenizer declares (its ``.transform.json``; none: identity), and a
    manifest that records one must agree. Sidecars beside the validation shards, when there are
    any, give the counts (all shards need one; each is checked against its shard); a tokenizer
    that transforms the text and has none is an error, never piece bytes. With `check`, the
    sidecar's sum per document is compared with the decoded original text, once per process per
    unchanged set of files (:func:`loopgolf.data.sidecar.check_sidecar`)."""
    declared = read_declaration(tok) or IDENTITY
    if manifest is not None and manifest.get("text_transform", IDENTITY.name) != declared.name:
        raise SidecarError(
            f"{root / MANIFEST_NAME} says the text was transformed with {manifest.get('text_transform', IDENTITY.name)!r}, "
            f"but tokenizer {tok} declares {declared.name!r} (in {declaration_path(tok).name}; none means identity)"
        )
    sidecars = find_val_sidecars(val_shards)
    if sidecars is None:
        if not declared.is_identity:
            raise SidecarError(
                f"tokenizer {tok} declares the text transform {declared.name!r}, but the validation shards in {root} have no byte sidecars "
                f"(fineweb_val_*.bytes): its pieces do not spell the original text, so val_bpb cannot be counted; rebuild the data with "
                f"`loopgolf data build --transform {declared.name}`"
            )
        return tables, declared.name
    counts = load_val_sidecars(val_shards, sidecars, declared)
    if check:
        files = [*val_shards, *sidecars, tok] + ([declaration_path(tok)] if declaration_path(tok).is_file() else [])
        key = tuple(_stat_key(p, p.stat()) for p in files)
        if key not in _SIDECAR_CHECKED:
            check_sidecar(load_tokens(val_shards), counts, piece_text(sp), declared, where=f"validation data in {root}")
            _SIDECAR_CHECKED.add(key)
    return SidecarTables(tables, counts, declared.name, f"the validation data in {root}"), declared.name


def _unchecked_hint(e: CorpusError) -> CorpusError:
    return CorpusError(f"{e}; rebuild the dataset (loopgolf data build), or pass {SKIP_FLAG} to use it unchecked")


@dataclass
class Dataset:
    """Shards, tokenizer and byte tables of one prepared dataset directory.

    :meth:`open` verifies a dataset built by loopgolf (one with a ``manifest.json``) before using
    it, for the shards of `splits` only: the manifest's shape (its ``splits`` table, a ``shards``
    list per split, ``file``/``bytes``/``sha256`` per entry, every other field's type), the file
    set (no listed shard missing, no unlisted ``fineweb_{split}_*.bin``), each shard's size, then
    each shard's sha256, and the tokenizer: its sha256 (:func:`verify_tokenizer`; a manifest
    without one gets a warning) and its piece count against the manifest's ``vocab_size``.
    Cost: one stat per shard, plus reading every byte once per process (0.12 s for a 100M-token,
    200 MB shard from the page cache, about 1.6 GB/s on one core; from a cold disk, the disk's read
    time). The digest is cached by (resolved path, size, mtime_ns, inode), so a second open in the
    same process only stats, unless the file changed or was modified under 2 s before it was
    hashed. A change after `open` returns is not noticed. ``verify=False`` (``--no-verify-data``)
    skips all of it. Datasets without a manifest (official FineWeb downloads) open unchecked.

    A tokenizer that declares a text transform needs byte sidecars beside the validation shards
    (:func:`val_byte_counts`); `tables` are then :class:`SidecarTables`. The sidecars' headers,
    sizes and token counts are always checked; their sums against the decoded text only when
    verifying with ``val`` among `splits`.
    """

    root: Path
    train_shards: list[Path]
    val_shards: list[Path]
    tokenizer_path: Path
    vocab_size: int
    tables: ByteTables | SidecarTables
    transform: str = IDENTITY.name

    @classmethod
    def open(cls, root: Path, tokenizer: Path | None = None, *, verify: bool = True, splits: Sequence[str] = ("train", "val")) -> Dataset:
        root = Path(root)
        if not root.is_dir():
            what = "is a file, not a dataset directory" if root.exists() else "does not exist"
            raise ValueError(f"data directory {root} {what} (a directory of fineweb_*.bin shards and a tokenizer)")
        manifest = None
        if verify:
            try:
                manifest = load_manifest(root)
                if manifest is not None:
                    verify_shards(root, manifest, splits, _SHA256_CACHE)
            except CorpusError as e:
                raise _unchecked_hint(e) from None
        tok = Path(tokenizer) if tokenizer else find_tokenizer(root)
        if tok is None:
            raise ValueError(f"no tokenizer found for {root}: pass --tokenizer MODEL (a SentencePiece .model file)")
        try:
            if manifest is not None:
                verify_tokenizer(root, manifest, tok)
            sp = load_tokenizer(tok)
            vocab = sp.get_piece_size()
            if manifest is not None and manifest.get("vocab_size", vocab) != vocab:
                raise CorpusError(f"{tok} has {vocab} pieces but {root / MANIFEST_NAME} says vocab_size {manifest['vocab_size']}")
        except CorpusError as e:
            raise _unchecked_hint(e) from None
        train_shards, val_shards = find_shards(root, "train"), find_shards(root, "val")
        tables, transform = val_byte_counts(root, tok, sp, val_shards, build_byte_tables(sp, vocab), manifest, verify and "val" in splits)
        return cls(root, train_shards, val_shards, tok, vocab, tables, transform)

    def val_tokens(self) -> np.ndarray:
        return load_tokens(self.val_shards, vocab_size=self.vocab_size)

"""Dataset.open checks a loopgolf-built dataset against its manifest (loopgolf.data.dataset)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from loopgolf.data import dataset as dataset_mod
from loopgolf.data.corpus import CorpusError, load_manifest, verify_dataset
from loopgolf.data.dataset import Dataset
from loopgolf.data.shards import HEADER_BYTES

_HOUR_NS = 3600 * 10**9


def _set_mtime(path: Path, ns: int) -> None:
    os.utime(path, ns=(ns, ns))


@pytest.fixture
def ds(text_dataset, tmp_path) -> Path:
    """A private copy of the session's built dataset, its files dated an hour back (old enough
    for their digests to be cached)."""
    copy = tmp_path / "ds"
    shutil.copytree(text_dataset, copy)
    old = time.time_ns() - _HOUR_NS
    for p in copy.iterdir():
        _set_mtime(p, old)
    return copy


@pytest.fixture
def hash_calls(monkeypatch) -> list[Path]:
    """Every file Dataset.open hashes; the digest cache starts empty."""
    calls: list[Path] = []
    real = dataset_mod._file_sha256

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(dataset_mod, "_file_sha256", counting)
    monkeypatch.setattr(dataset_mod, "_SHA256_CACHE", {})
    return calls


def _shard(root: Path, split: str) -> Path:
    return root / load_manifest(root)["splits"][split]["shards"][0]["file"]


def _change_one_token(path: Path, keep_mtime: bool = True) -> None:
    """Flip one token of the body in place (same size, same inode)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + 100)
        tok = np.frombuffer(f.read(2), dtype=np.uint16)[0]
        f.seek(HEADER_BYTES + 100)
        f.write(np.uint16(tok ^ 1).tobytes())
    if keep_mtime:
        _set_mtime(path, st.st_mtime_ns)
    assert path.stat().st_size == st.st_size and path.stat().st_ino == st.st_ino


def test_unmodified_dataset_opens(ds, hash_calls):
    d = Dataset.open(ds)
    assert d.train_shards == [_shard(ds, "train")] and d.val_shards == [_shard(ds, "val")]
    assert d.val_tokens().size == load_manifest(ds)["splits"]["val"]["tokens"]
    assert sorted(p.name for p in hash_calls) == sorted(p.name for p in (*d.train_shards, *d.val_shards))


def test_changed_token_is_refused_naming_the_shard(ds):
    victim = _shard(ds, "val")
    _change_one_token(victim, keep_mtime=False)
    with pytest.raises(CorpusError, match=victim.name) as e:
        Dataset.open(ds)
    msg = str(e.value)
    assert "sha256" in msg and "rebuild the dataset" in msg and "--no-verify-data" in msg


def test_truncated_shard_is_refused(ds, hash_calls):
    victim = _shard(ds, "train")
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(CorpusError, match=rf"{victim.name}: {size - 2} bytes, manifest says {size}"):
        Dataset.open(ds)
    assert hash_calls == []  # a size mismatch fails on stats, before any hashing


def test_unlisted_shard_is_refused(ds):
    shutil.copyfile(_shard(ds, "val"), ds / "fineweb_val_000007.bin")
    with pytest.raises(CorpusError, match="fineweb_val_000007.bin: shard not listed"):
        Dataset.open(ds)


def test_missing_listed_shard_is_refused(ds):
    victim = _shard(ds, "train")
    victim.unlink()
    with pytest.raises(CorpusError, match=f"{victim.name}: shard listed in manifest.json is missing"):
        Dataset.open(ds)


def _edit_manifest(root: Path, edit) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "edit, what",
    [
        (lambda m: m.pop("splits"), 'no "splits" table'),
        (lambda m: m["splits"].pop("val"), "split 'val' has no \"shards\" list"),
        (lambda m: m["splits"]["train"].pop("shards"), "split 'train' has no \"shards\" list"),
        (lambda m: m["splits"]["val"]["shards"][0].pop("sha256"), r"splits\.val\.shards\[0\] has no 'sha256'"),
        (lambda m: m["splits"]["val"]["shards"][0].pop("bytes"), r"splits\.val\.shards\[0\] has no 'bytes'"),
        (lambda m: m["splits"]["train"]["shards"][0].update(bytes="12"), r"'bytes' must be a byte count, got '12'"),
        (lambda m: m["splits"]["train"]["shards"][0].update(file="../x.bin"), r"'file' must be a fineweb_train_\*\.bin file name"),
        (lambda m: m["splits"]["val"]["shards"].__setitem__(0, "fineweb_val_000000.bin"), r"shards\[0\] is str"),
    ],
)
def test_malformed_manifest_is_refused_at_open(ds, hash_calls, edit, what):
    _edit_manifest(ds, edit)
    with pytest.raises(CorpusError, match=what) as e:
        Dataset.open(ds)
    assert str(ds / "manifest.json") in str(e.value) and "--no-verify-data" in str(e.value)
    assert hash_calls == []
    with pytest.raises(CorpusError, match=what):
        verify_dataset(ds)  # one implementation: the standalone check says the same


def test_verify_false_opens_a_modified_dataset(ds, hash_calls):
    _change_one_token(_shard(ds, "val"), keep_mtime=False)
    shutil.copyfile(_shard(ds, "train"), ds / "fineweb_train_000009.bin")
    _edit_manifest(ds, lambda m: m.pop("splits"))
    d = Dataset.open(ds, verify=False)
    assert len(d.train_shards) == 2 and hash_calls == []


def test_splits_limits_what_is_checked(ds, hash_calls):
    _change_one_token(_shard(ds, "train"), keep_mtime=False)
    d = Dataset.open(ds, splits=("val",))
    assert hash_calls == [_shard(ds, "val")] and d.val_shards == [_shard(ds, "val")]
    with pytest.raises(CorpusError, match=_shard(ds, "train").name):
        Dataset.open(ds)
    _edit_manifest(ds, lambda m: m["splits"].pop("train"))
    Dataset.open(ds, splits=("val",))  # only the val table is required


def test_second_open_does_not_rehash_and_a_change_does(ds, hash_calls):
    Dataset.open(ds)
    first = len(hash_calls)
    assert first == 2
    Dataset.open(ds)
    link = ds.parent / "link"
    link.symlink_to(ds, target_is_directory=True)
    Dataset.open(link)  # the key is the resolved path
    assert len(hash_calls) == first
    victim = _shard(ds, "val")
    _change_one_token(victim)  # same size, same inode, mtime restored: the cache cannot tell ...
    Dataset.open(ds)
    assert len(hash_calls) == first
    _set_mtime(victim, time.time_ns() - _HOUR_NS // 2)  # ... a new mtime_ns can
    with pytest.raises(CorpusError, match=victim.name):
        Dataset.open(ds)
    assert hash_calls[first:] == [victim]


def test_recently_modified_files_are_not_cached(ds, hash_calls):
    for p in ds.glob("fineweb_*.bin"):
        _set_mtime(p, time.time_ns())  # within the timestamp granularity: a later write might not show
    Dataset.open(ds)
    Dataset.open(ds)
    assert len(hash_calls) == 4


def test_datasets_without_manifest_open_unchecked(ds, hash_calls):
    (ds / "manifest.json").unlink()
    shutil.copyfile(ds / "fineweb_val_000000.bin", ds / "fineweb_val_000001.bin")
    d = Dataset.open(ds, tokenizer=ds / "tokenizer.model")
    assert len(d.val_shards) == 2 and hash_calls == []


def test_foreign_manifest_is_refused(ds):
    (ds / "manifest.json").write_text(json.dumps({"splits": {}}))
    with pytest.raises(CorpusError, match="not a loopgolf dataset manifest.*--no-verify-data"):
        Dataset.open(ds)

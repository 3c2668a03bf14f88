"""Dataset.open checks a loopgolf-built dataset against its manifest (loopgolf.data.dataset)."""

from __future__ import annotations

import hashlib
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


# --------------------------------------------------------------------------------------------
# The tokenizer is part of the data (issue 27): its sha256 is in the manifest and checked on open


def _other_tokenizer(tmp_path: Path, vocab_size: int) -> Path:
    """A different tokenizer of `vocab_size` pieces (trained on other text)."""
    from helpers import synthetic_documents

    from loopgolf.data.tokenizer import train_tokenizer

    docs = [d.upper() for d in synthetic_documents(200, seed=9)]
    return train_tokenizer(docs, vocab_size, tmp_path / "other", seed=2)


@pytest.fixture
def warned(monkeypatch) -> None:
    monkeypatch.setattr(dataset_mod, "_WARNED", set())


def test_manifest_records_the_tokenizer_sha256(ds):
    manifest = load_manifest(ds)
    assert manifest["tokenizer_sha256"] == hashlib.sha256((ds / "tokenizer.model").read_bytes()).hexdigest()


def test_swapped_tokenizer_is_refused(ds, tmp_path, capsys, warned):
    other = _other_tokenizer(tmp_path, load_manifest(ds)["vocab_size"])
    assert other.read_bytes() != (ds / "tokenizer.model").read_bytes()
    # Given explicitly (--tokenizer) instead of the dataset's own: refused.
    with pytest.raises(CorpusError, match=r"other\.model: sha256 .* is not the tokenizer the shards were encoded with .*--no-verify-data"):
        Dataset.open(ds, tokenizer=other)
    # Swapped in place: refused by Dataset.open, verify_dataset and `loopgolf run` (exit 2, before training).
    shutil.copyfile(other, ds / "tokenizer.model")
    with pytest.raises(CorpusError, match=r"tokenizer\.model: sha256 .* is not the tokenizer") as e:
        Dataset.open(ds)
    assert str(ds / "manifest.json") in str(e.value)
    with pytest.raises(CorpusError, match="is not the tokenizer the shards were encoded with"):
        verify_dataset(ds)
    from loopgolf.cli import main

    out = tmp_path / "run"
    assert main(["run", "--preset", "debug", "--data", str(ds), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not the tokenizer the shards were encoded with" in err and "--no-verify-data" in err
    assert not (out / "log.jsonl").exists()
    # The escape hatch still opens it.
    assert Dataset.open(ds, verify=False).tokenizer_path == ds / "tokenizer.model"


def test_manifest_without_tokenizer_hash_opens_with_a_warning(ds, tmp_path, capsys, warned):
    _edit_manifest(ds, lambda m: m.pop("tokenizer_sha256"))
    Dataset.open(ds)
    err = capsys.readouterr().err
    assert f"warning: {ds / 'manifest.json'} records no tokenizer_sha256" in err and "rebuild the dataset" in err
    Dataset.open(ds)
    assert capsys.readouterr().err == ""  # once per process
    verify_dataset(ds)
    # Without a hash, a tokenizer of another size is still caught by the piece count.
    shutil.copyfile(_other_tokenizer(tmp_path, 320), ds / "tokenizer.model")
    with pytest.raises(CorpusError, match=r"tokenizer\.model has 320 pieces but .*manifest\.json says vocab_size 384.*--no-verify-data"):
        Dataset.open(ds)


@pytest.mark.parametrize(
    "edit, what",
    [
        (lambda m: m.update(vocab_size="384"), r"'vocab_size' must be an integer in \[1, 65536\], got '384'"),
        (lambda m: m.update(vocab_size=0), r"'vocab_size' must be an integer"),
        (lambda m: m.update(tokenizer=5), r"'tokenizer' must be a file name inside the dataset directory, got 5"),
        (lambda m: m.update(tokenizer="../elsewhere.model"), r"'tokenizer' must be a file name inside the dataset directory"),
        (lambda m: m.update(tokenizer_sha256="abc"), r"'tokenizer_sha256' must be 64 hex digits"),
        (lambda m: m.update(tokenizer_trained="yes"), r"'tokenizer_trained' must be true or false"),
        (lambda m: m.update(sources="corpus/"), r"'sources' must be a list of strings"),
        (lambda m: m.update(seed=1.5), r"'seed' must be an integer"),
        (lambda m: m.update(train_order="random"), r"'train_order' must be \"shuffled\" or \"source\""),
        (lambda m: m.update(shuffle_seed="0"), r"'shuffle_seed' must be an integer or null"),
        (lambda m: m.update(shard_tokens=0), r"'shard_tokens' must be a positive integer"),
        (lambda m: m["splits"]["val"].update(text_xz_bytes="big"), r"splits\.val\.text_xz_bytes must be a non-negative integer, got 'big'"),
        (lambda m: m["splits"]["val"].update(text_bytes=-1), r"splits\.val\.text_bytes must be a non-negative integer, got -1"),
        (lambda m: m["splits"]["train"].update(tokens=1.5), r"splits\.train\.tokens must be a non-negative integer"),
        (lambda m: m["splits"]["train"].update(documents=True), r"splits\.train\.documents must be a non-negative integer"),
        (lambda m: m["splits"]["train"]["shards"][0].update(tokens="7"), r"splits\.train\.shards\[0\]: 'tokens' must be a token count"),
        (lambda m: m["splits"].update(val=5), r"split 'val' has no \"shards\" list"),
        (lambda m: m.update(splits=[]), r'no "splits" table'),
    ],
)
def test_wrongly_typed_manifest_fields_are_refused_at_open(ds, hash_calls, edit, what):
    """A wrong type fails when the dataset is opened, not after training (the xz baseline reads
    splits.val.text_xz_bytes when the run ends)."""
    _edit_manifest(ds, edit)
    with pytest.raises(CorpusError, match=what) as e:
        Dataset.open(ds)
    assert str(ds / "manifest.json") in str(e.value) and "--no-verify-data" in str(e.value)
    assert hash_calls == []
    with pytest.raises(CorpusError, match=what):
        load_manifest(ds)


def test_manifest_that_is_not_json_or_too_deep_or_too_big_is_refused(ds, monkeypatch):
    (ds / "manifest.json").write_text('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CorpusError, match=r"manifest\.json: not valid JSON \(RecursionError"):
        Dataset.open(ds)
    monkeypatch.setattr(dataset_mod, "_MAX_MANIFEST_BYTES", 100)
    (ds / "manifest.json").write_text(json.dumps({"format": "loopgolf-dataset", "pad": "x" * 200}))
    with pytest.raises(CorpusError, match=r"manifest\.json: \d+ bytes, not a manifest loopgolf writes"):
        Dataset.open(ds)


def test_xz_baseline_of_an_unchecked_malformed_manifest_decodes_the_shards(ds):
    """With --no-verify-data a run reaches the baseline with whatever manifest is there: it
    must not crash after training."""
    from loopgolf.data.corpus import baseline_xz_bpb

    exact = baseline_xz_bpb(ds)
    assert not exact.approximate
    _edit_manifest(ds, lambda m: m["splits"]["val"].update(text_xz_bytes="big"))
    Dataset.open(ds, verify=False)
    xz = baseline_xz_bpb(ds)
    assert xz.approximate and 0 < xz.bpb < 8

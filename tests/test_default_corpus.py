"""The embedded default corpus (loopgolf.data.default_corpus)."""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from loopgolf.data import default_corpus as dc
from loopgolf.data.corpus import baseline_xz_bpb, load_manifest, verify_dataset
from loopgolf.data.shards import BOS_ID, load_shard
from loopgolf.data.tokenizer import load_tokenizer


@pytest.fixture
def build_counter(monkeypatch):
    calls = []
    real = dc.build_dataset

    def counting(*args, **kwargs):
        calls.append(kwargs.get("vocab_size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dc, "build_dataset", counting)
    return calls


def test_documents_content_and_order():
    docs = dc.default_corpus_documents()
    topics = [d for d in docs if d.source.startswith("pydoc_data.topics:")]
    modules = [d for d in docs if d.source.startswith("stdlib:")]
    assert len(topics) + len(modules) == len(docs)
    assert docs[: len(topics)] == topics  # topics first, then modules
    assert [d.source for d in topics] == sorted(d.source for d in topics)
    names = [d.source.removeprefix("stdlib:") for d in modules]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert len(topics) > 50 and len(modules) > 200
    total = sum(len(d.text.encode("utf-8")) for d in docs)
    assert 1_000_000 < total < 3_000_000
    assert all(len(d.text) >= dc.MIN_MODULE_CHARS for d in modules)
    skipped = ("idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages")
    for name in names:
        parts = name.split(".")
        assert not set(parts) & {"test", "tests", *skipped}, name
    assert "json" in names and "collections" in names and "json.decoder" in names
    json_doc = docs[len(topics) + names.index("json")].text
    assert json_doc.startswith("JSON (JavaScript Object Notation)")  # module docstring first
    assert "Serialize ``obj``" in json_doc  # then function docstrings


def test_documents_deterministic():
    first = dc.default_corpus_documents()
    # Re-extract a sample from the sources (a full re-read costs seconds): same text, same order.
    root = Path(dc.sysconfig.get_paths()["stdlib"])
    modules = dict(dc._stdlib_modules(root))
    for doc in first[100::40]:
        name = doc.source.removeprefix("stdlib:")
        assert dc._module_text(modules[name]) == doc.text
    first.pop()  # callers get their own list
    assert len(dc.default_corpus_documents()) == len(first) + 1


def test_description_counts():
    docs = dc.default_corpus_documents()
    text = dc.default_corpus_description()
    assert dc.DEFAULT_CORPUS_NAME in text
    assert f"{len(docs)} documents" in text
    assert f"{sum(len(d.text.encode()) for d in docs):,} bytes" in text
    assert "\n" not in text


def test_dataset_dir_naming(monkeypatch, tmp_path):
    v = sys.version_info
    d = dc.default_dataset_dir(512, cache_root=tmp_path)
    assert d.parent.parent == tmp_path
    assert d.name == f"python-docs-py{v.major}.{v.minor}-v{dc.DEFAULT_CORPUS_FORMAT}-sp512"
    monkeypatch.setenv("LOOPGOLF_CACHE", str(tmp_path / "env"))
    assert dc.default_dataset_dir().parent.parent == tmp_path / "env"
    assert dc.default_dataset_dir().name.endswith("-sp1024")
    monkeypatch.delenv("LOOPGOLF_CACHE")
    assert dc.default_dataset_dir().is_relative_to(Path.home() / ".cache" / "loopgolf")


def test_ensure_builds_reuses_and_repairs(tmp_path, build_counter):
    d = dc.ensure_default_dataset(1024, cache_root=tmp_path, progress=False)
    assert d == dc.default_dataset_dir(1024, tmp_path) and build_counter == [1024]
    manifest = load_manifest(d)
    assert manifest["vocab_size"] == 1024 and manifest["tokenizer_trained"] is True
    assert manifest["seed"] == dc.DEFAULT_SEED
    assert (manifest["train_order"], manifest["shuffle_seed"]) == ("shuffled", dc.DEFAULT_SEED)
    docs = dc.default_corpus_documents()
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == len(docs)
    stamp = (d / "manifest.json").stat().st_mtime_ns

    assert dc.ensure_default_dataset(1024, cache_root=tmp_path, progress=False) == d
    assert build_counter == [1024]  # reused, not rebuilt
    assert (d / "manifest.json").stat().st_mtime_ns == stamp

    shard = d / manifest["splits"]["train"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0x01
    shard.write_bytes(bytes(data))
    assert dc.ensure_default_dataset(1024, cache_root=tmp_path, progress=False) == d
    assert build_counter == [1024, 1024]  # corrupt cache rebuilt
    verify_dataset(d)
    assert load_manifest(d)["splits"] == manifest["splits"]  # same recipe, same bytes

    (d / "manifest.json").unlink()
    dc.ensure_default_dataset(1024, cache_root=tmp_path, progress=False)
    assert build_counter == [1024, 1024, 1024]
    leftovers = [p.name for p in d.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_concurrent_callers_build_once(tmp_path, build_counter):
    results, errors = [], []

    def worker():
        try:
            results.append(dc.ensure_default_dataset(512, cache_root=tmp_path, progress=False))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1 and build_counter == [512]
    verify_dataset(results[0])


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the module docstring's numbers were measured on CPython 3.11")
def test_documented_stats_and_shuffled_train(tmp_path):
    m = re.search(
        r"(\d+) train documents \(([\d,]+) tokens\), (\d+) val documents \(([\d,]+)\s+tokens\), xz baseline ([\d.]+)",
        dc.__doc__,
    )
    assert m, "the docstring no longer states the build's numbers"
    d = dc.ensure_default_dataset(1024, cache_root=tmp_path, progress=False)
    splits = load_manifest(d)["splits"]
    train, val = splits["train"], splits["val"]
    documented = (int(m[1]), int(m[2].replace(",", "")), int(m[3]), int(m[4].replace(",", "")))
    assert (train["documents"], train["tokens"], val["documents"], val["tokens"]) == documented
    assert round(baseline_xz_bpb(d).bpb, 2) == float(m[5])

    # Train shards hold the training documents shuffled; val keeps the corpus order.
    sp = load_tokenizer(d / "tokenizer.model")
    order = {" ".join(doc.text.split()): i for i, doc in enumerate(dc.default_corpus_documents())}

    def positions(split: str) -> list[int]:
        tokens = load_shard(d / f"fineweb_{split}_000000.bin")
        starts = np.flatnonzero(tokens == BOS_ID).tolist() + [len(tokens)]
        texts = (" ".join(sp.decode(tokens[a + 1 : b].tolist()).split()) for a, b in zip(starts[:-1], starts[1:]))
        return [order.get(t, -1) for t in texts]

    train_pos, val_pos = positions("train"), positions("val")
    val_known = [p for p in val_pos if p >= 0]
    assert len(val_known) >= 15 and val_known == sorted(val_known)
    train_known = [p for p in train_pos if p >= 0]  # decoding normalizes some text: not every doc maps back
    assert len(train_known) >= 300 and train_known != sorted(train_known)
    head = train_known[: len(train_known) // 10]
    assert max(head) - min(head) > 0.6 * len(order)

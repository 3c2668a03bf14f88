"""Dataset statistics: per-shard and per-split counts, tokenizer discovery, the text table."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from loopgolf.data.shards import ShardError, write_shard
from loopgolf.data.stats import dataset_stats, find_tokenizer, format_stats
from loopgolf.data.tokenizer import TokenizerError, load_tokenizer, train_tokenizer

ASSETS = Path(__file__).resolve().parent / "assets"  # vendored official files, see assets/README.md

_WORDS = "alpha beta gamma delta river stone window garden light 42 morning night the of and".split()


def _docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = _docs(3000, seed=0) + ["Ça coûte 3€ à Zürich."] * 5
    return train_tokenizer(corpus, 320, tmp_path_factory.mktemp("tok") / "tok")


def _write_docs(path: Path, docs: list[str], sp) -> None:
    write_shard(path, [t for d in docs for t in [1, *sp.encode(d)]])


@pytest.fixture()
def dataset(tmp_path: Path, tokenizer: Path) -> tuple[Path, dict[str, list[str]]]:
    """A dataset dir with 2 train shards and 1 val shard, each of BOS-prefixed documents."""
    sp = load_tokenizer(tokenizer)
    data = tmp_path / "ds"
    docs = {
        "fineweb_train_000000.bin": _docs(40, 1),
        "fineweb_train_000001.bin": _docs(25, 2) + ["Ça coûte 3€ à Zürich 東."],  # 東: byte fallback
        "fineweb_val_000000.bin": _docs(30, 3),
    }
    for name, texts in docs.items():
        _write_docs(data / name, texts, sp)
    shutil.copy(tokenizer, data / "tok.model")
    (data / "manifest.json").write_text(json.dumps({"tokenizer": "tok.model"}))
    return data, docs


def test_dataset_stats_counts(dataset: tuple[Path, dict[str, list[str]]]) -> None:
    data, docs = dataset
    stats = dataset_stats(data)
    assert stats["tokenizer"] == str(data / "tok.model")
    rows = {Path(r["path"]).name: r for r in stats["shards"]}
    assert list(rows) == sorted(docs)
    for name, texts in docs.items():
        row = rows[name]
        tokens = np.fromfile(data / name, dtype="<u2", offset=1024)
        assert row["split"] == name.split("_")[1]
        assert row["documents"] == len(texts)
        assert row["tokens"] == len(tokens) and row["targets"] == len(tokens) - 1
        # targets after each BOS count no space, BOS targets count 0: the text's UTF-8 bytes exactly
        assert row["target_bytes"] == sum(len(t.encode()) for t in texts)
        assert row["bytes_per_token"] == pytest.approx(row["target_bytes"] / row["targets"])
    train = stats["splits"]["train"]
    assert train["shards"] == 2 and train["documents"] == 66
    assert train["tokens"] == rows["fineweb_train_000000.bin"]["tokens"] + rows["fineweb_train_000001.bin"]["tokens"]
    assert stats["splits"]["val"]["target_bytes"] == rows["fineweb_val_000000.bin"]["target_bytes"]
    assert stats["documents"] == 96
    assert stats["targets"] == sum(r["targets"] for r in rows.values()) == stats["tokens"] - 3
    assert stats["target_bytes"] == sum(len(t.encode()) for texts in docs.values() for t in texts)


def test_stats_without_tokenizer_and_file_list(dataset: tuple[Path, dict[str, list[str]]], tmp_path: Path) -> None:
    data, docs = dataset
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(data / "fineweb_val_000000.bin", lone / "fineweb_val_000000.bin")
    stats = dataset_stats([lone / "fineweb_val_000000.bin"])
    assert stats["tokenizer"] is None and stats["target_bytes"] is None
    assert stats["shards"][0]["bytes_per_token"] is None and stats["documents"] == len(docs["fineweb_val_000000.bin"])
    with_tok = dataset_stats([lone / "fineweb_val_000000.bin"], tokenizer=data / "tok.model")
    assert with_tok["target_bytes"] == sum(len(t.encode()) for t in docs["fineweb_val_000000.bin"])
    assert "(none: byte counts unavailable)" in format_stats(stats)


def test_stats_vocab_mismatch(tmp_path: Path, tokenizer: Path) -> None:
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 5, 400])
    with pytest.raises(ShardError, match="token id 400 >= vocab_size 320"):
        dataset_stats(tmp_path, tokenizer=tokenizer)


def test_stats_golden_fixture(tmp_path: Path) -> None:
    # official layout: data/datasets/fineweb10B_sp1024 -> data/tokenizers/fineweb_1024_bpe.model
    ds = tmp_path / "data" / "datasets" / "fineweb10B_sp1024"
    ds.mkdir(parents=True)
    (tmp_path / "data" / "tokenizers").mkdir()
    shutil.copy(ASSETS / "tokenizers" / "fineweb_1024_bpe.model", tmp_path / "data" / "tokenizers")
    shutil.copy(ASSETS / "fixtures" / "fineweb_val_000000.bin", ds)
    stats = dataset_stats(ds)
    assert stats["tokenizer"].endswith("fineweb_1024_bpe.model")
    assert (stats["documents"], stats["tokens"], stats["targets"], stats["target_bytes"]) == (5, 138, 137, 244)


def test_find_tokenizer(tmp_path: Path) -> None:
    assert find_tokenizer(tmp_path) is None
    (tmp_path / "a.model").write_bytes(b"x")
    assert find_tokenizer(tmp_path) == tmp_path / "a.model"
    (tmp_path / "b.model").write_bytes(b"x")
    assert find_tokenizer(tmp_path) is None  # ambiguous: two models
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer": "b.model", "vocab_size": 1024}))
    assert find_tokenizer(tmp_path) == tmp_path / "b.model"
    (tmp_path / "manifest.json").write_text(json.dumps({"tokenizer": "gone.model"}))
    with pytest.raises(TokenizerError, match="names tokenizer 'gone.model'"):
        find_tokenizer(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="manifest.json is not valid JSON"):
        find_tokenizer(tmp_path)


def test_find_tokenizer_official_layout(tmp_path: Path) -> None:
    ds = tmp_path / "data" / "datasets" / "fineweb10B_sp8192"
    ds.mkdir(parents=True)
    assert find_tokenizer(ds) is None
    (tmp_path / "data" / "tokenizers").mkdir()
    (tmp_path / "data" / "tokenizers" / "fineweb_8192_bpe.model").write_bytes(b"x")
    assert find_tokenizer(ds) == tmp_path / "data" / "tokenizers" / "fineweb_8192_bpe.model"


def test_format_stats_table(dataset: tuple[Path, dict[str, list[str]]]) -> None:
    data, _ = dataset
    stats = dataset_stats(data)
    text = format_stats(stats)
    lines = text.splitlines()
    table = lines[1:]
    assert lines[0] == f"tokenizer: {data / 'tok.model'}"
    assert table[0].split() == ["shard", "split", "documents", "tokens", "targets", "target_bytes", "bytes/token"]
    assert len({len(line) for line in table}) == 1  # aligned: every row the same width
    for name in ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"]:
        assert sum(name in line for line in table) == 1
    assert any(line.startswith("total train (2 shards)") for line in table)
    assert any(line.startswith("total val (1 shards)") for line in table)
    overall = next(line for line in table if line.startswith("total (3 shards)"))
    assert f"{stats['tokens']:,}" in overall and f"{stats['bytes_per_token']:.4f}" in overall


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"no fineweb_\\*.bin shards in directory {tmp_path}"):
        dataset_stats(tmp_path)

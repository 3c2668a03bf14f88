"""Text/jsonl corpus -> official-format dataset (loopgolf.data.corpus)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from loopgolf.data import corpus as corpus_mod
from loopgolf.data.corpus import (
    CorpusError,
    Document,
    XzBaseline,
    baseline_xz_bpb,
    build_dataset,
    iter_documents,
    load_manifest,
    verify_dataset,
)
from loopgolf.data.shards import BOS_ID, load_shard, read_shard_header
from loopgolf.data.tokenizer import load_tokenizer, train_tokenizer

OFFICIAL_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tokenizers" / "fineweb_1024_bpe.model"  # vendored

_WORDS = (
    "the of and to in a is that for it as was with be by on not this are or from at which but have "
    "an they you were her she there been one all we their has would when if so no will more can out "
    "up who them some into time could about only other then its also than two first may like over "
    "river mountain garden letter market window teacher engine history music village summer winter "
    "bridge question answer number system method result water light people country morning evening "
    "travel measure careful quiet bright ancient modern simple gentle sudden narrow heavy clever "
    "walked carried opened noticed explained remembered discovered followed wondered believed"
).split()


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 18))]
    if rng.random() < 0.3:
        words.insert(rng.randint(1, len(words)), str(rng.randint(2, 2999)))
    if rng.random() < 0.3:
        words[rng.randint(0, len(words) - 2)] += ","
    return " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!"])


def _document(rng: random.Random, index: int) -> str:
    # A unique title makes every document distinct, so "val never in train" is checkable by text.
    paragraphs = []
    for _ in range(rng.randint(2, 6)):
        paragraphs.append(" ".join(_sentence(rng) for _ in range(rng.randint(3, 8))))
    return f"Report {index} about the {rng.choice(_WORDS)} {rng.choice(_WORDS)}.\n\n" + "\n\n".join(paragraphs)


def _make_corpus(root: Path, seed: int = 0) -> list[str]:
    """~300 KB of synthetic English in .txt and .jsonl files; returns the texts in read order."""
    rng = random.Random(seed)
    texts = [_document(rng, i) for i in range(160)]
    (root / "b_txt").mkdir(parents=True)
    for i, text in enumerate(texts[:40]):
        (root / "b_txt" / f"doc_{i:03d}.txt").write_text(text, encoding="utf-8")
    (root / "a_jsonl").mkdir()
    for k, chunk in enumerate((texts[40:100], texts[100:160])):
        lines = [json.dumps({"id": j, "text": t}) for j, t in enumerate(chunk)]
        lines.insert(3, "")  # blank lines are skipped
        (root / "a_jsonl" / f"part{k}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "a_jsonl" / "notes.md").write_text("not corpus text " * 50)  # not a corpus suffix
    # folders sort before their files' names: a_jsonl/part0, a_jsonl/part1, b_txt/doc_000...
    return texts[40:160] + texts[:40]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    texts = _make_corpus(root / "in")
    out = root / "ds"
    manifest = build_dataset([root / "in"], out, vocab_size=512, shard_tokens=20_000, progress=False)
    return texts, out, manifest


def _norm(text: str) -> str:
    return " ".join(text.split())  # the tokenizer's normalization folds newlines and runs of spaces


def _decoded_docs(data_dir: Path, split: str) -> list[str]:
    sp = load_tokenizer(data_dir / "tokenizer.model")
    tokens = np.concatenate([load_shard(p) for p in sorted(data_dir.glob(f"fineweb_{split}_*.bin"))])
    starts = np.flatnonzero(tokens == BOS_ID).tolist() + [len(tokens)]
    assert starts[0] == 0
    return [sp.decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts[:-1], starts[1:])]


# --------------------------------------------------------------------------------------------


def test_iter_documents_order_and_sources(tmp_path):
    texts = _make_corpus(tmp_path)
    docs = list(iter_documents([tmp_path]))
    assert [d.text for d in docs] == texts
    assert docs[0].source == f"{tmp_path / 'a_jsonl' / 'part0.jsonl'}:1"
    assert docs[3].source.endswith("part0.jsonl:5")  # line 4 is blank
    assert docs[-1].source == str(tmp_path / "b_txt" / "doc_039.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    assert list(iter_documents([tmp_path / "empty.txt"])) == []


def test_build_dataset_layout_and_counts(built):
    texts, out, manifest = built
    assert manifest == load_manifest(out)
    assert manifest["format"] == "loopgolf-dataset" and manifest["version"] == 1
    assert manifest["tokenizer_trained"] is True and manifest["vocab_size"] == 512
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer.vocab").is_file()
    assert load_tokenizer(out / "tokenizer.model").get_piece_size() == 512
    splits = manifest["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(texts)
    assert splits["val"]["documents"] == round(0.05 * len(texts))
    assert splits["train"]["text_bytes"] + splits["val"]["text_bytes"] == sum(len(t.encode()) for t in texts)
    on_disk = sorted(p.name for p in out.glob("fineweb_*.bin"))
    listed = sorted(s["file"] for sp in splits.values() for s in sp["shards"])
    assert on_disk == listed
    assert len(splits["train"]["shards"]) > 1  # 20k-token shards: the split really is sharded
    for name, split in splits.items():
        counts = [read_shard_header(out / s["file"]) for s in split["shards"]]
        assert counts == [s["tokens"] for s in split["shards"]]
        assert all(c == 20_000 for c in counts[:-1]) and 0 < counts[-1] <= 20_000
        assert sum(counts) == split["tokens"]
        tokens = np.concatenate([load_shard(out / s["file"], vocab_size=512) for s in split["shards"]])
        assert tokens[0] == BOS_ID
        assert int((tokens == BOS_ID).sum()) == split["documents"]  # one BOS per document, no EOS
        assert not (tokens == 2).any()
        assert [s["file"] for s in split["shards"]] == [f"fineweb_{name}_{i:06d}.bin" for i in range(len(counts))]
    verify_dataset(out)


def test_val_documents_never_in_train(built):
    texts, out, manifest = built
    val = [_norm(t) for t in _decoded_docs(out, "val")]
    train = [_norm(t) for t in _decoded_docs(out, "train")]
    assert len(val) == manifest["splits"]["val"]["documents"]
    assert not set(val) & set(train)
    originals = [_norm(t) for t in texts]
    assert sorted(val + train) == sorted(originals)
    # validation keeps the source order; training documents are shuffled (by default)
    assert val == [t for t in originals if t in set(val)]
    in_source_order = [t for t in originals if t not in set(val)]
    assert sorted(train) == sorted(in_source_order) and train != in_source_order
    assert manifest["train_order"] == "shuffled" and manifest["shuffle_seed"] == manifest["seed"] == 1337


_KEY = re.compile(r"Entry (\d{3}) opens")


def _sorted_source(path: Path, n: int = 200) -> Path:
    """A .jsonl corpus whose documents are sorted by a key (0..n-1) that survives tokenization."""
    rng = random.Random(3)
    lines = [json.dumps({"text": f"Entry {k:03d} opens. " + " ".join(_sentence(rng) for _ in range(rng.randint(2, 5)))}) for k in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _keys(data_dir: Path, split: str, fraction: float = 1.0) -> list[int]:
    """Keys of the documents that start within the first `fraction` of the split's first shard."""
    sp = load_tokenizer(data_dir / "tokenizer.model")
    tokens = load_shard(data_dir / f"fineweb_{split}_000000.bin")
    head = tokens[: int(len(tokens) * fraction)]
    starts = np.flatnonzero(head == BOS_ID).tolist() + [len(head)]
    keys = [_KEY.match(sp.decode(head[a + 1 : b].tolist())) for a, b in zip(starts[:-1], starts[1:])]
    return [int(k.group(1)) for k in keys if k]  # a document cut off before its key is not counted


def test_cli_build_shuffles_train_by_default_and_keeps_order_on_request(tmp_path, capsys):
    from loopgolf.cli import main

    src, n = _sorted_source(tmp_path / "sorted.jsonl"), 200
    common = ["data", "build", "--input", str(src), "--vocab-size", "400", "--val-docs", "10", "--seed", "7", "--json"]
    assert main([*common, "--out", str(tmp_path / "shuffled")]) == 0
    shuffled = json.loads(capsys.readouterr().out)
    assert main([*common, "--out", str(tmp_path / "kept"), "--keep-order"]) == 0
    kept = json.loads(capsys.readouterr().out)
    assert (shuffled["train_order"], shuffled["shuffle_seed"]) == ("shuffled", 7)
    assert (kept["train_order"], kept["shuffle_seed"]) == ("source", None)
    assert shuffled["splits"]["train"]["documents"] == kept["splits"]["train"]["documents"] == n - 10

    # The first 10% of the training stream: a shuffled build samples the whole key range, a
    # source-order build only its start.
    head = _keys(tmp_path / "shuffled", "train", 0.1)
    assert len(head) >= 10 and max(head) - min(head) >= 0.6 * n
    head_kept = _keys(tmp_path / "kept", "train", 0.1)
    assert len(head_kept) >= 10 and max(head_kept) < 0.15 * n

    # Same documents either way; only the training order differs. Validation: the same documents
    # (the split is drawn before the shuffle) in source order, in both builds.
    train, train_kept = _keys(tmp_path / "shuffled", "train"), _keys(tmp_path / "kept", "train")
    val, val_kept = _keys(tmp_path / "shuffled", "val"), _keys(tmp_path / "kept", "val")
    assert len(train) == len(train_kept) == n - 10 and len(val) == 10
    assert train_kept == sorted(train_kept) and train != train_kept
    assert sorted(train) == train_kept
    assert val == val_kept == sorted(val) and sorted(train + val) == list(range(n))


def test_shuffle_is_seeded(tmp_path):
    src = _sorted_source(tmp_path / "sorted.jsonl", n=60)
    sp = train_tokenizer([json.loads(line)["text"] for line in src.read_text().splitlines()], 400, tmp_path / "tok")
    orders = {}
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        build_dataset([src], tmp_path / name, tokenizer=sp, val_docs=5, seed=seed, progress=False)
        orders[name] = _keys(tmp_path / name, "train")
    assert orders["a"] == orders["b"] != orders["c"]
    assert orders["a"] != sorted(orders["a"]) and orders["c"] != sorted(orders["c"])  # shuffled, not source order
    assert (tmp_path / "a" / "fineweb_train_000000.bin").read_bytes() == (tmp_path / "b" / "fineweb_train_000000.bin").read_bytes()


def test_tokenizer_never_sees_validation_text(tmp_path):
    rng = random.Random(1)
    common = Document(" ".join(_sentence(rng) for _ in range(600)), "common")
    # Only this document contains "qzjv", often enough that BPE learns it if it trains on it.
    rare = Document(" ".join(_sentence(rng) + " qzjv qzjv qzjv." for _ in range(600)), "rare")
    outcomes = set()
    for seed in range(4):
        out = tmp_path / f"s{seed}"
        build_dataset(None, out, documents=[common, rare], vocab_size=400, val_docs=1, seed=seed, progress=False)
        sp = load_tokenizer(out / "tokenizer.model")
        rare_in_val = "qzjv" in _decoded_docs(out, "val")[0]
        learned = any("qzjv" in sp.id_to_piece(i) for i in range(sp.get_piece_size()))
        assert learned == (not rare_in_val)
        outcomes.add(rare_in_val)
    assert outcomes == {True, False}


def test_verify_detects_corruption_and_strays(built, tmp_path):
    _, out, manifest = built
    copy = tmp_path / "ds"
    shutil.copytree(out, copy)
    victim = copy / manifest["splits"]["train"]["shards"][0]["file"]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CorpusError, match=victim.name):
        verify_dataset(copy)
    shutil.rmtree(copy)
    shutil.copytree(out, copy)
    stray = copy / "fineweb_train_000099.bin"
    shutil.copyfile(out / "fineweb_val_000000.bin", stray)
    with pytest.raises(CorpusError, match="fineweb_train_000099.bin"):
        verify_dataset(copy)
    stray.unlink()
    (copy / manifest["splits"]["val"]["shards"][0]["file"]).write_bytes(b"short")
    with pytest.raises(CorpusError, match="fineweb_val_000000.bin"):
        verify_dataset(copy)


def _assert_nothing_left(parent: Path, before: set[str]) -> None:
    assert {p.name for p in parent.iterdir()} == before, "a failed build left files behind"


@pytest.mark.parametrize(
    "case",
    ["missing", "bad_utf8", "bad_json", "missing_text", "non_string_text", "not_object", "empty", "unsupported", "one_doc"],
)
def test_input_errors_raise_and_leave_nothing(tmp_path, case):
    src = tmp_path / "src"
    src.mkdir()
    good = "\n".join(json.dumps({"text": f"Document {i} says hello to the world."}) for i in range(5))
    pattern = None
    if case == "missing":
        inputs, pattern = [src / "nope.txt"], "nope.txt.*does not exist"
    elif case == "bad_utf8":
        (src / "a.txt").write_bytes(b"hello world\n" * 3 + b"caf\xe9 latin-1 here")
        inputs, pattern = [src], r"a\.txt.*invalid UTF-8 at byte offset 39"
    elif case == "bad_json":
        (src / "a.jsonl").write_text(good + '\n{"text": "unterminated\n')
        inputs, pattern = [src / "a.jsonl"], r"a\.jsonl:6: invalid JSON"
    elif case == "missing_text":
        (src / "a.jsonl").write_text(good + '\n\n{"body": "x"}\n')
        inputs, pattern = [src / "a.jsonl"], r"a\.jsonl:7: missing \"text\""
    elif case == "non_string_text":
        (src / "a.jsonl").write_text('{"text": 17}\n')
        inputs, pattern = [src / "a.jsonl"], r"a\.jsonl:1: \"text\" must be a string"
    elif case == "not_object":
        (src / "a.jsonl").write_text('["text"]\n')
        inputs, pattern = [src / "a.jsonl"], r"a\.jsonl:1: expected a JSON object"
    elif case == "empty":
        (src / "a.txt").write_text("   \n\n")
        (src / "b.jsonl").write_text('{"text": ""}\n\n')
        inputs, pattern = [src], "empty corpus"
    elif case == "unsupported":
        (src / "a.csv").write_text("text\nhello\n")
        inputs, pattern = [src / "a.csv"], r"unsupported file type '\.csv'"
    else:
        (src / "a.txt").write_text("just one document here")
        inputs, pattern = [src], "at least one validation and one training document"
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(CorpusError, match=pattern):
        build_dataset(inputs, tmp_path / "out", vocab_size=400, progress=False)
    _assert_nothing_left(tmp_path, before)


def test_failure_inside_build_leaves_nothing(tmp_path):
    docs = [Document(f"Short document number {i}.", f"d{i}") for i in range(10)]
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(CorpusError, match="tokenizer"):  # far too little text for 4000 pieces
        build_dataset(None, tmp_path / "out", documents=docs, vocab_size=4000, progress=False)
    _assert_nothing_left(tmp_path, before)


def test_argument_errors(tmp_path):
    docs = [Document(f"Document {i} has some words in it.", f"d{i}") for i in range(10)]
    with pytest.raises(CorpusError, match="not both"):
        build_dataset(None, tmp_path / "o", documents=docs, val_docs=2, val_fraction=0.1, progress=False)
    with pytest.raises(CorpusError, match="exactly one"):
        build_dataset(None, tmp_path / "o", progress=False)
    with pytest.raises(CorpusError, match="val_fraction"):
        build_dataset(None, tmp_path / "o", documents=docs, val_fraction=1.5, progress=False)
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(built, tmp_path):
    texts, _, _ = built
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    docs = [Document(t, f"d{i}") for i, t in enumerate(texts[:60])]
    with pytest.raises(CorpusError, match="force"):
        build_dataset(None, out, documents=docs, vocab_size=400, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    manifest = build_dataset(None, out, documents=docs, vocab_size=400, force=True, progress=False)
    assert not (out / "keep.txt").exists() and manifest["vocab_size"] == 400
    assert {p.name for p in tmp_path.iterdir()} == {"out"}  # no temp siblings left
    verify_dataset(out)


def test_given_tokenizer_is_used_not_trained(built, tmp_path, monkeypatch):
    texts, _, _ = built

    def no_training(*args, **kwargs):
        raise AssertionError("a tokenizer was trained although one was given")

    monkeypatch.setattr(corpus_mod, "train_tokenizer", no_training)
    docs = [Document(t, f"d{i}") for i, t in enumerate(texts[:50])]
    out = tmp_path / "out"
    manifest = build_dataset(
        None,
        out,
        documents=docs,
        tokenizer=OFFICIAL_TOKENIZER,
        vocab_size=512,
        val_docs=5,
        progress=False,
        source_names=["synthetic"],
    )
    assert manifest["tokenizer_trained"] is False and manifest["vocab_size"] == 1024
    assert manifest["sources"] == ["synthetic"]
    assert (out / "tokenizer.model").read_bytes() == OFFICIAL_TOKENIZER.read_bytes()
    assert manifest["splits"]["val"]["documents"] == 5
    sp = load_tokenizer(OFFICIAL_TOKENIZER)
    val_texts = [d.text for d in docs if _norm(d.text) in {_norm(x) for x in _decoded_docs(out, "val")}]
    assert len(val_texts) == 5
    expected = sum(len(sp.encode(t)) + 1 for t in val_texts)
    assert manifest["splits"]["val"]["tokens"] == expected


def test_baseline_xz_bpb_with_and_without_manifest_numbers(built, tmp_path):
    _, out, manifest = built
    from_manifest = baseline_xz_bpb(out)
    val = manifest["splits"]["val"]
    assert from_manifest == XzBaseline(bpb=8 * val["text_xz_bytes"] / val["text_bytes"], approximate=False, unknown_targets=0)
    assert 1.0 < from_manifest.bpb < 5.0

    copy = tmp_path / "ds"
    shutil.copytree(out, copy)
    m = load_manifest(copy)
    del m["splits"]["val"]["text_xz_bytes"]
    (copy / "manifest.json").write_text(json.dumps(m))
    decoded = baseline_xz_bpb(copy)
    (copy / "manifest.json").unlink()
    assert load_manifest(copy) is None
    assert baseline_xz_bpb(copy) == decoded
    # Byte-fallback tokenizer: nothing decodes to the unknown piece, but the decoded text is
    # whitespace-normalized, so the figure is approximate and only roughly the manifest's.
    assert decoded.approximate is True and decoded.unknown_targets == 0
    assert decoded.bpb == pytest.approx(from_manifest.bpb, rel=0.15)


def test_baseline_xz_bpb_counts_unknown_piece_targets(tmp_path):
    rng = random.Random(5)
    # A tokenizer without byte fallback that never saw CJK: those characters encode as <unk>.
    tok = train_tokenizer([" ".join(_sentence(rng) for _ in range(40)) for _ in range(30)], 400, tmp_path / "ascii", byte_fallback=False)
    sp = load_tokenizer(tok)
    docs = [Document(f"Entry {i:03d} opens. " + " ".join(_sentence(rng) for _ in range(6)) + (" 東京 and 大阪." if i % 2 else ""), f"d{i}") for i in range(40)]
    out = tmp_path / "ds"
    manifest = build_dataset(None, out, documents=docs, tokenizer=tok, val_docs=10, progress=False)
    exact = baseline_xz_bpb(out)
    assert (exact.approximate, exact.unknown_targets) == (False, 0)

    val_texts = [_norm(t) for t in _decoded_docs(out, "val")]
    assert any("⁇" in t for t in val_texts)
    m = load_manifest(out)
    del m["splits"]["val"]["text_xz_bytes"]
    (out / "manifest.json").write_text(json.dumps(m))
    approx = baseline_xz_bpb(out)
    val_ids = load_shard(out / "fineweb_val_000000.bin")
    expected_unk = int((val_ids[1:] == sp.unk_id()).sum())
    # Independently: what the val documents (found by their keys) encode to.
    val_docs = [docs[k] for k in _keys(out, "val")]
    assert len(val_docs) == manifest["splits"]["val"]["documents"] == 10
    assert expected_unk == sum(sp.encode(d.text).count(sp.unk_id()) for d in val_docs) > 0
    assert (approx.approximate, approx.unknown_targets) == (True, expected_unk)
    assert approx.bpb == pytest.approx(exact.bpb, rel=0.2)


def test_run_summary_prints_approximate_xz_baseline():
    from loopgolf.run import format_summary

    s = {
        "preset": "debug",
        "plan": {"spec": {"kind": "vanilla"}, "virtual_layers": 2, "attn_of": [0, 1]},
        "unique_params": 10,
        "effective_params": 10,
        "steps": 1,
        "train_tokens": 8,
        "train_seconds": 1.0,
        "tokens_per_second": 8.0,
        "val_bpb_pre": 3.0,
        "val_bpb_post": 3.0,
        "quant_gap_bpb": 0.0,
        "baseline_xz_bpb": 2.25,
        "baseline_xz_approximate": False,
        "baseline_xz_unknown_targets": 0,
        "model_bytes": 1,
        "codec": "zlib",
        "code_bytes": 1,
        "artifact_bytes": 2,
        "cap_bytes": 16_000_000,
        "fits": True,
        "headroom_bytes": 15_999_998,
        "device": "cpu",
        "total_seconds": 1.0,
    }
    line = next(row for row in format_summary(s).splitlines() if "baseline xz bpb" in row)
    assert line.rstrip().endswith("2.2500") and "approximate" not in line
    s.update(baseline_xz_approximate=True, baseline_xz_unknown_targets=1234)
    line = next(row for row in format_summary(s).splitlines() if "baseline xz bpb" in row)
    assert line.rstrip().endswith("2.2500  (approximate, 1,234 unknown-piece targets)")


def test_load_manifest_rejects_garbage(tmp_path):
    assert load_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CorpusError, match="manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"datasets": []}')
    with pytest.raises(CorpusError, match="not a loopgolf dataset"):
        load_manifest(tmp_path)


# --------------------------------------------------------------------------------------------
# Inputs that are not regular files, and files over the size cap (issue 27)


def _build_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`loopgolf data build ARGS` in a subprocess with a time and memory limit, so that a
    regression (blocking on a FIFO, reading /dev/zero) fails the test instead of hanging it."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    return subprocess.run([sys.executable, "-m", "loopgolf", "data", "build", *args], cwd=cwd, capture_output=True, text=True, timeout=120, preexec_fn=limit)


@pytest.mark.parametrize(
    "case,words",
    [
        ("fifo", "is a FIFO, not a regular file"),
        ("dev_zero_link", "is a character device, not a regular file"),
        ("fifo_in_folder", "is a FIFO, not a regular file"),
        ("dev_zero_link_in_folder", "is a character device, not a regular file"),
    ],
)
def test_fifo_and_device_inputs_are_refused_before_reading(tmp_path, case, words):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"ok{i}.txt").write_text(f"Document {i} is a plain regular file with some words.")
    bad = src / "bad.txt"
    if case.startswith("fifo"):
        os.mkfifo(bad)
    else:
        bad.symlink_to("/dev/zero")
    target = src if case.endswith("in_folder") else bad
    proc = _build_cli(["--input", str(target), "--out", str(tmp_path / "out"), "--vocab-size", "64"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"corpus input {bad} {words}" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_symlink_to_a_regular_file_is_read(tmp_path):
    (tmp_path / "real.txt").write_text("A real document.")
    (tmp_path / "link.txt").symlink_to(tmp_path / "real.txt")
    docs = list(iter_documents([tmp_path / "link.txt"]))
    assert [d.text for d in docs] == ["A real document."]


def test_input_over_the_size_cap_is_refused(tmp_path, capsys):
    from loopgolf.cli import main

    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"d{i}.txt").write_text(f"Document {i}. " + "words " * 10)
    (src / "big.jsonl").write_text(json.dumps({"text": "x " * 200}) + "\n")
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(CorpusError, match=rf"corpus input {re.escape(str(src / 'big.jsonl'))} is \d+ bytes, more than the 300 allowed per file"):
        build_dataset([src], tmp_path / "out", vocab_size=64, max_input_bytes=300, progress=False)
    _assert_nothing_left(tmp_path, before)
    rc = main(["data", "build", "--input", str(src), "--out", str(tmp_path / "out"), "--max-input-bytes", "300"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "big.jsonl" in err and "--max-input-bytes" in err
    _assert_nothing_left(tmp_path, before)
    assert len(list(iter_documents([src], max_bytes=500))) == 6  # under the cap: read


def test_reading_is_bounded_even_after_the_stat(tmp_path, monkeypatch):
    """The stat before opening can be raced (the file swapped or grown): the open is non-blocking
    and rechecked on the descriptor, and no read goes past the cap."""
    monkeypatch.setattr(corpus_mod, "_check_input_file", lambda path, max_bytes: None)
    fifo = tmp_path / "swapped.txt"
    os.mkfifo(fifo)

    def unblock() -> None:  # only matters if the open blocked (a regression): give it a writer
        time.sleep(20)
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(CorpusError, match=r"swapped\.txt changed while being opened \(a FIFO"):
        list(iter_documents([fifo]))
    assert time.monotonic() - start < 10
    (tmp_path / "grew.txt").write_text("y" * 200)
    (tmp_path / "grew.jsonl").write_text((json.dumps({"text": "z" * 20}) + "\n") * 10)
    monkeypatch.setattr(corpus_mod, "_open_input", _unchecked_open)  # past the stat and the descriptor's check
    for name in ("grew.txt", "grew.jsonl"):
        with pytest.raises(CorpusError, match=rf"{name} grew past the 100 bytes allowed per file"):
            list(iter_documents([tmp_path / name], max_bytes=100))


@contextlib.contextmanager
def _unchecked_open(path, max_bytes):
    with open(path, "rb") as f:
        yield f


def test_deeply_nested_jsonl_line_is_an_input_error(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(CorpusError, match=r"a\.jsonl:2: invalid JSON \(nested too deeply\)"):
        list(iter_documents([tmp_path / "a.jsonl"]))


def test_cached_default_dataset_without_tokenizer_hash_is_rebuilt(tmp_path, monkeypatch, capsys):
    """A default dataset cached by a loopgolf that did not record the tokenizer's sha256 is rebuilt
    (so its tokenizer is checked from then on), silently; one whose tokenizer was swapped too."""
    from loopgolf.data import default_corpus as dc

    builds = []
    real = dc.build_dataset
    monkeypatch.setattr(dc, "build_dataset", lambda *a, **k: builds.append(1) or real(*a, **k))
    d = dc.ensure_default_dataset(512, cache_root=tmp_path, progress=False)
    manifest = load_manifest(d)
    assert len(builds) == 1 and len(manifest["tokenizer_sha256"]) == 64
    old = {k: v for k, v in manifest.items() if k != "tokenizer_sha256"}
    (d / "manifest.json").write_text(json.dumps(old))
    assert dc.ensure_default_dataset(512, cache_root=tmp_path, progress=False) == d
    assert len(builds) == 2 and load_manifest(d)["tokenizer_sha256"] == manifest["tokenizer_sha256"]
    shutil.copyfile(OFFICIAL_TOKENIZER, d / "tokenizer.model")
    dc.ensure_default_dataset(512, cache_root=tmp_path, progress=False)
    assert len(builds) == 3
    verify_dataset(d)
    assert "warning" not in capsys.readouterr().err

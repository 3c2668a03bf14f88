"""Tokenizer loading and training, and the official byte counts behind val_bpb."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

import loopgolf.data.tokenizer as tok
from loopgolf.data.shards import load_shard
from loopgolf.data.tokenizer import (
    OFFICIAL_TRAINER_SETTINGS,
    TokenizerError,
    build_byte_tables,
    count_target_bytes,
    load_tokenizer,
    target_byte_counts,
    train_tokenizer,
)

ASSETS = Path(__file__).resolve().parent / "assets"  # vendored official files, see assets/README.md
GOLDEN = ASSETS / "fixtures" / "bpb_bytes_golden.json"

_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their been has when who will more no if out "
    "so said what up its about into than them can only other new some could time these two may then "
    "do first any my now such like our over man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people how too "
    "little state good very make world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year off come since against go "
    "came right used take three river garden window morning"
).split()


def synthetic_documents(n_docs: int = 1500, seed: int = 0) -> list[str]:
    """A few hundred KB of English-like text: sentences, numbers, punctuation, paragraphs."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        paragraphs = []
        for _ in range(rng.randint(1, 4)):
            sentences = []
            for _ in range(rng.randint(1, 5)):
                words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
                if rng.random() < 0.2:
                    words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
                sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?", ";"]))
            paragraphs.append(" ".join(sentences))
        docs.append("\n\n".join(paragraphs))
    return docs


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("tok") / "synthetic_512"
    return train_tokenizer(synthetic_documents(), 512, prefix)


# ---------------------------------------------------------------------------------------------
# golden: the official byte counts
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_golden_byte_counts(golden: dict) -> None:
    sp = load_tokenizer(ASSETS / golden["tokenizer"])
    tables = build_byte_tables(sp)
    ids = np.array(golden["token_ids"], dtype=np.uint16)
    per_target = target_byte_counts(ids[:-1], ids[1:], tables)
    assert per_target.dtype == np.int64
    assert per_target.tolist() == golden["target_bytes"]
    assert count_target_bytes(ids, tables) == (golden["num_targets"], golden["total_target_bytes"]) == (137, 244)


def test_golden_shard_and_encoding(golden: dict) -> None:
    ids = load_shard(ASSETS / "fixtures" / "fineweb_val_000000.bin", vocab_size=1024)
    assert ids.tolist() == golden["token_ids"]
    # documents are BOS + tokens, concatenated
    sp = load_tokenizer(ASSETS / golden["tokenizer"])
    encoded = [t for text in golden["texts"] for t in [1, *sp.encode(text)]]
    assert encoded == golden["token_ids"]


def test_chunked_count_matches_unchunked(golden: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    tables = build_byte_tables(load_tokenizer(ASSETS / golden["tokenizer"]))
    ids = np.array(golden["token_ids"] * 7, dtype=np.uint16)
    whole = int(target_byte_counts(ids[:-1], ids[1:], tables).sum())
    for chunk in (1, 2, 5, 64):
        monkeypatch.setattr(tok, "_CHUNK", chunk)
        assert count_target_bytes(ids, tables) == (len(ids) - 1, whole)


# ---------------------------------------------------------------------------------------------
# byte tables on a byte-fallback tokenizer
# ---------------------------------------------------------------------------------------------


def test_byte_rule_cases(trained: Path) -> None:
    sp = load_tokenizer(trained)
    t = build_byte_tables(sp)
    space_piece = next(i for i in range(sp.get_piece_size()) if sp.id_to_piece(i) == "▁the")
    plain_piece = next(i for i in range(sp.get_piece_size()) if sp.id_to_piece(i) == "he")
    byte_piece = sp.piece_to_id("<0xE6>")
    assert t.is_boundary[[0, 1, 2, 3]].all() and t.base_bytes[[0, 1, 2, 3]].tolist() == [0] * 4
    assert not t.is_boundary[byte_piece] and t.base_bytes[byte_piece] == 1
    assert t.has_leading_space[space_piece] and t.base_bytes[space_piece] == 3
    prev = np.array([1, plain_piece, plain_piece, 1, byte_piece, 3])
    tgt = np.array([space_piece, space_piece, plain_piece, 2, space_piece, byte_piece])
    # after BOS the space is not in the text; after a normal or byte piece it is; EOS counts 0
    assert target_byte_counts(prev, tgt, t).tolist() == [3, 4, 2, 0, 4, 1]


def test_bytes_of_a_document_equal_its_utf8_length(trained: Path) -> None:
    """BOS + encode(text) must count exactly the UTF-8 bytes of the (already normalized) text."""
    sp = load_tokenizer(trained)
    tables = build_byte_tables(sp)
    texts = ["The river 12345 is long.", "Café naïve 東京 🙂 garden!", "x"]
    ids = np.array([t for text in texts for t in [1, *sp.encode(text)]])
    assert any(sp.is_byte(int(i)) for i in ids)  # the CJK/emoji go through byte fallback
    assert count_target_bytes(ids, tables) == (len(ids) - 1, sum(len(s.encode()) for s in texts))


def test_tables_padding_and_mismatch(trained: Path) -> None:
    sp = load_tokenizer(trained)
    padded = build_byte_tables(sp, vocab_size=520)
    assert padded.base_bytes.shape == (520,) and padded.base_bytes.dtype == np.int64
    assert padded.is_boundary[512:].all() and not padded.base_bytes[512:].any()
    assert not padded.has_leading_space[512:].any()
    with pytest.raises(TokenizerError, match="vocab_size 500 is smaller than the tokenizer's 512"):
        build_byte_tables(sp, vocab_size=500)
    with pytest.raises(TokenizerError, match="token id 600 is outside"):
        target_byte_counts(np.array([1]), np.array([600]), padded)
    with pytest.raises(ValueError, match="shape"):
        target_byte_counts(np.array([1, 2]), np.array([3]), padded)
    assert count_target_bytes(np.array([1]), padded) == (0, 0)


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="missing.model does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"this is not a protobuf")
    with pytest.raises(TokenizerError, match="junk.model is not a valid SentencePiece model"):
        load_tokenizer(tmp_path / "junk.model")


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------


def test_trained_tokenizer_has_official_layout(trained: Path) -> None:
    assert trained.name == "synthetic_512.model"
    sp = load_tokenizer(trained)
    n = sp.get_piece_size()
    assert n == 512
    assert sum(sp.is_byte(i) for i in range(n)) == 256
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert sp.encode("12345") == [sp.piece_to_id(c) for c in "12345"]  # split_digits
    assert not sp.id_to_piece(sp.encode("river")[0]).startswith("▁")  # no dummy prefix
    vocab_lines = trained.with_suffix(".vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab_lines) == 512 and vocab_lines[1] == "<s>\t0"
    assert sorted(p.name for p in trained.parent.iterdir()) == ["synthetic_512.model", "synthetic_512.vocab"]


def test_training_is_deterministic(trained: Path, tmp_path: Path) -> None:
    again = train_tokenizer(synthetic_documents(), 512, tmp_path / "other")
    assert again.read_bytes() == trained.read_bytes()


def test_training_is_quiet(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    train_tokenizer(synthetic_documents(200), 320, tmp_path / "q")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_corpus_too_small_is_explained_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="corpus is too small"):
        train_tokenizer(["hello world"] * 20, 512, tmp_path / "small")
    with pytest.raises(TokenizerError, match="no non-empty lines"):
        train_tokenizer(["", "\n\n"], 512, tmp_path / "empty")
    with pytest.raises(TokenizerError, match="use a larger vocab_size"):
        train_tokenizer(synthetic_documents(50), 100, tmp_path / "tiny")
    assert list(tmp_path.iterdir()) == []


def test_long_lines_are_cut_not_dropped() -> None:
    line = ("abc déf 東京 " * 3000).strip()  # about 40 KB, multi-byte characters
    pieces = list(tok._training_sentences([line + "\n\nshort"], max_bytes=1000))
    assert pieces[-1] == "short"
    assert all(len(p.encode()) <= 1000 for p in pieces)
    assert "".join(pieces[:-1]) == line


def test_official_settings() -> None:
    assert OFFICIAL_TRAINER_SETTINGS == {
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

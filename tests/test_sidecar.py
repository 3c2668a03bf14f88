"""Bits per byte on the original text for tokenizers that transform it: the caseops transform,
byte sidecars beside validation shards, and scoring with them (loopgolf.data.caseops,
loopgolf.data.sidecar, loopgolf.data.sidecar_build, the sidecar path of loopgolf.evaluate and
Dataset.open)."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import lookback_model, one_line_error, random_model, synthetic_documents
from hypothesis import example, given, settings
from hypothesis import strategies as st

from loopgolf.data.caseops import (
    ALLCAPS,
    CAPNEXT,
    CASEOPS,
    ESC,
    IDENTITY,
    RESERVED,
    SPACE_MARK,
    SPACE_MARK_LITERAL,
    TITLE,
    TransformError,
    case_pairs,
    caseops_decode,
    caseops_encode,
    caseops_original_bytes,
)
from loopgolf.data.dataset import Dataset
from loopgolf.data.shards import load_shard, read_shard_header, write_shard
from loopgolf.data.sidecar import (
    HEADER_BYTES,
    SIDECAR_MAGIC,
    SidecarError,
    SidecarTables,
    check_sidecar,
    load_sidecar,
    load_val_sidecars,
    piece_text,
    read_declaration,
    sidecar_path,
)
from loopgolf.data.sidecar_build import LOSSLESS_TRAINER_SETTINGS, encode_documents, write_declaration, write_sidecar
from loopgolf.data.tokenizer import build_byte_tables, count_target_bytes, load_tokenizer, target_byte_counts, train_tokenizer
from loopgolf.evaluate import Tally, evaluate_bpb

ASSETS = Path(__file__).resolve().parent / "assets"
SP1024 = ASSETS / "tokenizers" / "fineweb_1024_bpe.model"
GOLDEN = json.loads((ASSETS / "fixtures" / "bpb_bytes_golden.json").read_text())

# Characters where case mapping is not a simple one-to-one swap, the operators themselves,
# SentencePiece's space symbol, combining marks and letters outside the BMP.
TRICKY = [
    *RESERVED,
    "\ue000",
    "\ue006",
    SPACE_MARK,
    "A",
    "a",
    "Z",
    "z",
    "ß",  # upper is "SS"
    "ẞ",  # lower is "ß", whose upper is "SS"
    "İ",  # lower is 2 code points
    "ı",  # upper is "I", whose lower is "i"
    "\u212a",  # Kelvin sign: lower is "k", whose upper is "K"
    "ǅ",  # titlecase digraph
    "Σ",
    "σ",
    "ς",
    "\u0301",  # combining acute accent
    "\U00010400",  # Deseret capital (non-BMP case pair)
    "\U00010428",
    "Ⱥ",  # a case pair assigned after Unicode 3.2: left as it is
    "ⱥ",
    "é",
    "É",
    "🙂",
    " ",
    "\n",
]
# Real-looking text for the transforming tokenizer: capitals of every kind, the operators and
# "▁" as literal text, leading/trailing/runs of whitespace, non-ASCII and non-BMP letters.
CASEOPS_TEXTS = [
    *GOLDEN["texts"],
    "The NASA Launch went well. McDonald's iPhone SALE!",
    f"Literal operators {TITLE}{ALLCAPS}{CAPNEXT}{ESC}{SPACE_MARK_LITERAL} and a {SPACE_MARK} mark.",
    "  Leading whitespace, STRASSE and Straße, İstanbul, ΣΑΣ, Ωmega, \U00010400\U00010428 DESERET.",
    "E\u0301cole, ÉCOLE, \u212aelvin, ǅungla, 東京 Tokyo\t\r\nEnd   ",
    "",
]


def _lossless_tokenizer(directory: Path, vocab: int = 320) -> Path:
    docs = [caseops_encode(t) for t in synthetic_documents(80, seed=3) + CASEOPS_TEXTS * 3]
    settings = dict(LOSSLESS_TRAINER_SETTINGS, user_defined_symbols=list(CASEOPS.reserved))
    path = train_tokenizer(docs, vocab, directory / "caseops", extra_settings=settings)
    write_declaration(path, CASEOPS)
    return path


@pytest.fixture(scope="module")
def caseops_tokenizer(tmp_path_factory) -> Path:
    """A small SentencePiece tokenizer trained on caseops-transformed text with the lossless
    settings, declaring the transform."""
    return _lossless_tokenizer(tmp_path_factory.mktemp("caseops_tok"))


def _stream(encoded: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Documents as BOS + tokens, concatenated, with their byte counts (BOS: 0)."""
    tokens = np.concatenate([np.concatenate([[1], ids]) for ids, _ in encoded]).astype(np.uint16)
    counts = np.concatenate([np.concatenate([[0], c]) for _, c in encoded]).astype(np.int64)
    return tokens, counts


# ------------------------------------------------------------------------------------------
# The transform
# ------------------------------------------------------------------------------------------


def _assert_lossless(text: str) -> None:
    enc = caseops_encode(text)
    assert caseops_decode(enc) == text
    assert int(caseops_original_bytes(enc).sum()) == len(text.encode("utf-8"))
    assert SPACE_MARK not in enc  # SentencePiece would read it back as a space
    upper = {chr(c) for c in case_pairs().upper_to_lower}
    assert not upper & set(enc)  # every cased capital became an operator + its lowercase


@settings(max_examples=300, deadline=None)
@given(st.text())
@example("")
@example("ß".upper())
@example("İ".lower())
@example("\U00010400BC d\U00010400")
def test_caseops_round_trips_any_text(text):
    _assert_lossless(text)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.sampled_from(TRICKY), max_size=40))
def test_caseops_round_trips_operators_and_irregular_case(text):
    _assert_lossless(text)


@pytest.mark.parametrize(
    "text",
    ["", "ß", "SS", "İ", "i\u0307", "ẞ", "\u212a", "ǅ", "ΣΑΣ", "A\u0301", "\U00010400", ESC, ESC * 3 + "x", TITLE + "a", SPACE_MARK * 2, SPACE_MARK_LITERAL],
)
def test_caseops_round_trips_named_cases(text):
    _assert_lossless(text)


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("The NASA Launch", f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"),
        ("McDonald", f"{TITLE}mc{CAPNEXT}donald"),
        ("iPhone", f"i{CAPNEXT}phone"),
        ("A I", f"{TITLE}a {TITLE}i"),
        ("ABc", f"{TITLE}a{CAPNEXT}bc"),
        (f"a{TITLE}B", f"a{ESC}{TITLE}{TITLE}b"),
        ("lower case only 123", "lower case only 123"),
    ],
)
def test_caseops_matches_the_record_scheme_on_ascii(text, encoded):
    """On ASCII text without U+E005 or "▁", the output is the record's lossless_caps_caseops_v1."""
    assert caseops_encode(text) == encoded


def test_caseops_lowers_unicode_case_pairs_and_leaves_irregular_letters():
    assert caseops_encode("ΣΑΣ Éa") == f"{ALLCAPS}σασ {TITLE}éa"
    assert caseops_encode("\U00010400") == TITLE + "\U00010428"
    assert caseops_encode(f"A{SPACE_MARK}B") == f"{TITLE}a{SPACE_MARK_LITERAL}{TITLE}b"
    for ch in ["ß", "İ", "\u212a", "ǅ", "Ⱥ"]:  # no one-to-one case pair (or one assigned after Unicode 3.2)
        assert caseops_encode(ch) == ch


def test_case_pairs_are_one_to_one_and_stable():
    pairs = case_pairs()
    ups = set(pairs.upper_to_lower)
    lows = {ord(c) for c in pairs.upper_to_lower.values()}
    assert len(ups) == len(lows) == len(pairs.lower_to_upper) > 700 and not ups & lows
    old = unicodedata.ucd_3_2_0
    for u, low in pairs.upper_to_lower.items():
        assert chr(u).lower() == low and low.upper() == chr(u) and len(low) == 1
        assert pairs.lower_to_upper[ord(low)] == chr(u)
        assert old.category(chr(u)) != "Cn" and old.category(low) != "Cn"  # assigned in Unicode 3.2


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (TITLE, ["TITLE", "character 0", "end of the text"]),
        (TITLE + "1", ["TITLE", "'1'"]),
        (ALLCAPS + "a", ["ALLCAPS", "2 or more"]),
        (ESC + "x", ["ESC", "'x'"]),
        ("ab" + CAPNEXT, ["CAPNEXT", "character 2"]),
    ],
)
def test_caseops_decode_refuses_dangling_operators(text, words):
    with pytest.raises(TransformError) as e:
        caseops_decode(text)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words)


# ------------------------------------------------------------------------------------------
# The sidecar file
# ------------------------------------------------------------------------------------------


def _shard_and_sidecar(tmp_path: Path, n: int = 50) -> tuple[Path, Path, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 300, size=n)
    tokens[0] = 1
    counts = rng.integers(0, 6, size=n)
    counts[0] = 0
    shard = tmp_path / "fineweb_val_000000.bin"
    write_shard(shard, tokens)
    write_sidecar(sidecar_path(shard), counts, CASEOPS)
    return shard, sidecar_path(shard), counts


def test_sidecar_round_trips_beside_its_shard(tmp_path):
    shard, side, counts = _shard_and_sidecar(tmp_path)
    assert side.name == "fineweb_val_000000.bytes" and side.stat().st_size == HEADER_BYTES + 2 * len(counts)
    body = load_sidecar(side, num_tokens=read_shard_header(shard), transform=CASEOPS)
    assert body.dtype == np.dtype("<u2") and np.array_equal(body, counts)
    assert np.array_equal(load_val_sidecars([shard], [side], CASEOPS), counts)


def _rewrite_header(path: Path, index: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[4 * index : 4 * index + 4] = np.array([value], dtype="<i4").tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-3]), ["truncated", "promises 50 tokens"]),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), ["100 bytes", "truncated"]),
        (lambda p: p.write_bytes(p.read_bytes() + b"\0\0"), ["over-long"]),
        (lambda p: _rewrite_header(p, 0, 20240520), ["wrong magic number 20240520", "token shard's magic"]),
        (lambda p: _rewrite_header(p, 0, 7), ["wrong magic number 7", str(SIDECAR_MAGIC)]),
        (lambda p: _rewrite_header(p, 1, 9), ["unsupported version 9"]),
        (lambda p: _rewrite_header(p, 2, 2**31 - 1), ["promises 2,147,483,647 tokens", "truncated"]),
        (lambda p: _rewrite_header(p, 2, -4), ["negative token count"]),
        (lambda p: _rewrite_header(p, 3, 77), ["unknown transform id 77"]),
        (lambda p: _rewrite_header(p, 4, 1), ["header says 1", "corrupt"]),
    ],
)
def test_a_damaged_sidecar_is_one_clear_error(tmp_path, damage, words):
    shard, side, _ = _shard_and_sidecar(tmp_path)
    damage(side)
    with pytest.raises(SidecarError) as e:
        load_val_sidecars([shard], [side], CASEOPS)
    msg = str(e.value)
    assert "\n" not in msg and str(side) in msg and all(w in msg for w in words), msg


def test_a_sidecar_of_another_length_or_transform_is_refused(tmp_path):
    shard, side, counts = _shard_and_sidecar(tmp_path)
    write_sidecar(side, counts[:-1], CASEOPS)
    with pytest.raises(SidecarError, match=r"counts 49 tokens but its shard holds 50"):
        load_val_sidecars([shard], [side], CASEOPS)
    write_sidecar(side, counts, IDENTITY)
    with pytest.raises(SidecarError, match=r"made for transform 'identity' but the tokenizer's transform is 'caseops'"):
        load_val_sidecars([shard], [side], CASEOPS)


@pytest.mark.parametrize(("counts", "words"), [([1, -1], "byte count -1"), ([70000], "byte count 70000"), ([1.5], "integers"), ([[1]], "1-D")])
def test_write_sidecar_refuses_counts_it_cannot_store(tmp_path, counts, words):
    with pytest.raises(SidecarError, match=words):
        write_sidecar(tmp_path / "x.bytes", counts, CASEOPS)
    assert not (tmp_path / "x.bytes").exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": "other", "version": 1, "transform": "caseops"}', "not a transform declaration"),
        ('{"format": "loopgolf-text-transform", "version": 1, "transform": "rot13"}', "unknown text transform 'rot13'"),
    ],
)
def test_a_bad_declaration_is_refused(tmp_path, content, words):
    (tmp_path / "tok.transform.json").write_text(content)
    with pytest.raises(SidecarError, match=words):
        read_declaration(tmp_path / "tok.model")


# ------------------------------------------------------------------------------------------
# Byte counts: identity sidecars reproduce the official rule, caseops sidecars the original text
# ------------------------------------------------------------------------------------------


def test_identity_sidecar_gives_the_official_byte_counts_on_real_text():
    sp = load_tokenizer(SP1024)
    tokens, counts = _stream(encode_documents(GOLDEN["texts"], sp, IDENTITY))
    assert tokens.tolist() == GOLDEN["token_ids"]  # the same tokens the official code scored
    assert counts[1:].tolist() == GOLDEN["target_bytes"]  # and the official per-target bytes
    tables = build_byte_tables(sp)
    assert count_target_bytes(tokens, tables) == (GOLDEN["num_targets"], GOLDEN["total_target_bytes"])
    assert check_sidecar(tokens, counts, piece_text(sp), IDENTITY) == GOLDEN["total_target_bytes"]


@pytest.mark.parametrize(("stride", "max_tokens"), [(16, None), (5, None), (16, 60), (3, 70)])
def test_identity_sidecar_bpb_equals_the_plain_bpb_exactly(stride, max_tokens):
    sp = load_tokenizer(SP1024)
    texts = GOLDEN["texts"] + synthetic_documents(6, seed=5)
    tokens, counts = _stream(encode_documents(texts, sp, IDENTITY))
    tables = build_byte_tables(sp)
    side = SidecarTables(tables, counts.astype(np.uint16), "identity", "test data")
    model = lookback_model(tables.vocab_size)
    plain = evaluate_bpb(model, tokens, tables, 16, stride=stride, batch_size=3, max_tokens=max_tokens)
    with_sidecar = evaluate_bpb(model, tokens, side, 16, stride=stride, batch_size=3, max_tokens=max_tokens)
    assert with_sidecar == plain
    assert plain.target_bytes > 0


def test_caseops_sidecar_counts_the_original_text_per_document(caseops_tokenizer):
    sp = load_tokenizer(caseops_tokenizer)
    encoded = encode_documents(CASEOPS_TEXTS, sp, CASEOPS)
    for text, (ids, counts) in zip(CASEOPS_TEXTS, encoded):
        assert int(counts.sum()) == len(text.encode("utf-8")), text
        pieces = [sp.id_to_piece(int(i)) for i in ids]
        escaped = False
        for piece, c in zip(pieces, counts):
            if piece in RESERVED:  # an operator stands for no original byte; an escaped one for itself
                assert c == (3 if escaped or piece == SPACE_MARK_LITERAL else 0), (text, pieces)
            escaped = piece == ESC and not escaped
    tokens, counts = _stream(encoded)
    total = sum(len(t.encode("utf-8")) for t in CASEOPS_TEXTS)
    assert check_sidecar(tokens, counts, piece_text(sp), CASEOPS) == total == counts.sum()
    # Piece bytes would count every operator as 3 bytes: more bytes, a flattering val_bpb.
    assert count_target_bytes(tokens, build_byte_tables(sp))[1] > total


def _caseops_scoring(caseops_tokenizer):
    """CASEOPS_TEXTS through the caseops tokenizer: (tokens, byte counts, byte tables, the
    tables with the counts as a sidecar)."""
    sp = load_tokenizer(caseops_tokenizer)
    tokens, counts = _stream(encode_documents(CASEOPS_TEXTS, sp, CASEOPS))
    tables = build_byte_tables(sp)
    return tokens, counts, tables, SidecarTables(tables, counts.astype(np.uint16), "caseops", "test data")


def test_caseops_evaluation_divides_by_the_original_text_bytes(caseops_tokenizer):
    tokens, counts, tables, side = _caseops_scoring(caseops_tokenizer)
    r = evaluate_bpb(lookback_model(tables.vocab_size), tokens, side, 32, stride=8, batch_size=4)  # sliding: every target scored
    assert r.num_targets == len(tokens) - 1
    assert r.target_bytes == sum(len(t.encode("utf-8")) for t in CASEOPS_TEXTS)


def test_ttt_reads_the_sidecar_too(caseops_tokenizer):
    from loopgolf.model.plan import parse_plan
    from loopgolf.ttt import TTTSpec, evaluate_ttt

    tokens, counts, tables, side = _caseops_scoring(caseops_tokenizer)
    model = random_model(parse_plan("cycle:1x2"), seed=1, vocab_size=tables.vocab_size)
    plain = evaluate_bpb(model, tokens, side, 16, stride=16, batch_size=2)
    r = evaluate_ttt(model, tokens, side, 16, TTTSpec(rank=2, lr=0.0), batch_size=2)
    assert r.adapted == plain and r.base == plain
    doc = evaluate_ttt(model, tokens, side, 16, TTTSpec(rank=2, lr=0.0, reset="doc", chunk=8), baseline=False)
    assert doc.adapted.target_bytes == int(counts.sum())  # per-document scoring covers every target


def test_early_exit_scoring_refuses_sidecar_data(caseops_tokenizer):
    """Early-exit scoring counts piece bytes; on sidecar data it must stop, not score."""
    from loopgolf.model.plan import parse_plan
    from loopgolf.serve.exits import parse_criterion
    from loopgolf.serve.scoring import evaluate_early_exit

    tokens, counts, tables, side = _caseops_scoring(caseops_tokenizer)
    model = random_model(parse_plan("cycle:1x2"), seed=1, vocab_size=tables.vocab_size)
    with pytest.raises(SidecarError, match="counts bytes from token pieces"):
        evaluate_early_exit(model, tokens, side, 8, parse_criterion("never"), max_tokens=40)


def test_a_sidecar_that_does_not_match_the_tokens_fails_the_check(caseops_tokenizer):
    sp = load_tokenizer(caseops_tokenizer)
    tokens, counts = _stream(encode_documents(CASEOPS_TEXTS, sp, CASEOPS))
    pieces = piece_text(sp)
    moved = counts.copy()
    second_doc = int(np.flatnonzero(tokens == 1)[1])
    moved[1] -= 1  # a byte moved from the first document to the second: same total
    moved[second_doc + 1] += 1
    with pytest.raises(SidecarError, match=r"document 0 \(tokens 0 to [\d,]+\): the byte sidecar gives \d+ bytes but the tokens decode to"):
        check_sidecar(tokens, moved, pieces, CASEOPS)
    identity_counts = _stream(encode_documents([caseops_encode(t) for t in CASEOPS_TEXTS], sp, IDENTITY))[1]
    with pytest.raises(SidecarError, match="does not belong to these tokens"):
        check_sidecar(tokens, identity_counts, pieces, CASEOPS)  # counted operators as bytes
    with pytest.raises(SidecarError, match="byte counts for"):
        check_sidecar(tokens, counts[:-1], pieces, CASEOPS)


def test_a_normalizing_tokenizer_cannot_make_a_caseops_sidecar():
    sp = load_tokenizer(SP1024)  # nmt_nfkc, whitespace collapsed, no byte fallback
    with pytest.raises(SidecarError, match=r"document 1: the tokenizer does not spell back the caseops-transformed text .*must be lossless"):
        encode_documents(["plain text", "Two  spaces"], sp, CASEOPS)


def test_piece_byte_paths_refuse_sidecar_tables():
    sp = load_tokenizer(SP1024)
    tokens = np.array(GOLDEN["token_ids"], dtype=np.uint16)
    side = SidecarTables(build_byte_tables(sp), np.ones(len(tokens), dtype=np.uint16), "caseops", "the test data")
    with pytest.raises(SidecarError, match="counts bytes from token pieces, but the test data has a byte sidecar"):
        target_byte_counts(tokens[:-1], tokens[1:], side)
    tally = Tally(side)
    x, y = tokens[None, :-1].astype(np.int64), tokens[None, 1:].astype(np.int64)
    with pytest.raises(SidecarError, match="stream positions"):
        tally.add(torch.zeros(y.shape), x, y, np.ones(y.shape, dtype=bool), "here")
    with pytest.raises(SidecarError, match=r"100 validation tokens given, but the byte sidecar of the test data covers 138"):
        evaluate_bpb(lookback_model(1024), tokens[:100], side, 16)


# ------------------------------------------------------------------------------------------
# Datasets: sidecars found beside the validation shards, and refused when missing
# ------------------------------------------------------------------------------------------


def _dataset(tmp_path: Path, tokenizer: Path, texts: list[str], transform, sidecar: bool = True) -> Path:
    """A dataset directory with one train and one val shard of `texts`, the tokenizer (and its
    declaration, if any) and, with `sidecar`, the val shard's byte sidecar."""
    root = tmp_path / "data"
    root.mkdir()
    shutil.copyfile(tokenizer, root / "tokenizer.model")
    if transform is not None:
        write_declaration(root / "tokenizer.model", transform)
    sp = load_tokenizer(tokenizer)
    tokens, counts = _stream(encode_documents(texts, sp, transform or IDENTITY))
    write_shard(root / "fineweb_train_000000.bin", tokens)
    write_shard(root / "fineweb_val_000000.bin", tokens)
    if sidecar:
        write_sidecar(root / "fineweb_val_000000.bytes", counts, transform or IDENTITY)
    return root


def test_dataset_with_an_identity_sidecar_scores_as_without_one(tmp_path):
    texts = GOLDEN["texts"] + synthetic_documents(4, seed=2)
    with_side = Dataset.open(_dataset(tmp_path, SP1024, texts, IDENTITY))
    assert isinstance(with_side.tables, SidecarTables) and with_side.transform == "identity"
    plain_dir = tmp_path / "plain"
    shutil.copytree(with_side.root, plain_dir)
    (plain_dir / "fineweb_val_000000.bytes").unlink()
    (plain_dir / "tokenizer.transform.json").unlink()
    plain = Dataset.open(plain_dir)
    assert not isinstance(plain.tables, SidecarTables)
    model = lookback_model(1024)
    a = evaluate_bpb(model, with_side.val_tokens(), with_side.tables, 16, stride=4)
    b = evaluate_bpb(model, plain.val_tokens(), plain.tables, 16, stride=4)
    assert a == b


def test_dataset_with_a_caseops_sidecar_is_checked_and_counts_original_bytes(tmp_path, caseops_tokenizer):
    ds = Dataset.open(_dataset(tmp_path, caseops_tokenizer, CASEOPS_TEXTS, CASEOPS))
    assert isinstance(ds.tables, SidecarTables) and ds.transform == "caseops"
    assert int(ds.tables.target_bytes.sum()) == sum(len(t.encode("utf-8")) for t in CASEOPS_TEXTS)


def test_a_transforming_tokenizer_without_sidecar_is_an_error(tmp_path, caseops_tokenizer):
    root = _dataset(tmp_path, caseops_tokenizer, CASEOPS_TEXTS, CASEOPS, sidecar=False)
    for verify in (True, False):  # not skipped by --no-verify-data: it is no check, it is the byte count
        with pytest.raises(SidecarError, match=r"declares the text transform 'caseops', but the validation shards in .* have no byte sidecars"):
            Dataset.open(root, verify=verify)


def test_a_tampered_sidecar_fails_when_the_dataset_is_opened(tmp_path, caseops_tokenizer):
    root = _dataset(tmp_path, caseops_tokenizer, CASEOPS_TEXTS, CASEOPS)
    side = root / "fineweb_val_000000.bytes"
    counts = load_sidecar(side).astype(np.int64)
    counts[1] += 1  # one byte too many in the first document
    write_sidecar(side, counts, CASEOPS)
    with pytest.raises(SidecarError, match="document 0"):
        Dataset.open(root)
    Dataset.open(root, verify=False)  # the sums against the text are part of verifying


def test_sidecar_rules_in_a_dataset_directory(tmp_path, caseops_tokenizer):
    root = _dataset(tmp_path, caseops_tokenizer, CASEOPS_TEXTS, CASEOPS)
    tokens = load_shard(root / "fineweb_val_000000.bin")
    write_shard(root / "fineweb_val_000001.bin", tokens)  # a second val shard without a sidecar
    with pytest.raises(SidecarError, match=r"fineweb_val_000001.bytes is missing, while other validation shards"):
        Dataset.open(root)
    (root / "fineweb_val_000001.bin").unlink()
    write_shard(root / "fineweb_val_bytes_000000.bin", tokens)  # the record's sidecar layout
    with pytest.raises(SidecarError, match="record's layout, which would be read as validation tokens"):
        Dataset.open(root)
    (root / "fineweb_val_bytes_000000.bin").unlink()
    (root / "tokenizer.transform.json").unlink()  # the sidecar says caseops, the tokenizer nothing
    with pytest.raises(SidecarError, match="made for transform 'caseops' but the tokenizer's transform is 'identity'"):
        Dataset.open(root)


# ------------------------------------------------------------------------------------------
# loopgolf data build --transform
# ------------------------------------------------------------------------------------------


def test_cli_builds_a_caseops_dataset_scored_on_original_bytes(tmp_path, capsys):
    from loopgolf.cli import main

    src = tmp_path / "src"
    src.mkdir()
    docs = synthetic_documents(40, seed=4) + CASEOPS_TEXTS[5:-1] * 2
    for i, d in enumerate(docs):
        (src / f"d{i:03d}.txt").write_text(d, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["data", "build", "--input", str(src), "--out", str(out), "--vocab-size", "300", "--val-docs", "6", "--transform", "caseops", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["text_transform"] == "caseops"
    assert read_declaration(out / "tokenizer.model") is CASEOPS
    sp = load_tokenizer(out / "tokenizer.model")
    assert all(sp.piece_to_id(op) != sp.unk_id() for op in RESERVED)  # operators kept whole
    ds = Dataset.open(out)
    assert isinstance(ds.tables, SidecarTables)
    assert int(ds.tables.target_bytes.sum()) == manifest["splits"]["val"]["text_bytes"]
    r = evaluate_bpb(lookback_model(ds.vocab_size), ds.val_tokens(), ds.tables, 16, stride=4)
    assert r.target_bytes == manifest["splits"]["val"]["text_bytes"]

    rc = main(["data", "build", "--input", str(src), "--out", str(tmp_path / "o2"), "--transform", "caseops", "--no-byte-fallback"])
    one_line_error(rc, capsys.readouterr().err, "byte fallback")
    rc = main(["data", "build", "--input", str(src), "--out", str(tmp_path / "o3"), "--transform", "identity", "--tokenizer", str(out / "tokenizer.model")])
    one_line_error(rc, capsys.readouterr().err, "declares the text transform 'caseops', not 'identity'")

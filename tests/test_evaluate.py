import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from loopgolf.data.shards import load_shard
from loopgolf.data.tokenizer import build_byte_tables, load_tokenizer
from loopgolf.evaluate import _windows, evaluate_bpb

ASSETS = Path(__file__).resolve().parent / "assets"  # vendored official files, see assets/README.md


class Bigram(nn.Module):
    """Context-free model: logits depend on the current token only, so every scoring mode
    gives the same loss for the same target."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x):
        return self.table[x]


@pytest.fixture(scope="module")
def golden():
    g = json.loads((ASSETS / "fixtures" / "bpb_bytes_golden.json").read_text())
    sp = load_tokenizer(ASSETS / g["tokenizer"])
    tokens = np.asarray(load_shard(ASSETS / "fixtures" / "fineweb_val_000000.bin"), dtype=np.int64)
    return g, build_byte_tables(sp, 1024), tokens


def test_uniform_model_gives_log2_vocab_times_tokens_per_byte(golden):
    g, tables, tokens = golden
    model = Bigram(1024)
    with torch.no_grad():
        model.table.zero_()
    seq_len = len(tokens) - 1  # one window covers every target
    r = evaluate_bpb(model, tokens, tables, seq_len)
    assert r.num_targets == g["num_targets"] == 137
    assert r.target_bytes == g["total_target_bytes"] == 244
    assert r.val_loss == pytest.approx(math.log(1024))
    assert r.val_bpb == pytest.approx(10.0 * 137 / 244)


def test_matches_bruteforce_official_formula(golden):
    g, tables, tokens = golden
    model = Bigram(1024, seed=3)
    seq_len = 17
    r = evaluate_bpb(model, tokens, tables, seq_len, batch_size=3)
    n = ((len(tokens) - 1) // seq_len) * seq_len
    x, y = torch.from_numpy(tokens[:n]), torch.from_numpy(tokens[1 : n + 1])
    nll = torch.nn.functional.cross_entropy(model.table.detach()[x].double(), y, reduction="none")
    byte_counts = np.asarray(g["target_bytes"][:n])
    expected_loss = float(nll.mean())
    assert r.num_targets == n and r.target_bytes == int(byte_counts.sum())
    assert r.val_loss == pytest.approx(expected_loss, rel=1e-6)
    assert r.val_bpb == pytest.approx(expected_loss / math.log(2) * n / byte_counts.sum(), rel=1e-6)


def test_sliding_window_scores_each_target_once(golden):
    _, tables, tokens = golden
    model = Bigram(1024, seed=5)
    for seq_len, stride in [(16, 4), (16, 16), (20, 7), (137, 1)]:
        wins = _windows(len(tokens), seq_len, stride)
        scored = [t for start, end, first in wins for t in range(first, end)]
        if stride < seq_len:
            assert scored == list(range(len(tokens) - 1))
            assert all(end - start <= seq_len for start, end, _ in wins)
    full = evaluate_bpb(model, tokens, tables, 137)
    slide = evaluate_bpb(model, tokens, tables, 16, stride=4)
    assert slide.num_targets == full.num_targets == 137
    # A context-free model cannot benefit from context, so the scores agree exactly.
    assert slide.val_loss == pytest.approx(full.val_loss, rel=1e-9)
    assert slide.val_bpb == pytest.approx(full.val_bpb, rel=1e-9)


def test_bad_arguments(golden):
    _, tables, tokens = golden
    model = Bigram(1024)
    with pytest.raises(ValueError, match="stride"):
        evaluate_bpb(model, tokens, tables, 16, stride=17)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        evaluate_bpb(model, tokens, tables, 1000)

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import lookback_model, tiny_model
from torch import nn

from loopgolf.data.shards import load_shard
from loopgolf.data.tokenizer import build_byte_tables, load_tokenizer
from loopgolf.evaluate import evaluate_bpb, scoring_windows

ASSETS = Path(__file__).resolve().parent / "assets"  # vendored official files, see assets/README.md


class Bigram(nn.Module):
    """Context-free model: logits depend on the current token only, so every scoring mode
    gives the same loss for the same target."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x):
        return self.table[x]


def tiny_gpt(seed: int = 0) -> nn.Module:
    """A tiny loopgolf GPT with every weight random: the zero-initialised output projections of a
    fresh model would leave it context-free."""
    from loopgolf.model.plan import PlanSpec

    model = tiny_model(seed=seed, vocab_size=1024, num_heads=2, num_kv_heads=1, plan=PlanSpec("vanilla", layers=2), max_seq_len=64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() >= 2 else 0.2) + (1.0 if p.dim() < 2 else 0.0))
    return model


def reference_nll(model: nn.Module, tokens: np.ndarray, seq_len: int, stride: int, shorten: int = 0) -> tuple[float, list[int]]:
    """Summed NLL (nats) and the scored target positions, straight from the definition, one model
    call per target. Target t (predicting tokens[t + 1]) is scored once, from the window start s
    that gives it the most context while keeping t - s < seq_len among starts 0, stride, 2 stride,
    ...: s = 0 for t < seq_len, else the smallest multiple of stride above t - seq_len; so it sees
    at least seq_len - stride tokens of context. Non-overlapping scoring (stride = seq_len) keeps
    only the first multiple of seq_len targets. The model sees exactly tokens[s : t + 1].
    `shorten` drops that many tokens from the front of every context (a deliberately wrong window)."""
    last = len(tokens) - 1
    targets = list(range(last)) if stride < seq_len else list(range((last // seq_len) * seq_len))
    total = 0.0
    with torch.no_grad():
        for t in targets:
            s = 0 if t < seq_len else stride * ((t - seq_len) // stride + 1)
            assert 0 <= t - s < seq_len and (t < seq_len or t - s >= seq_len - stride)
            s = min(s + shorten, t)
            logits = model(torch.from_numpy(tokens[s : t + 1])[None])[0, -1].double()
            total -= float(torch.log_softmax(logits, dim=-1)[int(tokens[t + 1])])
    return total, targets


@pytest.mark.parametrize("make_model", [lambda: lookback_model(1024, seed=7), lambda: tiny_gpt(seed=2)], ids=["lookback", "gpt"])
def test_sliding_window_matches_bruteforce_with_context_model(golden, make_model):
    g, tables, tokens = golden
    model = make_model()
    byte_counts = np.asarray(g["target_bytes"])
    # (16, 5) ends with a shorter window, batched with full ones (padding); (16, 16) is non-overlapping.
    for seq_len, stride, batch_size in [(16, 5, 3), (20, 7, 8), (8, 1, 5), (16, 16, 2), (40, 13, 1)]:
        r = evaluate_bpb(model, tokens, tables, seq_len, stride=stride, batch_size=batch_size)
        total, targets = reference_nll(model, tokens, seq_len, stride)
        assert r.num_targets == len(targets)
        assert r.target_bytes == int(byte_counts[targets].sum())
        assert r.val_loss * r.num_targets == pytest.approx(total, rel=1e-6), (seq_len, stride)
        assert r.val_bpb == pytest.approx(total / math.log(2) / r.target_bytes, rel=1e-6)
        # The model really uses its context: one token less of it changes the total clearly.
        wrong, _ = reference_nll(model, tokens, seq_len, stride, shorten=1)
        assert abs(wrong - total) > 1e-3 * abs(total)


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
        wins = scoring_windows(len(tokens), seq_len, stride)
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


def test_non_finite_loss_stops_with_an_error_naming_where(golden):
    _, tables, tokens = golden
    model = Bigram(1024)
    with torch.no_grad():
        model.table[int(tokens[100])] = float("nan")  # one poisoned row: the batches holding it score NaN
    with pytest.raises(FloatingPointError, match=r"evaluation loss is nan in the windows starting at token"):
        evaluate_bpb(model, tokens, tables, 16, batch_size=2)

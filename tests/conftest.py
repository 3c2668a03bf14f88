"""Shared fixtures: small synthetic datasets built with loopgolf's own tools (no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

WORDS = (
    "the model stores a few unique blocks and runs them many times while each loop adds depth "
    "without adding bytes so the saved budget can buy width precision or adapters for every layer "
    "data flows through attention and mlp sublayers with residual mixes scales and gains that keep "
    "training stable across loops of shared weights compressed into an artifact under the cap"
).split()


def synthetic_documents(n_docs: int, seed: int = 0, words_per_doc: tuple[int, int] = (40, 160)) -> list[str]:
    """English-like documents with enough repetition for a tokenizer and a model to learn."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        n = rng.randint(*words_per_doc)
        sentences, sentence = [], []
        for _ in range(n):
            sentence.append(rng.choice(WORDS))
            if len(sentence) > rng.randint(6, 14):
                sentences.append(" ".join(sentence).capitalize() + rng.choice([".", ".", "!", "?"]))
                sentence = []
        if sentence:
            sentences.append(" ".join(sentence).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


def markov_tokens(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """A learnable token stream: documents (BOS=1) of a sparse first-order Markov chain."""
    rng = np.random.default_rng(seed)
    nxt = rng.integers(4, vocab, size=(vocab, 3))
    out = np.empty(n, dtype=np.uint16)
    tok = 4
    for i in range(n):
        if i % 200 == 0:
            tok = 1
        else:
            tok = int(nxt[tok, rng.integers(0, 3)]) if tok != 1 else int(rng.integers(4, vocab))
        out[i] = tok
    return out


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory) -> Path:
    """A dataset built by `build_dataset` from synthetic text files (trained 384-piece tokenizer)."""
    from loopgolf.data.corpus import build_dataset

    src = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(synthetic_documents(400, seed=1)):
        (src / f"doc{i:04d}.txt").write_text(doc, encoding="utf-8")
    out = tmp_path_factory.mktemp("data") / "synthetic"
    build_dataset([src], out, vocab_size=384, val_docs=20, seed=0, progress=False)
    return out


def output_error(w, deq, H) -> float:
    """``tr((W - Q) H (W - Q)^T)``: a linear layer's summed squared output error over inputs with
    Hessian ``H = E[x x^T]`` when ``W`` is replaced by ``Q`` (what GPTQ minimises)."""
    d = (w - deq).double()
    return float(((d @ H.double()) * d).sum())

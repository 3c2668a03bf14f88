"""Plain helpers the tests share: synthetic data, the tiny model, an error measure.

Tests import them with ``from helpers import ...`` (``tests/`` has no ``__init__.py``, so pytest
puts it on ``sys.path``); fixtures stay in ``conftest.py``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from loopgolf.model.gpt import GPT, ModelConfig

WORDS = (
    "the model stores a few unique blocks and runs them many times while each loop adds depth "
    "without adding bytes so the saved budget can buy width precision or adapters for every layer "
    "data flows through attention and mlp sublayers with residual mixes scales and gains that keep "
    "training stable across loops of shared weights compressed into an artifact under the cap"
).split()

# The tiny model most tests build: 32 wide, 4 query heads sharing 2 key/value heads, MLP 2x wide.
# The model itself is imported lazily so that importing this module (conftest does) stays light.
TINY: dict[str, Any] = dict(vocab_size=64, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2)


def tiny_config(**changes: Any) -> ModelConfig:
    """The tiny model's config, with ``changes`` (any ModelConfig field) on top."""
    from loopgolf.model.gpt import ModelConfig

    return ModelConfig(**{**TINY, **changes})


def tiny_model(*, seed: int = 0, **changes: Any) -> GPT:
    """``torch.manual_seed(seed)`` then ``GPT(tiny_config(**changes))``."""
    import torch

    from loopgolf.model.gpt import GPT

    torch.manual_seed(seed)
    return GPT(tiny_config(**changes))


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


def output_error(w, deq, H) -> float:
    """``tr((W - Q) H (W - Q)^T)``: a linear layer's summed squared output error over inputs with
    Hessian ``H = E[x x^T]`` when ``W`` is replaced by ``Q`` (what GPTQ minimises)."""
    d = (w - deq).double()
    return float(((d @ H.double()) * d).sum())

"""Plain helpers the tests share: synthetic data, the tiny model, an error measure.

Tests import them with ``from helpers import ...`` (``tests/`` has no ``__init__.py``, so pytest
puts it on ``sys.path``); fixtures stay in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
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


def one_line_error(code: int, err: str, *words: str) -> None:
    """A bad input's outcome: exit status 2 and one line on stderr, naming the error (and each
    of ``words``), no traceback."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], err


def random_model(plan, seed: int = 0, **changes: Any):
    """A tiny model (context 64 unless ``changes`` say otherwise) with every parameter random:
    zero-initialised projections would hide bugs in the serving paths."""
    import torch

    from loopgolf.model.gpt import GPT

    torch.manual_seed(seed)
    model = GPT(tiny_config(**{"max_seq_len": 64, **changes, "plan": plan}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(artifact, tokenizer, *, slots: int = 4, max_queue: int = 16, **cfg: Any) -> Iterator[tuple[str, Any, Any]]:
    """An in-process uvicorn server on a free localhost port, as `loopgolf serve` runs it (the read
    deadline included), stopped on exit: yields (base url, the opened model, the engine)."""
    import threading
    import time

    import uvicorn

    from loopgolf.serve.engine import Engine
    from loopgolf.serve.server import ServerConfig, build_app, uvicorn_config
    from loopgolf.sources.open import open_for_text

    served = open_for_text(artifact, tokenizer)
    engine = Engine(served.model, schedule="depthwise", slots=slots, max_len=96, decode=served.tokenizer.decode, max_queue=max_queue)
    port = free_port()
    config = ServerConfig("tiny", port=port, **cfg)
    app = build_app(engine, served.tokenizer, config)
    server = uvicorn.Server(uvicorn_config(app, config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", served, engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive()


def post_completion(url: str, body: Any, raw: bytes | None = None) -> tuple[int, dict]:
    """POST ``body`` (or the bytes ``raw``) to ``url``/v1/completions: (status, JSON answer)."""
    import json
    import urllib.error
    import urllib.request

    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def random_byte_tables(vocab: int, seed: int = 0):
    """Byte tables for a ``vocab``-id tokenizer with 1-3 bytes per id and some leading spaces."""
    from loopgolf.data.tokenizer import ByteTables

    rng = np.random.default_rng(seed)
    return ByteTables(
        base_bytes=rng.integers(1, 4, size=vocab).astype(np.int64),
        has_leading_space=rng.random(vocab) < 0.3,
        is_boundary=np.zeros(vocab, dtype=bool),
    )


def fake_summary(**values) -> dict:
    """A complete summary.json (every RunSummary field) with ``values`` in it: the numbers of a
    run that never trained, for the store and report tests."""
    s = {
        "val_bpb_pre": 2.0,
        "val_bpb_post": 2.0,
        "val_loss_pre": 1.4,
        "val_loss_post": 1.4,
        "quant_gap_bpb": 0.0,
        "baseline_xz_bpb": None,
        "baseline_xz_approximate": None,
        "baseline_xz_unknown_targets": None,
        "artifact_bytes": 1000,
        "model_bytes": 900,
        "code_bytes": 100,
        "code_id": "0" * 64,
        "code_bytes_scoring": None,
        "code_form": "plain",
        "cap_bytes": 16_000_000,
        "headroom_bytes": 0,
        "fits": True,
        "codec": "zlib",
        "quant": "int8",
        "qat": {"mode": "off", "start_frac": 0.85},
        "export": {},
        "unique_params": 1000,
        "effective_params": 1000,
        "train_tokens": 256,
        "train_seconds": 1.0,
        "tokens_per_second": 256.0,
        "steps": 1,
        "stage_steps": [],
        "final_train_loss": 3.0,
        "val_targets": 100,
        "val_target_bytes": 300,
        "eval_seq_len": 32,
        "eval_stride": None,
        "device": "cpu",
        "world_size": 1,
        "resumed_from": None,
        "preset": "debug",
        "seed": 0,
        "plan": {"spec": {"kind": "vanilla"}, "virtual_layers": 2, "attn_of": [0, 1]},
        "data": "synthetic",
        "artifact": "artifact.lgz",
        "total_seconds": 1.0,
        "loopgolf_version": "0.1.0",
        "torch_version": "x",
        "uptrain": None,
        "eval_compute": None,
    }
    s.update(values)
    s["model_bytes"] = s["artifact_bytes"] - s["code_bytes"]
    s["headroom_bytes"] = s["cap_bytes"] - s["artifact_bytes"]
    return s


def lookback_model(vocab: int, seed: int = 0):
    """A causal, context-dependent model: logits at position t are A[x_t] + B[x_{t-1}] +
    C[x_{t-3}], where a position before the start of the window reads an extra "absent" row. Its
    score for a target therefore depends on where the window starts: a wrong window changes the
    loss. (torch is imported here, not at the top, so that importing helpers stays light.)"""
    import torch
    from torch import nn

    class Lookback(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            self.vocab = vocab
            self.a = nn.Parameter(torch.randn(vocab, vocab, generator=g))
            self.b = nn.Parameter(torch.randn(vocab + 1, vocab, generator=g))
            self.c = nn.Parameter(torch.randn(vocab + 1, vocab, generator=g))

        def forward(self, x):
            t = x.size(1)
            xp = torch.cat([torch.full((x.size(0), 3), self.vocab, dtype=x.dtype), x], dim=1)  # xp[:, i + 3] = x[:, i]
            return self.a[x] + self.b[xp[:, 2 : 2 + t]] + self.c[xp[:, :t]]

    return Lookback()


# The model fields the Parameter Golf record's architecture options added (each marked
# ADDED_LATER): what a config written before them lacks.
RECORD_MODEL_FIELDS = (
    "ln_scale",
    "rope_dims",
    "xsa",
    "attn_gate",
    "attn_gate_scale",
    "gate_window",
    "skip_gates",
    "smear_gate",
    "smear_bos_id",
    "parallel_from",
    "parallel_lanes",
)

"""Shared fixtures: small synthetic datasets built with loopgolf's own tools (no downloads).

Plain helpers (data generators, the tiny model config) live in ``helpers.py``: tests import them
with ``from helpers import ...``, never from conftest."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import random_model, synthetic_documents


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


@pytest.fixture(scope="session")
def tiny_artifact(text_dataset, tmp_path_factory):
    """A random cycle model over the synthetic dataset's 384-piece tokenizer, exported at int8:
    what the serving tests serve."""
    from loopgolf.data.stats import find_tokenizer
    from loopgolf.export.pack import export_model
    from loopgolf.model.plan import PlanSpec

    model = random_model(PlanSpec("cycle", layers=2, loops=2), seed=8, vocab_size=384, max_seq_len=128)
    path = tmp_path_factory.mktemp("artifact") / "tiny.ptz"
    export_model(model, path, bits=8)
    return path, find_tokenizer(text_dataset)

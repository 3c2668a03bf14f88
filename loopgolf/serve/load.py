"""Find what serving needs from an artifact file or a run directory: the model and its tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from loopgolf.data.stats import find_tokenizer
from loopgolf.data.tokenizer import load_tokenizer
from loopgolf.export.pack import load_model
from loopgolf.model.gpt import GPT
from loopgolf.run import ARTIFACT_NAME


@dataclass
class Served:
    model: GPT
    tokenizer: object  # a SentencePieceProcessor
    artifact: Path
    tokenizer_path: Path
    seq_len: int  # the context the model was trained at
    name: str  # what the server calls it


def run_data_dir(run_dir: Path) -> Path | None:
    """The data directory a run directory trained on (its config.json's data_dir), if it exists."""
    cfg = run_dir / "config.json"
    if not cfg.is_file():
        return None
    try:
        data_dir = json.loads(cfg.read_text(encoding="utf-8")).get("data_dir")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{cfg} is not a valid run config: {e}") from None
    return Path(data_dir) if isinstance(data_dir, str) and Path(data_dir).is_dir() else None


def _run_tokenizer(run_dir: Path) -> Path | None:
    data_dir = run_data_dir(run_dir)
    return None if data_dir is None else find_tokenizer(data_dir)


def load_served(path: str | Path, tokenizer: str | Path | None = None, device: torch.device | str = "cpu") -> Served:
    """``path`` is an artifact or a run directory holding one; the tokenizer is ``tokenizer``,
    else the one of the data the run trained on (the run directory's, or the artifact's folder's)."""
    path = Path(path)
    artifact = path / ARTIFACT_NAME if path.is_dir() else path
    if not artifact.is_file():
        what = f"run directory {path} has no {ARTIFACT_NAME} (is the run finished?)" if path.is_dir() else f"no artifact at {path}"
        raise ValueError(what)
    tok = Path(tokenizer) if tokenizer else _run_tokenizer(artifact.parent)
    if tok is None:
        raise ValueError(f"no tokenizer found for {artifact}: pass --tokenizer MODEL (the SentencePiece model it was trained with)")
    sp = load_tokenizer(tok)
    model, loaded = load_model(artifact, device=device)
    if sp.get_piece_size() > model.config.vocab_size:
        raise ValueError(f"tokenizer {tok} has {sp.get_piece_size()} pieces but the model's vocabulary is {model.config.vocab_size}")
    model.eval()
    seq_len = int(loaded.meta.get("seq_len", model.config.max_seq_len))
    name = artifact.parent.name if artifact.name == ARTIFACT_NAME else artifact.stem
    return Served(model, sp, artifact, tok, seq_len, name)

"""One prepared dataset directory: its train/val shards, tokenizer and official byte tables.

What both training (``loopgolf run``) and scoring (``loopgolf eval``) open; it imports no training code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loopgolf.data.shards import find_shards, load_tokens
from loopgolf.data.stats import find_tokenizer
from loopgolf.data.tokenizer import ByteTables, build_byte_tables, load_tokenizer


@dataclass
class Dataset:
    """Shards, tokenizer and byte tables of one prepared dataset directory."""

    root: Path
    train_shards: list[Path]
    val_shards: list[Path]
    tokenizer_path: Path
    vocab_size: int
    tables: ByteTables

    @classmethod
    def open(cls, root: Path, tokenizer: Path | None = None) -> "Dataset":
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"data directory {root} does not exist")
        tok = Path(tokenizer) if tokenizer else find_tokenizer(root)
        if tok is None:
            raise ValueError(f"no tokenizer found for {root}: pass --tokenizer MODEL (a SentencePiece .model file)")
        sp = load_tokenizer(tok)
        vocab = sp.get_piece_size()
        return cls(root, find_shards(root, "train"), find_shards(root, "val"), tok, vocab, build_byte_tables(sp, vocab))

    def val_tokens(self) -> np.ndarray:
        return load_tokens(self.val_shards, vocab_size=self.vocab_size)

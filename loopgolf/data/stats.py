"""Dataset statistics: documents, tokens and bytes per token of each shard and split.

Bytes follow the official val_bpb rule (loopgolf.data.tokenizer), so `bytes_per_token` is the factor
that turns a per-token loss into bits per byte: bpb = loss / ln 2 / bytes_per_token.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from loopgolf.data.shards import BOS_ID, find_shards, load_shard
from loopgolf.data.tokenizer import (
    ByteTables,
    TokenizerError,
    build_byte_tables,
    count_target_bytes,
    load_tokenizer,
)

_SHARD_NAME = re.compile(r"^fineweb_(?P<split>[A-Za-z0-9]+)_\d+\.bin$")
_OFFICIAL_DIR = re.compile(r"^fineweb10B_sp(?P<vocab>\d+)$")
_CHUNK = 1 << 24


def find_tokenizer(data_dir: str | os.PathLike) -> Path | None:
    """Locate the tokenizer that belongs to a dataset directory, or None.

    Tried in order: `manifest.json` with a "tokenizer" path (relative to the dataset directory);
    a single `*.model` file in the directory; the official layout
    `data/datasets/fineweb10B_sp{V}/` -> `data/tokenizers/fineweb_{V}_bpe.model`.
    """
    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.json"
    if manifest.is_file():
        try:
            meta = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise TokenizerError(f"dataset manifest {manifest} is not valid JSON: {e}") from e
        name = meta.get("tokenizer") if isinstance(meta, dict) else None
        if isinstance(name, str) and name:
            path = data_dir / name
            if not path.is_file():
                raise TokenizerError(f"dataset manifest {manifest} names tokenizer {name!r}, but {path} does not exist")
            return path
    models = sorted(data_dir.glob("*.model"))
    if len(models) == 1:
        return models[0]
    m = _OFFICIAL_DIR.match(data_dir.name)
    if m and data_dir.parent.name == "datasets":
        path = data_dir.parent.parent / "tokenizers" / f"fineweb_{m['vocab']}_bpe.model"
        if path.is_file():
            return path
    return None


def _split_of(path: Path) -> str:
    m = _SHARD_NAME.match(path.name)
    return m["split"] if m else "other"


def _resolve_shards(data: str | os.PathLike | Sequence) -> tuple[list[Path], Path | None]:
    """Shard files to describe, and the directory to look for a tokenizer in."""
    if isinstance(data, (str, os.PathLike)) and Path(data).is_dir():
        directory = Path(data)
        paths = sorted(directory.glob("fineweb_*.bin"))
        if not paths:
            raise ValueError(f"no fineweb_*.bin shards in directory {directory}")
        return paths, directory
    if isinstance(data, (str, os.PathLike)):
        paths = find_shards(data, split="")  # a file or a glob; the split is not used there
    else:
        paths = find_shards(list(data), split="")
    parents = {p.resolve().parent for p in paths}
    return paths, parents.pop() if len(parents) == 1 else None


def _count_documents(tokens: np.ndarray) -> int:
    return sum(int(np.count_nonzero(tokens[i : i + _CHUNK] == BOS_ID)) for i in range(0, len(tokens), _CHUNK))


def _ratio(num: int | None, den: int) -> float | None:
    return None if num is None or den == 0 else num / den


def _shard_stats(path: Path, tables: ByteTables | None) -> dict:
    tokens = load_shard(path, vocab_size=tables.vocab_size if tables else None, mmap=True)
    n = int(len(tokens))
    targets = max(n - 1, 0)
    target_bytes = count_target_bytes(tokens, tables)[1] if tables else None
    return {
        "path": str(path),
        "split": _split_of(path),
        "documents": _count_documents(tokens),
        "tokens": n,
        "targets": targets,
        "target_bytes": target_bytes,
        "bytes_per_token": _ratio(target_bytes, targets),
    }


def _totals(rows: list[dict], with_bytes: bool) -> dict:
    targets = sum(r["targets"] for r in rows)
    target_bytes = sum(r["target_bytes"] for r in rows) if with_bytes else None
    return {
        "shards": len(rows),
        "documents": sum(r["documents"] for r in rows),
        "tokens": sum(r["tokens"] for r in rows),
        "targets": targets,
        "target_bytes": target_bytes,
        "bytes_per_token": _ratio(target_bytes, targets),
    }


def dataset_stats(
    data: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: str | os.PathLike | None = None,
) -> dict:
    """Describe shards: per shard and per split documents, tokens, targets and target bytes.

    `data` is a directory (all its `fineweb_*.bin`, both splits), a glob, a file or a list of files.
    Without `tokenizer`, one is looked for next to the shards (`find_tokenizer`); if none is found,
    byte counts are None.

    Each shard is scored on its own, the way val_bpb scores the concatenated validation tokens:
    its targets are tokens[1:] with previous tokens tokens[:-1], so a shard of n tokens has n - 1
    targets (the first token, a BOS, is never a target). Sums over shards therefore differ from a
    concatenation by one target per shard boundary.
    """
    paths, directory = _resolve_shards(data)
    tok_path = Path(tokenizer) if tokenizer is not None else None
    if tok_path is None and directory is not None:
        tok_path = find_tokenizer(directory)
    tables = build_byte_tables(load_tokenizer(tok_path)) if tok_path is not None else None

    rows = [_shard_stats(p, tables) for p in paths]
    with_bytes = tables is not None
    splits: dict[str, dict] = {}
    for split in dict.fromkeys(r["split"] for r in rows):  # first-seen order
        splits[split] = _totals([r for r in rows if r["split"] == split], with_bytes)
    overall = _totals(rows, with_bytes)
    return {
        "shards": rows,
        "tokenizer": str(tok_path) if tok_path is not None else None,
        "splits": splits,
        "tokens": overall["tokens"],
        "targets": overall["targets"],
        "target_bytes": overall["target_bytes"],
        "documents": overall["documents"],
        "bytes_per_token": overall["bytes_per_token"],
    }


def _fmt_int(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def _fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def format_stats(stats: dict) -> str:
    """Render `dataset_stats` output as an aligned text table (a row per shard, totals per split)."""
    header = ["shard", "split", "documents", "tokens", "targets", "target_bytes", "bytes/token"]
    body: list[list[str]] = []

    def row(name: str, split: str, d: dict) -> list[str]:
        return [
            name,
            split,
            _fmt_int(d["documents"]),
            _fmt_int(d["tokens"]),
            _fmt_int(d["targets"]),
            _fmt_int(d["target_bytes"]),
            _fmt_ratio(d["bytes_per_token"]),
        ]

    for split, totals in stats["splits"].items():
        for shard in stats["shards"]:
            if shard["split"] == split:
                body.append(row(Path(shard["path"]).name, split, shard))
        body.append(row(f"total {split} ({totals['shards']} shards)", split, totals))
    body.append(row(f"total ({len(stats['shards'])} shards)", "all", stats))

    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # names left-aligned, numbers right-aligned so digits line up
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [f"tokenizer: {stats.get('tokenizer') or '(none: byte counts unavailable)'}", line(header), rule]
    for cells in body:
        if cells[0].startswith("total"):
            lines += [line(cells), rule]
        else:
            lines.append(line(cells))
    return "\n".join(lines)

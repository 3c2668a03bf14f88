"""Token shards in the official Parameter Golf format, and a streaming loader over them.

A shard is a 1024-byte header of 256 little-endian int32 (magic, version, number of tokens, zeros)
followed by that many little-endian uint16 token ids. Documents are BOS (id 1) + tokens, concatenated.
Train shards hold 1e8 tokens (200 MB), so everything here works on memory maps and never copies a
whole shard per batch.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from loopgolf.util import atomic_write_bytes

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4  # 1024
BOS_ID = 1
MAX_TOKEN_ID = 65535  # body is uint16

_HEADER_DTYPE = np.dtype("<i4")
_TOKEN_DTYPE = np.dtype("<u2")
_GLOB_CHARS = frozenset("*?[")


class ShardError(ValueError):
    """A shard file is missing, malformed, or does not match the tokenizer/model vocabulary."""


# --------------------------------------------------------------------------------------------
# Writing and reading single shards
# --------------------------------------------------------------------------------------------


def as_uint16_body(
    values: np.ndarray | Sequence[int], where: str, *, items: str = "tokens", item: str = "token id", body: str = "shard", error: type[ValueError] = ShardError
) -> np.ndarray:
    """Validate the values of a uint16 file body (integers, 1-D, within [0, 65535]) before any
    narrowing cast can wrap them: a shard's token ids, or (named by ``items``, ``item``, ``body``
    and raising ``error``) a byte sidecar's counts."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise error(f"{where}: {items} must be a 1-D sequence, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=_TOKEN_DTYPE)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise error(f"{where}: {item}s must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi > MAX_TOKEN_ID:
        bad = lo if lo < 0 else hi
        raise error(f"{where}: {item} {bad} is outside [0, {MAX_TOKEN_ID}] (the {body} body is uint16)")
    return arr.astype(_TOKEN_DTYPE, copy=False)


def write_shard(path: str | os.PathLike, tokens: np.ndarray | Sequence[int], vocab_size: int | None = None) -> None:
    """Write `tokens` as an official-format shard at `path`, atomically (all or nothing).

    `vocab_size`, when given, rejects ids >= vocab_size: writing them would only fail later, at
    training time, far from the cause.
    """
    path = Path(path)
    arr = as_uint16_body(tokens, f"shard {path}")
    if vocab_size is not None and arr.size and int(arr.max()) >= vocab_size:
        raise ShardError(f"shard {path}: token id {int(arr.max())} >= vocab_size {vocab_size}; the tokenizer and the declared vocabulary do not match")
    header = np.zeros(HEADER_INTS, dtype=_HEADER_DTYPE)
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, arr.size
    atomic_write_bytes(path, header.tobytes() + arr.tobytes())


def read_shard_header(path: str | os.PathLike) -> int:
    """Check a shard's header and file size; return its number of tokens."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} does not exist (or is not a file)")
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"shard {path}: header is {len(raw)} bytes, expected {HEADER_BYTES}; the file is truncated or not a token shard")
    header = np.frombuffer(raw, dtype=_HEADER_DTYPE)
    if int(header[0]) != SHARD_MAGIC:
        raise ShardError(f"shard {path}: wrong magic number {int(header[0])} (expected {SHARD_MAGIC}); not an official-format token shard")
    if int(header[1]) != SHARD_VERSION:
        raise ShardError(f"shard {path}: unsupported version {int(header[1])} (expected {SHARD_VERSION})")
    num_tokens = int(header[2])
    if num_tokens < 0:
        raise ShardError(f"shard {path}: negative token count {num_tokens} in header")
    expected = HEADER_BYTES + 2 * num_tokens
    actual = path.stat().st_size
    if actual != expected:
        kind = "truncated" if actual < expected else "over-long"
        raise ShardError(f"shard {path}: file is {actual} bytes but the header promises {num_tokens} tokens ({expected} bytes); the file is {kind}")
    return num_tokens


def _check_vocab(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    if tokens.size == 0:
        return
    hi = int(tokens.max())
    if hi >= vocab_size:
        raise ShardError(
            f"{where}: token id {hi} >= vocab_size {vocab_size}; the tokenizer/model vocabulary does not match the one these shards were made with"
        )


def load_shard(path: str | os.PathLike, vocab_size: int | None = None, mmap: bool = True) -> np.ndarray:
    """Return a shard's token ids as uint16 (a read-only np.memmap when `mmap`).

    With `vocab_size`, the whole shard is scanned once for ids the model cannot embed.
    """
    path = Path(path)
    n = read_shard_header(path)
    if n == 0:
        tokens: np.ndarray = np.zeros(0, dtype=_TOKEN_DTYPE)  # mmap of zero bytes is an error
    elif mmap:
        tokens = np.memmap(path, dtype=_TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n,))
    else:
        tokens = np.fromfile(path, dtype=_TOKEN_DTYPE, count=n, offset=HEADER_BYTES)
    if vocab_size is not None:
        _check_vocab(tokens, vocab_size, f"shard {path}")
    return tokens


# --------------------------------------------------------------------------------------------
# Finding and concatenating shards
# --------------------------------------------------------------------------------------------


def find_shards(data: str | os.PathLike | Sequence, split: str) -> list[Path]:
    """Resolve `data` to a list of shard files for `split`.

    `data` is a directory (its `fineweb_{split}_*.bin`, sorted), a glob pattern (sorted matches;
    a literal "{split}" in it is replaced by the split), a single shard file, or a list of files
    (kept in the given order, each must exist).
    """
    if isinstance(data, (str, os.PathLike)):
        text = os.fspath(data).replace("{split}", split)
        path = Path(text)
        if path.is_dir():
            found = sorted(path.glob(f"fineweb_{split}_*.bin"))
            if not found:
                raise ValueError(f"no fineweb_{split}_*.bin shards in directory {path}; build or download the dataset first")
            return found
        if _GLOB_CHARS & set(text):
            found = [Path(p) for p in sorted(glob.glob(text)) if Path(p).is_file()]
            if not found:
                raise ValueError(f"no shard files match the pattern {text!r}")
            return found
        if path.is_file():
            return [path]
        raise ValueError(f"data path {path} does not exist (expected a directory, glob or file)")
    paths = [Path(p) for p in data]
    if not paths:
        raise ValueError(f"empty list of shard files given for split {split!r}")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"shard files not found: {', '.join(missing)}")
    return paths


def load_tokens(paths: Sequence[str | os.PathLike], vocab_size: int | None = None) -> np.ndarray:
    """Concatenate whole shards into one in-memory uint16 array (meant for the validation split)."""
    if not paths:
        raise ValueError("load_tokens: no shard paths given")
    parts = [load_shard(p, vocab_size=vocab_size, mmap=True) for p in paths]
    return np.concatenate(parts).astype(_TOKEN_DTYPE, copy=False)


# --------------------------------------------------------------------------------------------
# Streaming loader
# --------------------------------------------------------------------------------------------


@dataclass
class _Position:
    """Where the next token of the stream comes from."""

    epoch: int = 0  # completed passes over all shards
    index: int = 0  # position in this epoch's shard order
    offset: int = 0  # token offset inside that shard
    tokens_seen: int = 0  # tokens consumed so far (taken or skipped), for logs and checks


class TokenLoader:
    """Streams training windows from shards, memory-mapped, wrapping around at the end.

    All ranks walk the same stream; each batch advances it by `world_size * local_tokens` tokens
    and rank r takes the r-th run of `local_tokens` inputs plus one look-ahead token for its last
    target. Unlike the official loader (which drops one token per rank), the concatenation of
    the ranks' rows is then exactly what one process reading `world_size * local_tokens` gets, so
    the global batch does not depend on the world size, and every token is a target once. Ranks
    share no targets and need no communication. A rank copies only its own span: the other
    ranks' spans are skipped by moving the position, never read.

    `seed=None` reads the shards in the given order from token 0 (official behaviour). With an
    int seed, each epoch uses a permutation of the shard order drawn from (seed, epoch), and the
    first epoch starts at a seeded offset in its first shard; equal seeds give equal streams.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed is not None and seed < 0:
            raise ValueError(f"seed must be a non-negative int or None, got {seed}")
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("TokenLoader: no shard paths given")
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.vocab_size = vocab_size
        # Headers only: cheap, and catches bad files before training starts.
        self.lengths = [read_shard_header(p) for p in self.paths]
        if sum(self.lengths) == 0:
            raise ShardError(f"all {len(self.paths)} training shards are empty")
        self._maps: dict[int, np.ndarray] = {}
        self._order_cache: tuple[int, list[int]] = (-1, [])
        self._pos = _Position()
        if seed is not None:
            first = self._order(0)[0]
            rng = np.random.default_rng([seed, 0x5EED])
            self._pos.offset = int(rng.integers(0, max(self.lengths[first], 1)))
        self._normalize()

    # -- stream mechanics ------------------------------------------------------------------

    def _order(self, epoch: int) -> list[int]:
        """Shard order of one epoch (cached: it is asked for on every shard switch)."""
        if self._order_cache[0] != epoch:
            if self.seed is None:
                order = list(range(len(self.paths)))
            else:
                rng = np.random.default_rng([self.seed, epoch])
                order = [int(i) for i in rng.permutation(len(self.paths))]
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _current_shard(self) -> int:
        return self._order(self._pos.epoch)[self._pos.index]

    def _normalize(self) -> None:
        """Move past exhausted (or empty) shards so the position always names a readable token."""
        pos = self._pos
        while pos.offset >= self.lengths[self._current_shard()]:
            pos.offset = 0
            pos.index += 1
            if pos.index == len(self.paths):
                pos.index = 0
                pos.epoch += 1

    def _map(self, shard: int) -> np.ndarray:
        tokens = self._maps.get(shard)
        if tokens is None:
            tokens = load_shard(self.paths[shard], mmap=True)
            self._maps = {shard: tokens}  # keep one map open: old shards are never revisited soon
        return tokens

    def _advance(self, n: int, out: np.ndarray | None = None) -> None:
        """Consume `n` tokens of the stream, copying them into `out` when given."""
        done = 0
        while done < n:
            shard = self._current_shard()
            take = min(n - done, self.lengths[shard] - self._pos.offset)
            if out is not None:
                piece = self._map(shard)[self._pos.offset : self._pos.offset + take]
                if self.vocab_size is not None:
                    _check_vocab(piece, self.vocab_size, f"shard {self.paths[shard]}")
                out[done : done + take] = piece
            done += take
            self._pos.offset += take
            self._pos.tokens_seen += take
            self._normalize()

    # -- public API ------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """Number of completed passes over all shards."""
        return self._pos.epoch

    @property
    def tokens_seen(self) -> int:
        return self._pos.tokens_seen

    def next_batch(self, local_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return this rank's (x, y), int64 CPU tensors of shape (local_tokens // seq_len, seq_len)."""
        if local_tokens <= 0 or local_tokens % self.seq_len:
            raise ValueError(f"local_tokens={local_tokens} must be a positive multiple of seq_len={self.seq_len}")
        span = np.empty(local_tokens + 1, dtype=np.int64)
        self._advance(self.rank * local_tokens)
        start = replace(self._pos)
        self._advance(local_tokens + 1, out=span)  # one token of look-ahead for the last target,
        self._pos = start  # which the next span reads again as its first input
        self._advance((self.world_size - self.rank) * local_tokens)
        t = torch.from_numpy(span)
        return t[:-1].view(-1, self.seq_len), t[1:].view(-1, self.seq_len)

    def state_dict(self) -> dict:
        """Exact stream position; with the same shards and seed, a resumed run continues identically."""
        return {
            "epoch": self._pos.epoch,
            "shard_index": self._pos.index,
            "offset": self._pos.offset,
            "tokens_seen": self._pos.tokens_seen,
            "seed": self.seed,
            "shards": [p.name for p in self.paths],
            "lengths": list(self.lengths),
        }

    def load_state_dict(self, state: dict) -> None:
        # Names and lengths (not full paths) must match, so a run can resume on another machine.
        names = [p.name for p in self.paths]
        if state.get("shards") != names or state.get("lengths") != self.lengths:
            raise ValueError(
                "loader state was saved for different shards "
                f"({len(state.get('shards') or [])} saved vs {len(names)} now, or different "
                "names/lengths); resume with the same dataset"
            )
        if state.get("seed") != self.seed:
            raise ValueError(f"loader state was saved with seed={state.get('seed')}, this loader has seed={self.seed}")
        index, offset = int(state["shard_index"]), int(state["offset"])
        if not 0 <= index < len(self.paths):
            raise ValueError(f"loader state has shard_index {index} outside [0, {len(self.paths)})")
        self._pos = _Position(
            epoch=int(state["epoch"]),
            index=index,
            offset=offset,
            tokens_seen=int(state.get("tokens_seen", 0)),
        )
        if not 0 <= offset <= self.lengths[self._current_shard()]:
            raise ValueError(f"loader state has offset {offset} outside its shard")
        self._normalize()

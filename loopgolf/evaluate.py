"""val_bpb with the official formula.

val_loss is the token-weighted mean cross-entropy (nats) over every scored target, BOS targets
included; the byte count of each target follows the official rule (``loopgolf.data.tokenizer``);
``val_bpb = (val_loss / ln 2) * (num_targets / total_target_bytes)``.

Non-overlapping scoring (the official default) cuts the concatenated validation tokens to a
multiple of ``seq_len`` plus one and scores each window once. Sliding-window scoring
(``stride < seq_len``) gives every target except those in the first window ``seq_len - stride``
tokens of context or more; each target is still scored exactly once.

Validation data with a byte sidecar (a tokenizer that transforms the text first, see
``loopgolf.data.sidecar``) comes with :class:`~loopgolf.data.sidecar.SidecarTables` instead of
piece tables: a target's bytes are then the sidecar's count at its stream position.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loopgolf.data.sidecar import SidecarError, SidecarTables
from loopgolf.data.tokenizer import ByteTables, target_byte_counts


@dataclass
class EvalResult:
    val_loss: float
    val_bpb: float
    num_targets: int
    target_bytes: int
    seq_len: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_sums(cls, loss_sum: float, n_targets: int, n_bytes: int, seq_len: int, stride: int, **extra):
        """The result of summed nats over ``n_targets`` targets carrying ``n_bytes`` bytes."""
        if n_bytes == 0:
            raise ValueError("validation targets carry zero bytes (only control/unknown tokens?)")
        val_loss = loss_sum / n_targets
        return cls(
            val_loss=val_loss,
            val_bpb=(val_loss / math.log(2)) * (n_targets / n_bytes),
            num_targets=n_targets,
            target_bytes=n_bytes,
            seq_len=seq_len,
            stride=stride,
            **extra,
        )


def scoring_windows(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) for each window: inputs tokens[start:end], targets
    tokens[start+1:end+1], of which those at target positions >= first_scored are counted."""
    if stride >= seq_len:
        n_windows = (num_tokens - 1) // seq_len
        return [(i * seq_len, (i + 1) * seq_len, i * seq_len) for i in range(n_windows)]
    out, scored_to, start = [], 0, 0
    last = num_tokens - 1  # number of targets available
    while scored_to < last:
        end = min(start + seq_len, last)
        out.append((start, end, scored_to))
        scored_to = end
        start = max(0, end - seq_len + stride)
        if end == last:
            break
    return out


@dataclass
class WindowBatch:
    """Scoring windows run in one forward pass: inputs ``x`` (B, T), targets ``y`` and ``mask``
    (the targets scored here; the rest are context scored by an earlier window)."""

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    first_token: int  # where the batch's first window starts in the stream
    index: int  # the batch's place in the evaluation, from 0

    def target_positions(self, windows: list[tuple[int, int, int]]) -> np.ndarray:
        """Stream positions (index into the token stream) of the targets ``mask`` selects."""
        pos = np.zeros(self.mask.shape, dtype=np.int64)
        for i, (start, end, _) in enumerate(windows):
            pos[i, : end - start] = np.arange(start + 1, end + 1)
        return pos[self.mask]


def check_eval_args(tokens: np.ndarray, seq_len: int, stride: int | None, max_tokens: int | None) -> tuple[np.ndarray, int]:
    """The tokens scored (a prefix with ``max_tokens``) and the stride, checked."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    if len(tokens) < seq_len + 1 and stride == seq_len:
        raise ValueError(f"validation set has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    return tokens, stride


def window_batches(tokens: np.ndarray, windows: list[tuple[int, int, int]], batch_size: int, vocab: int) -> Iterator[tuple[WindowBatch, list]]:
    """The windows in batches of ``batch_size``, in order, with the windows of each."""
    for b in range(0, len(windows), batch_size):
        batch = windows[b : b + batch_size]
        # Windows in a batch share a length except possibly the last sliding one.
        length = max(end - start for start, end, _ in batch)
        x = np.zeros((len(batch), length), dtype=np.int64)
        y = np.zeros((len(batch), length), dtype=np.int64)
        mask = np.zeros((len(batch), length), dtype=bool)
        for i, (start, end, first) in enumerate(batch):
            n = end - start
            x[i, :n] = tokens[start:end]
            y[i, :n] = tokens[start + 1 : end + 1]
            mask[i, first - start : n] = True
        if int(y.max()) >= vocab:
            raise ValueError(f"token id {int(y.max())} is outside the tokenizer's {vocab}-entry byte table")
        yield WindowBatch(x, y, mask, batch[0][0], b // batch_size), batch


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; nothing on CPU (float32 there: bf16 is far slower on CPU)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def token_nll(model: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device) -> torch.Tensor:
    """Negative log-likelihood (nats, float32) of every target in ``y`` (B, T) given inputs
    ``x``: a full softmax over the vocabulary at every position."""
    with autocast_for(device):
        logits = model(torch.from_numpy(x).to(device))
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), torch.from_numpy(y).to(device).reshape(-1), reduction="none").view(y.shape)


def scored_bytes(tables: ByteTables | SidecarTables, prev: np.ndarray, targets: np.ndarray, positions: np.ndarray | None) -> int:
    """Summed bytes of ``targets`` (after ``prev``), at stream ``positions``: the sidecar's counts
    there when the data has one (positions are then required), else the official piece rule."""
    if isinstance(tables, SidecarTables):
        if positions is None:
            raise SidecarError(
                f"{tables.source} has a byte sidecar, so its targets' bytes depend on their stream positions, which this scoring path does not give"
            )
        if len(positions) != len(targets):
            raise ValueError(f"{len(positions)} target positions for {len(targets)} targets")
        return tables.bytes_at(positions)
    return int(target_byte_counts(prev, targets, tables).sum())


class Tally:
    """Sums of scored nats, targets and target bytes, added to batch by batch."""

    def __init__(self, tables: ByteTables | SidecarTables) -> None:
        self.tables = tables
        self.loss_sum, self.n_targets, self.n_bytes = 0.0, 0, 0

    def add(self, nll: torch.Tensor, x: np.ndarray, y: np.ndarray, mask: np.ndarray, where: str, positions: np.ndarray | None = None) -> float:
        """Add the masked targets' ``nll``; returns their summed loss. A non-finite sum stops the
        evaluation: a NaN score with exit 0 is worse than no score. ``positions`` (the stream
        positions of the masked targets, :meth:`WindowBatch.target_positions`) are needed when the
        tables are a byte sidecar's."""
        m = torch.from_numpy(mask).to(nll.device)
        batch_loss = float(nll[m].double().sum())
        if not math.isfinite(batch_loss):
            raise FloatingPointError(f"evaluation loss is {batch_loss} in {where}; the model gives non-finite logits there")
        self.loss_sum += batch_loss
        self.n_targets += int(mask.sum())
        self.n_bytes += scored_bytes(self.tables, x[mask], y[mask], positions)
        return batch_loss

    def result(self, seq_len: int, stride: int) -> EvalResult:
        return EvalResult.from_sums(self.loss_sum, self.n_targets, self.n_bytes, seq_len, stride)


def evaluate_bpb(
    model: nn.Module,
    tokens: np.ndarray,
    tables: ByteTables | SidecarTables,
    seq_len: int,
    *,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> EvalResult:
    """Score ``tokens`` (the concatenated validation shards) with ``model``.

    ``model(x)`` must return logits (B, T, V). ``max_tokens`` keeps only a prefix (for cheap
    periodic validation during training); the final score uses every token. With
    :class:`SidecarTables`, ``tokens`` must be the whole stream the sidecar was made for."""
    if isinstance(tables, SidecarTables):
        tables.check_stream(tokens)
    tokens, stride = check_eval_args(tokens, seq_len, stride, max_tokens)
    windows = scoring_windows(len(tokens), seq_len, stride)
    device = torch.device(device)
    tally = Tally(tables)
    was_training = model.training
    model.eval()
    batches = window_batches(tokens, windows, batch_size, int(tables.base_bytes.shape[0]))
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-len(windows) // batch_size), desc="eval", unit="batch", leave=False)
    try:
        with torch.inference_mode():
            for batch, wins in batches:
                nll = token_nll(model, batch.x, batch.y, device)
                where = f"the windows starting at token {batch.first_token:,} (batch {batch.index + 1})"
                positions = batch.target_positions(wins) if isinstance(tables, SidecarTables) else None
                tally.add(nll, batch.x, batch.y, batch.mask, where, positions)
    finally:
        model.train(was_training)
    return tally.result(seq_len, stride)

"""val_bpb with the official formula.

val_loss is the token-weighted mean cross-entropy (nats) over every scored target, BOS targets
included; the byte count of each target follows the official rule (``loopgolf.data.tokenizer``);
``val_bpb = (val_loss / ln 2) * (num_targets / total_target_bytes)``.

Non-overlapping scoring (the official default) cuts the concatenated validation tokens to a
multiple of ``seq_len`` plus one and scores each window once. Sliding-window scoring
(``stride < seq_len``) gives every target except those in the first window ``seq_len - stride``
tokens of context or more; each target is still scored exactly once.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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


def evaluate_bpb(
    model: nn.Module,
    tokens: np.ndarray,
    tables: ByteTables,
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
    periodic validation during training); the final score uses every token."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    if len(tokens) < seq_len + 1 and stride == seq_len:
        raise ValueError(f"validation set has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    windows = scoring_windows(len(tokens), seq_len, stride)
    device = torch.device(device)
    vocab = int(tables.base_bytes.shape[0])
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    loss_sum = 0.0
    n_targets = 0
    n_bytes = 0
    was_training = model.training
    model.eval()
    iterator = range(0, len(windows), batch_size)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="eval", unit="batch", leave=False)
    try:
        with torch.inference_mode():
            for b in iterator:
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
                xt = torch.from_numpy(x).to(device)
                with amp:
                    logits = model(xt)
                nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), torch.from_numpy(y).to(device).reshape(-1), reduction="none").view(
                    len(batch), length
                )
                m = torch.from_numpy(mask).to(device)
                batch_loss = float(nll[m].double().sum())
                if not math.isfinite(batch_loss):
                    # A NaN score with exit 0 is worse than no score: stop and say where.
                    raise FloatingPointError(
                        f"evaluation loss is {batch_loss} in the windows starting at token {batch[0][0]:,} "
                        f"(batch {b // batch_size + 1}); the model gives non-finite logits there"
                    )
                loss_sum += batch_loss
                n_targets += int(mask.sum())
                n_bytes += int(target_byte_counts(x[mask], y[mask], tables).sum())
    finally:
        model.train(was_training)
    return EvalResult.from_sums(loss_sum, n_targets, n_bytes, seq_len, stride)

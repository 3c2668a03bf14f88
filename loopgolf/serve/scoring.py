"""val_bpb under early exit: every validation window decoded token by token through the KV
cache, so each target is predicted where the exit criterion stops it, and every later token
attends to the keys and values that exits left (see :mod:`loopgolf.serve.runner`).

Non-overlapping windows only (the official scoring); windows run side by side, one cache slot
each, all at the same position. With the criterion ``never`` it scores the same targets as
:func:`loopgolf.evaluate.evaluate_bpb` and matches it to float rounding."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from loopgolf.data.tokenizer import ByteTables, target_byte_counts
from loopgolf.evaluate import EvalResult, scoring_windows
from loopgolf.model.gpt import GPT
from loopgolf.serve.exits import DEFAULT_EXIT_STATE, ExitCriterion
from loopgolf.serve.runner import LayerRunner, Token


@dataclass
class EarlyExitResult(EvalResult):
    criterion: str = "never"
    exit_state: str = DEFAULT_EXIT_STATE
    mean_loops: float = 0.0  # passes of the plan run per scored token
    full_loops: int = 0  # passes at full depth
    loop_histogram: list[int] | None = None  # scored tokens that stopped after pass 1, 2, ...

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_early_exit(
    model: GPT,
    tokens: np.ndarray,
    tables: ByteTables,
    seq_len: int,
    criterion: ExitCriterion,
    *,
    exit_state: str = DEFAULT_EXIT_STATE,
    batch_size: int = 32,
    max_tokens: int | None = None,
    progress: bool = False,
) -> EarlyExitResult:
    """Score ``tokens`` with early exit; ``max_tokens`` keeps a prefix (a cheaper estimate)."""
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    if len(tokens) < seq_len + 1:
        raise ValueError(f"validation set has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    windows = scoring_windows(len(tokens), seq_len, seq_len)
    vocab = int(tables.base_bytes.shape[0])
    if int(tokens.max()) >= vocab:
        raise ValueError(f"token id {int(tokens.max())} is outside the tokenizer's {vocab}-entry byte table")
    device = next(model.parameters()).device
    runner = LayerRunner(model, min(batch_size, len(windows)), seq_len, criterion, exit_state)
    loops_full = max(model.active_passes) + 1
    hist = [0] * loops_full
    loss_sum, n_targets, n_bytes = 0.0, 0, 0
    was_training = model.training
    model.eval()
    chunks = range(0, len(windows), batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(windows) * seq_len, desc="eval (early exit)", unit="tok", leave=False)
    try:
        with torch.inference_mode():
            for c in chunks:
                batch = windows[c : c + batch_size]
                x = np.stack([tokens[s:e] for s, e, _ in batch]).astype(np.int64)
                y = np.stack([tokens[s + 1 : e + 1] for s, e, _ in batch]).astype(np.int64)
                for p in range(seq_len):
                    row = [Token(i, p, int(x[i, p]), prev_id=int(x[i, p - 1]) if p else None) for i in range(len(batch))]
                    runner.run(row)
                    logits = torch.stack([t.logits for t in row])
                    target = torch.from_numpy(y[:, p]).to(device)
                    loss = float(F.cross_entropy(logits.float(), target, reduction="sum").double())
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"early-exit loss is {loss} at position {p} of the windows from token {batch[0][0]:,}")
                    loss_sum += loss
                    for t in row:
                        hist[t.loops - 1] += 1
                    if bar is not None:
                        bar.update(len(batch))
                n_targets += y.size
                n_bytes += int(target_byte_counts(x.reshape(-1), y.reshape(-1), tables).sum())
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return EarlyExitResult.from_sums(
        loss_sum,
        n_targets,
        n_bytes,
        seq_len,
        seq_len,
        criterion=str(criterion),
        exit_state=exit_state,
        mean_loops=sum((i + 1) * n for i, n in enumerate(hist)) / max(1, sum(hist)),
        full_loops=loops_full,
        loop_histogram=hist,
    )

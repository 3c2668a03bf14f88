"""GPTQ: round a matrix column by column, pushing each column's rounding error onto the columns
not yet rounded, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

For a linear layer ``y = x W^T`` the output error of a quantized ``W`` over calibration inputs is
``tr((W - Q) H (W - Q)^T)`` with ``H = E[x x^T]``; GPTQ minimises it greedily with the per-row
scales fixed beforehand (so the stored format is the plain ``intN_row`` one). In a looped model a
shared linear layer sees the inputs of every virtual layer that runs it: :func:`collect_hessians`
accumulates ``H`` over all those uses, so the codes serve every loop at once.

Calibration inputs come from training text or from text the model generates itself
(:func:`calibration_tokens`). Nothing here is needed to read or score an artifact.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from loopgolf.data.shards import load_shard
from loopgolf.export.artifact import qmax_for_bits
from loopgolf.model.roles import shared_matrices

BOS_ID = 1  # every document starts with BOS (id 1) in the official shard format (docs/background.md)


class CalibrationError(ValueError):
    """Calibration inputs, or a Hessian, that GPTQ cannot use."""


# ------------------------------------------------------------------------------- Hessians


@torch.no_grad()
def collect_hessians(model: nn.Module, tokens: Tensor, *, batch_size: int = 8, include_embedding: bool = False) -> dict[str, Tensor]:
    """``H = mean x x^T`` (float32, in x in) of every shared linear layer's inputs over ``tokens``
    (LongTensor (N, T)), gathered with forward hooks; a layer that several virtual layers run
    accumulates over all its uses. With ``include_embedding`` the output layer gets the Hessian
    of its inputs, the final hidden states: under ``tok_emb.weight`` when the embedding is tied
    (its use as the output layer), under ``lm_head.weight`` when the head is its own matrix."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
        raise CalibrationError("calibration tokens must be an integer tensor of shape (N, T)")
    if tokens.numel() == 0:
        raise CalibrationError("calibration tokens are empty")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise CalibrationError(f"calibration token ids must lie in [0, {vocab})")
    if include_embedding and not hasattr(model, "hidden"):
        raise CalibrationError("the output layer's Hessian needs the model's final hidden states (a loopgolf GPT's hidden())")
    targets = shared_matrices(model)
    if not targets:
        raise CalibrationError("the model has no shared attention/MLP linear layers to calibrate")
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(mod: nn.Module, inputs: tuple, output: Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            h = x.T @ x
            sums[name] = sums[name] + h if name in sums else h
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    handles = [mod.register_forward_hook(hook_for(name)) for name, mod in targets.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for chunk in tokens.split(batch_size):
            h = model.hidden(chunk.to(device)) if hasattr(model, "hidden") else model(chunk.to(device))
            if include_embedding:
                x = h.reshape(-1, h.shape[-1]).float()
                name = "tok_emb.weight" if getattr(model, "lm_head", None) is None else "lm_head.weight"
                sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
                counts[name] = counts.get(name, 0) + x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: (sums[name] / counts[name]).cpu() for name in sums}


# ----------------------------------------------------------------------------------- GPTQ


def _inverse_cholesky(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of H^-1 (after dampening), retrying with more damping if needed."""
    n = H.shape[0]
    mean_diag = float(torch.diag(H).mean()) if n else 1.0
    eye = torch.eye(n, dtype=H.dtype)
    for extra in (1.0, 10.0, 100.0):
        try:
            L = torch.linalg.cholesky(H + eye * (damp * extra * max(mean_diag, 1e-12)))
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise CalibrationError("GPTQ: the calibration Hessian is not positive definite even after dampening")


def gptq_quantize(
    w: Tensor,
    H: Tensor,
    bits: int,
    scale16: Tensor,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    keep: Tensor | None = None,
    code_range: tuple[int, int] | None = None,
) -> Tensor:
    """int8 codes of ``w`` (out, in) on the grid of the fp16 row scales ``scale16`` for inputs
    with Hessian ``H`` (in, in).

    ``keep`` is an optional boolean mask of entries stored elsewhere at their original value in
    fp16 (outliers): they get code 0, and the difference between that stored value and the entry
    as GPTQ has updated it is pushed onto the columns not yet rounded, like any rounding error. ``act_order`` processes columns by decreasing Hessian diagonal (the most sensitive
    first), which the output order undoes.

    ``scale16`` may also hold one scale per entry (out, in) (group scales, expanded: the
    quantized low-rank factors of LQER), and ``code_range`` (lowest, highest) replaces the
    symmetric [-qmax, qmax] of ``bits``."""
    if w.dim() != 2 or H.shape != (w.shape[1], w.shape[1]):
        raise CalibrationError(f"GPTQ needs W (out, in) and H (in, in); got {tuple(w.shape)} and {tuple(H.shape)}")
    if scale16.shape not in ((w.shape[0],), tuple(w.shape)):
        raise CalibrationError(f"GPTQ needs one scale per row of W ({w.shape[0]}) or per entry, got shape {tuple(scale16.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise CalibrationError("GPTQ: the Hessian has non-finite entries")
    qmax = qmax_for_bits(bits)
    lo, hi = (-qmax, qmax) if code_range is None else code_range
    W = w.detach().to(torch.float32).clone()
    # One scale per entry either way, so columns can be permuted with the weights.
    s = scale16.to(torch.float32)
    s = s[:, None].expand_as(W) if s.dim() == 1 else s
    H = H.detach().to(torch.float32).clone()
    keep_m = torch.zeros_like(W, dtype=torch.bool) if keep is None else keep.clone()
    # Inputs that never fire: their weights do not matter; zero them so they cost nothing.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(W.shape[1])
    W, H, keep_m, s = W[:, perm], H[perm][:, perm], keep_m[:, perm], s[:, perm]
    original = W.to(torch.float16).to(torch.float32)  # what a kept entry dequantizes to: stored in fp16
    U = _inverse_cholesky(H, damp)
    Q = torch.zeros_like(W)
    cols = W.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = W1[:, j]
            kept = keep_m[:, i1 + j]
            sj = s[:, i1 + j]
            q = torch.clamp(torch.round(col / sj), lo, hi)
            deq = torch.where(kept, original[:, i1 + j], q * sj)
            Q[:, i1 + j] = torch.where(kept, torch.zeros_like(q), q)
            err = (col - deq) / U1[j, j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            E1[:, j] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    return codes.to(torch.int8).contiguous()


# ---------------------------------------------------------------------------- calibration


@torch.no_grad()
def calibration_tokens(
    model: nn.Module,
    source: str = "train",
    *,
    tokens: np.ndarray | Tensor | None = None,
    shards: Sequence[str | os.PathLike] | None = None,
    num_seqs: int = 32,
    seq_len: int = 128,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 16,
) -> Tensor:
    """Calibration batch (LongTensor (num_seqs, seq_len)) for :func:`collect_hessians`.

    - ``source="train"``: random windows of the training stream, given as ``shards`` (shard
      files, memory-mapped and read as one concatenated stream) or as ``tokens`` (a 1-D array);
      only the chosen windows are read and converted, so a 1e8-token shard costs no memory;
    - ``source="self"``: text the model generates itself, sampled from BOS at ``temperature``;
      no data needed, and the inputs follow what the model actually computes on.

    The same seed picks the same windows from shard files as from their loaded concatenation.
    """
    if num_seqs < 1 or seq_len < 1:
        raise CalibrationError(f"num_seqs and seq_len must be positive, got {num_seqs} and {seq_len}")
    g = torch.Generator().manual_seed(seed)
    if source == "train":
        if (tokens is None) == (shards is None):
            raise CalibrationError("source='train' needs the training stream: pass shards (files) or tokens (an array), not both")
        parts = [load_shard(p) for p in shards] if shards is not None else [_as_stream(tokens)]
        total = sum(len(p) for p in parts)
        if total < seq_len:
            raise CalibrationError(f"the training stream has {total} tokens, fewer than seq_len={seq_len}")
        starts = torch.randint(0, total - seq_len + 1, (num_seqs,), generator=g)
        return _windows(parts, starts.tolist(), seq_len)
    if source == "self":
        if temperature <= 0:
            raise CalibrationError(f"temperature must be positive, got {temperature}")
        return _generate(model, num_seqs, seq_len, g, temperature, batch_size)
    raise CalibrationError(f"unknown calibration source {source!r}; valid: train, self")


def _as_stream(tokens: np.ndarray | Tensor | Sequence[int]) -> np.ndarray:
    # No dtype conversion here: a memory-mapped uint16 stream stays mapped, not copied.
    arr = tokens.detach().cpu().numpy() if isinstance(tokens, Tensor) else np.asarray(tokens)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise CalibrationError(f"training tokens must be a 1-D integer stream, got shape {arr.shape} of {arr.dtype}")
    return arr


def _windows(parts: list[np.ndarray], starts: list[int], seq_len: int) -> Tensor:
    """Rows ``stream[s : s + seq_len]`` of the concatenation of ``parts`` (int64), reading only
    those tokens; a window may run across the end of one part into the next."""
    ends = np.cumsum([len(p) for p in parts])
    out = np.empty((len(starts), seq_len), dtype=np.int64)
    for row, start in enumerate(starts):
        filled = 0
        while filled < seq_len:
            pos = start + filled
            i = int(np.searchsorted(ends, pos, side="right"))  # the part holding position pos
            offset = pos - (int(ends[i]) - len(parts[i]))
            take = min(seq_len - filled, len(parts[i]) - offset)
            out[row, filled : filled + take] = parts[i][offset : offset + take]
            filled += take
    return torch.from_numpy(out)


def _generate(model: nn.Module, n: int, seq_len: int, g: torch.Generator, temperature: float, batch_size: int) -> Tensor:
    # Each new token re-encodes its prefix: the model has no KV cache yet, and calibration
    # sequences are short, so this O(T^2) loop costs seconds at CPU scale.
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for b in range(math.ceil(n / batch_size)):
            rows = min(batch_size, n - b * batch_size)
            seq = torch.full((rows, 1), BOS_ID, dtype=torch.long, device=device)
            while seq.shape[1] < seq_len:
                logits = model(seq)[:, -1, :].float() / temperature
                probs = torch.softmax(logits, dim=-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=g).to(device)
                seq = torch.cat([seq, nxt], dim=1)
            out.append(seq.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)

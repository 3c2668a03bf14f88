"""Per-row clip search: the fp16 scale of each row of a matrix to be coded as symmetric intN.

- ``percentile``: clip at a percentile of the row's |w| (the baseline's 99.99984th, about the max);
- ``mse``: try clips from half the row max to the full max and keep, per row, the one whose
  reconstruction has the least squared error (clipping a few large values buys a finer grid for
  all the others).

Both return the scale exactly as stored (fp16, zero rows -> 1), so the codes computed from it are
the codes that get stored.
"""

from __future__ import annotations

import torch

from loopgolf.export.quant import FP16_MAX, QuantError, fp16_scale, qmax_for_bits, row_quantile

# Clip ratios (of the row's |w| max) tried by the MSE search, coarse to keep export fast.
MSE_RATIOS: tuple[float, ...] = tuple(round(0.5 + 0.02 * i, 2) for i in range(26))  # 0.50 .. 1.00


def _checked(scale32: torch.Tensor) -> torch.Tensor:
    if scale32.numel() and float(scale32.max()) > FP16_MAX:
        raise QuantError(f"a row clip of {float(scale32.max()):.4g} per step is beyond the fp16 range")
    return fp16_scale(scale32)


def percentile_scales(w: torch.Tensor, bits: int, percentile: float) -> torch.Tensor:
    """fp16 row scales clipping each row at the given percentile (0-100] of its |w|."""
    if not 0.0 < percentile <= 100.0:
        raise QuantError(f"clip percentile must be in (0, 100], got {percentile}")
    return _checked(row_quantile(w.abs(), percentile / 100.0) / qmax_for_bits(bits))


def row_sq_error(w: torch.Tensor, scale16: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-row squared error of the rounding of ``w`` on the grid of ``scale16``."""
    s = scale16.to(torch.float32)[:, None]
    deq = torch.clamp(torch.round(w / s), -qmax, qmax) * s
    return (deq - w).square().sum(dim=1)


def mse_scales(w: torch.Tensor, bits: int, ratios: tuple[float, ...] = MSE_RATIOS) -> torch.Tensor:
    """fp16 row scales minimising each row's squared rounding error over the clip ratios."""
    if not ratios or any(not 0.0 < r <= 1.0 for r in ratios):
        raise QuantError(f"MSE clip ratios must be in (0, 1], got {ratios}")
    qmax = qmax_for_bits(bits)
    row_max = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
    best_scale = best_err = None
    for r in ratios:
        scale = _checked(row_max * r / qmax)
        err = row_sq_error(w, scale, qmax)
        if best_scale is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale = torch.where(better, scale, best_scale)
            best_err = torch.where(better, err, best_err)
    return best_scale


def choose_scales(w: torch.Tensor, bits: int, method: str = "percentile", percentile: float = 99.99984) -> torch.Tensor:
    """fp16 per-row scales of a (rows, cols) float32 matrix by ``method`` (percentile | mse)."""
    if w.dim() != 2:
        raise QuantError(f"row scales need a 2-D matrix, got shape {tuple(w.shape)}")
    if method == "percentile":
        return percentile_scales(w, bits, percentile)
    if method == "mse":
        return mse_scales(w, bits)
    raise QuantError(f"unknown clip method {method!r}; valid: percentile, mse")

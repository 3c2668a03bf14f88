"""Baseline weight quantization for the artifact: float pass-through or per-row symmetric intN.

The scheme follows the Parameter Golf baseline export (REFERENCE.md, "Baseline export"), with the
bit width generalised: small tensors stay float (fp32 for control tensors, whose exact values steer
the residual stream, fp16 otherwise); larger 2-D tensors get one fp16 scale per row and integer
codes in [-(2**(bits-1)-1), 2**(bits-1)-1], stored one per int8. Bit-packing was measured on a
trained model and loses after brotli/lzma/zstd: one code per byte is 7-12% smaller at 5-7 bits
(the entropy coders model whole bytes); only at 4 bits would packing save 0.8% with brotli
(docs/LOG.md, 2026-11-23), not worth a second layout.

An intN tensor may carry two optional corrections, both applied at dequantization: a sparse set of
outliers kept exactly in fp16 (sorted flat int32 indices and their values, which replace the coded
entries) and a low-rank term ``u @ v`` (fp16 factors) added to ``codes * scale``. How they are chosen
lives outside the scoring path (``export.encode``); this module only defines and checks the format.
Works on plain `dict[str, torch.Tensor]` state dicts; knows nothing about models.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

# Substrings of parameter names whose tensors are "control" knobs (per-channel scales, residual
# mixes, query gains, skip weights). They are tiny, and rounding them to fp16 costs more quality
# than the handful of bytes it saves, so they stay fp32.
CONTROL_TENSOR_PATTERNS: tuple[str, ...] = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight")

FLOAT_SCHEMES: tuple[str, ...] = ("float32", "float16")
MIN_BITS = 2  # 1 bit would leave only the code 0 under a symmetric scheme
MAX_BITS = 8  # codes are stored in int8
DEFAULT_FLOAT_MAX_NUMEL = 65536
DEFAULT_CLIP_PERCENTILE = 99.99984
FP16_MAX = float(torch.finfo(torch.float16).max)

_INT_ROW_RE = re.compile(r"^int([0-9]+)_row$")
PART_NAMES: tuple[str, ...] = ("data", "scale", "outlier_idx", "outlier_val", "lowrank_u", "lowrank_v")


class QuantError(ValueError):
    """A tensor cannot be quantized, or a QuantizedTensor is inconsistent."""


@dataclass
class QuantizedTensor:
    scheme: str  # "float32" | "float16" | "intN_row" (e.g. "int8_row")
    shape: tuple[int, ...]
    data: torch.Tensor  # float32/float16 values, or int8 codes (rows, cols) for intN_row
    scale: torch.Tensor | None  # float16 per-row scale for intN_row, else None
    bits: int | None  # N for intN_row, else None
    outlier_idx: torch.Tensor | None = None  # int32 sorted flat indices kept exactly (intN_row only)
    outlier_val: torch.Tensor | None = None  # float16 values at outlier_idx
    lowrank_u: torch.Tensor | None = None  # float16 (rows, r): low-rank error correction u @ v
    lowrank_v: torch.Tensor | None = None  # float16 (r, cols)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def parts(self) -> dict[str, torch.Tensor]:
        """The stored arrays by part name, in storage order ("data" first)."""
        return {k: t for k, t in zip(PART_NAMES, (self.data, self.scale, *self.extras())) if t is not None}

    def extras(self) -> tuple[torch.Tensor | None, ...]:
        return (self.outlier_idx, self.outlier_val, self.lowrank_u, self.lowrank_v)

    @property
    def stored_bytes(self) -> int:
        """Uncompressed bytes this tensor occupies in an artifact (codes/values, scales, corrections)."""
        return sum(t.numel() * t.element_size() for t in self.parts().values())


def int_row_scheme(bits: int) -> str:
    return f"int{bits}_row"


def scheme_bits(scheme: str) -> int | None:
    """Bit width encoded in an `intN_row` scheme name, None for float schemes; QuantError otherwise."""
    if scheme in FLOAT_SCHEMES:
        return None
    m = _INT_ROW_RE.match(scheme)
    if m is None:
        raise QuantError(f"unknown quantization scheme {scheme!r}; expected one of {FLOAT_SCHEMES} or 'intN_row'")
    bits = int(m.group(1))
    _check_bits(bits)
    return bits


def is_control_tensor(name: str) -> bool:
    return any(p in name for p in CONTROL_TENSOR_PATTERNS)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise QuantError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")


def qmax_for_bits(bits: int) -> int:
    _check_bits(bits)
    return 2 ** (bits - 1) - 1


def row_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row q-quantile (0 <= q <= 1) of a 2-D tensor, linear interpolation like torch.quantile.

    torch.quantile refuses inputs above 2**24 elements (at least in some versions and call forms;
    an 8192 x 2048 embedding already hits that), so this selects the two neighbouring order
    statistics with kthvalue, which is linear time per row and has no size limit.
    """
    if x.dim() != 2:
        raise QuantError(f"row_quantile needs a 2-D tensor, got shape {tuple(x.shape)}")
    if not 0.0 <= q <= 1.0:
        raise QuantError(f"quantile must be in [0, 1], got {q}")
    cols = x.shape[1]
    if cols == 0:
        return x.new_zeros(x.shape[0])
    pos = q * (cols - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, cols - 1)
    frac = pos - lo
    v_lo = torch.kthvalue(x, lo + 1, dim=1).values  # kthvalue is 1-based
    if frac == 0.0 or hi == lo:
        return v_lo
    v_hi = torch.kthvalue(x, hi + 1, dim=1).values
    return v_lo + (v_hi - v_lo) * frac


def as_cpu_float32(name: str, t: torch.Tensor) -> torch.Tensor:
    """A detached CPU float32 copy of a float tensor; QuantError for non-float or non-finite input."""
    if not isinstance(t, torch.Tensor):
        raise QuantError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise QuantError(f"{name}: dtype {t.dtype} is not floating point; only float tensors can be exported")
    w = t.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise QuantError(f"{name}: contains NaN or inf; refusing to export a diverged tensor")
    return w


def to_fp16_checked(name: str, w: torch.Tensor) -> torch.Tensor:
    # A silent overflow to inf would only surface later as a NaN loss; fail here instead.
    if w.numel() and float(w.abs().max()) > FP16_MAX:
        raise QuantError(f"{name}: values up to {float(w.abs().max()):.4g} exceed the fp16 range ({FP16_MAX})")
    return w.to(torch.float16)


def quantize_tensor(
    name: str,
    t: torch.Tensor,
    *,
    bits: int = 8,
    float_max_numel: int = DEFAULT_FLOAT_MAX_NUMEL,
    clip_percentile: float = DEFAULT_CLIP_PERCENTILE,
) -> QuantizedTensor:
    """Quantize one tensor with the baseline scheme (see module docstring)."""
    _check_bits(bits)
    if not 0.0 < clip_percentile <= 100.0:
        raise QuantError(f"clip_percentile must be in (0, 100], got {clip_percentile}")
    if float_max_numel < 0:
        raise QuantError(f"float_max_numel must be >= 0, got {float_max_numel}")
    w = as_cpu_float32(name, t)
    shape = tuple(int(s) for s in w.shape)

    if w.numel() <= float_max_numel:
        if is_control_tensor(name):
            return QuantizedTensor("float32", shape, w.contiguous(), None, None)
        return QuantizedTensor("float16", shape, to_fp16_checked(name, w).contiguous(), None, None)
    if w.dim() != 2:
        return QuantizedTensor("float16", shape, to_fp16_checked(name, w).contiguous(), None, None)

    qmax = qmax_for_bits(bits)
    clip = row_quantile(w.abs(), clip_percentile / 100.0)
    scale32 = clip / qmax
    if float(scale32.max()) > FP16_MAX:
        raise QuantError(f"{name}: per-row clip {float(clip.max()):.4g} needs a scale beyond the fp16 range")
    # Round the scale to fp16 FIRST and derive codes from the rounded value, so that dequantization
    # with the stored scale reproduces exactly what was optimised for. A zero scale (all-zero row,
    # or one that underflows fp16) becomes 1: its codes are then 0 and dequantize back to 0.
    scale16 = fp16_scale(scale32)
    clipped = torch.maximum(torch.minimum(w, clip[:, None]), -clip[:, None])
    return QuantizedTensor(int_row_scheme(bits), shape, round_codes(clipped, scale16, qmax), scale16, bits)


def fp16_scale(scale32: torch.Tensor) -> torch.Tensor:
    """Per-row scales as stored: fp16, with 0 (all-zero row, or underflow) replaced by 1 so that
    such a row's codes are 0 and dequantize to 0."""
    scale16 = scale32.to(torch.float16)
    return torch.where(scale16 == 0, torch.ones_like(scale16), scale16).contiguous()


def round_codes(w: torch.Tensor, scale16: torch.Tensor, qmax: int) -> torch.Tensor:
    """int8 codes of a (rows, cols) float32 matrix on the grid of its stored fp16 row scales.

    Codes come from the ROUNDED scale so dequantization with the stored scale reproduces exactly
    what was optimised for."""
    s = scale16.to(torch.float32)[:, None]
    return torch.round(w / s).clamp_(-qmax, qmax).to(torch.int8).contiguous()


def validate_quantized(q: QuantizedTensor, name: str = "tensor") -> None:
    """Check that a QuantizedTensor is self-consistent (dtypes, shapes, code range)."""
    bits = scheme_bits(q.scheme)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in q.shape):
        raise QuantError(f"{name}: shape must be non-negative ints, got {q.shape!r}")
    if bits is None:
        want = torch.float32 if q.scheme == "float32" else torch.float16
        if q.data.dtype != want or tuple(q.data.shape) != tuple(q.shape):
            raise QuantError(
                f"{name}: scheme {q.scheme} needs {want} data of shape {q.shape}, "
                f"got {q.data.dtype} {tuple(q.data.shape)}"
            )
        if q.scale is not None or q.bits is not None or any(t is not None for t in q.extras()):
            raise QuantError(f"{name}: float scheme {q.scheme} must have no scale, bits, outliers or low-rank term")
        return
    if q.bits != bits:
        raise QuantError(f"{name}: scheme {q.scheme} disagrees with bits={q.bits}")
    if len(q.shape) != 2:
        raise QuantError(f"{name}: {q.scheme} needs a 2-D shape, got {q.shape}")
    if q.data.dtype != torch.int8 or tuple(q.data.shape) != tuple(q.shape):
        raise QuantError(f"{name}: {q.scheme} needs int8 codes of shape {q.shape}, got {q.data.dtype} {tuple(q.data.shape)}")
    if q.scale is None or q.scale.dtype != torch.float16 or tuple(q.scale.shape) != (q.shape[0],):
        got = None if q.scale is None else f"{q.scale.dtype} {tuple(q.scale.shape)}"
        raise QuantError(f"{name}: {q.scheme} needs a float16 scale of shape ({q.shape[0]},), got {got}")
    qmax = qmax_for_bits(bits)
    # min/max rather than abs().max(): abs(-128) wraps around in int8.
    if q.data.numel() and (int(q.data.min()) < -qmax or int(q.data.max()) > qmax):
        raise QuantError(f"{name}: codes outside [-{qmax}, {qmax}] for {bits} bits")
    if not bool(torch.isfinite(q.scale).all()):
        raise QuantError(f"{name}: non-finite scale")
    _validate_extras(q, name)


def _check_part(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise QuantError(f"{what} must be {dtype} of shape {shape}, got {t.dtype} {tuple(t.shape)}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise QuantError(f"{what} has non-finite values")


def _validate_extras(q: QuantizedTensor, name: str) -> None:
    idx, val, u, v = q.extras()
    if (idx is None) != (val is None) or (u is None) != (v is None):
        raise QuantError(f"{name}: outlier indices/values and low-rank u/v come in pairs")
    if idx is not None:
        k = int(idx.shape[0]) if idx.dim() == 1 else -1
        _check_part(idx, torch.int32, (k,), f"{name}: outlier_idx")
        _check_part(val, torch.float16, (k,), f"{name}: outlier_val")
        # Strictly increasing and in range: every outlier is a distinct entry of this tensor.
        if k and (int(idx[0]) < 0 or int(idx[-1]) >= q.numel or (k > 1 and not bool((idx[1:] > idx[:-1]).all()))):
            raise QuantError(f"{name}: outlier indices must be strictly increasing in [0, {q.numel})")
    if u is not None:
        r = int(u.shape[1]) if u.dim() == 2 else -1
        if r < 1:
            raise QuantError(f"{name}: lowrank_u must be 2-D with rank >= 1, got shape {tuple(u.shape)}")
        _check_part(u, torch.float16, (q.shape[0], r), f"{name}: lowrank_u")
        _check_part(v, torch.float16, (r, q.shape[1]), f"{name}: lowrank_v")


def dequantize_tensor(q: QuantizedTensor, name: str = "tensor") -> torch.Tensor:
    """float32 tensor of q.shape; for intN_row exactly codes * stored fp16 scale (in float32), plus
    the low-rank term, with outlier entries replaced by their stored values."""
    validate_quantized(q, name)
    if q.scale is None:
        return q.data.to(torch.float32).reshape(q.shape).clone()
    w = q.data.to(torch.float32) * q.scale.to(torch.float32)[:, None]
    if q.lowrank_u is not None:
        w += q.lowrank_u.to(torch.float32) @ q.lowrank_v.to(torch.float32)
    if q.outlier_idx is not None:
        w.view(-1)[q.outlier_idx.long()] = q.outlier_val.to(torch.float32)
    return w.reshape(q.shape)


def quantize_state_dict(state: dict[str, torch.Tensor], **kw) -> dict[str, QuantizedTensor]:
    """quantize_tensor over a state dict, keeping its order; kw as for quantize_tensor."""
    return {name: quantize_tensor(name, t, **kw) for name, t in state.items()}


def dequantize_state_dict(q: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    return {name: dequantize_tensor(qt, name) for name, qt in q.items()}

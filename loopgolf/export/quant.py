"""Baseline weight quantization for the artifact: float pass-through or per-row symmetric intN.

The scheme follows the Parameter Golf baseline export (REFERENCE.md, "Baseline export"), with the
bit width generalised: small tensors stay float (fp32 for control tensors, whose exact values steer
the residual stream, fp16 otherwise); larger 2-D tensors get one fp16 scale per row and integer
codes in [-(2**(bits-1)-1), 2**(bits-1)-1], stored one per int8 (packing below a byte is left to the
compressor). Works on plain `dict[str, torch.Tensor]` state dicts; knows nothing about models.
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


class QuantError(ValueError):
    """A tensor cannot be quantized, or a QuantizedTensor is inconsistent."""


@dataclass
class QuantizedTensor:
    scheme: str  # "float32" | "float16" | "intN_row" (e.g. "int8_row")
    shape: tuple[int, ...]
    data: torch.Tensor  # float32/float16 values, or int8 codes (rows, cols) for intN_row
    scale: torch.Tensor | None  # float16 per-row scale for intN_row, else None
    bits: int | None  # N for intN_row, else None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_bytes(self) -> int:
        """Uncompressed bytes this tensor occupies in an artifact (codes/values plus scales)."""
        n = self.data.numel() * self.data.element_size()
        if self.scale is not None:
            n += self.scale.numel() * self.scale.element_size()
        return n


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


def _as_cpu_float32(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise QuantError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise QuantError(f"{name}: dtype {t.dtype} is not floating point; only float tensors can be exported")
    w = t.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise QuantError(f"{name}: contains NaN or inf; refusing to export a diverged tensor")
    return w


def _to_fp16_checked(name: str, w: torch.Tensor) -> torch.Tensor:
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
    w = _as_cpu_float32(name, t)
    shape = tuple(int(s) for s in w.shape)

    if w.numel() <= float_max_numel:
        if is_control_tensor(name):
            return QuantizedTensor("float32", shape, w.contiguous(), None, None)
        return QuantizedTensor("float16", shape, _to_fp16_checked(name, w).contiguous(), None, None)
    if w.dim() != 2:
        return QuantizedTensor("float16", shape, _to_fp16_checked(name, w).contiguous(), None, None)

    qmax = qmax_for_bits(bits)
    clip = row_quantile(w.abs(), clip_percentile / 100.0)
    scale32 = clip / qmax
    if float(scale32.max()) > FP16_MAX:
        raise QuantError(f"{name}: per-row clip {float(clip.max()):.4g} needs a scale beyond the fp16 range")
    # Round the scale to fp16 FIRST and derive codes from the rounded value, so that dequantization
    # with the stored scale reproduces exactly what was optimised for. A zero scale (all-zero row,
    # or one that underflows fp16) becomes 1: its codes are then 0 and dequantize back to 0.
    scale16 = scale32.to(torch.float16)
    scale16 = torch.where(scale16 == 0, torch.ones_like(scale16), scale16)
    s = scale16.to(torch.float32)[:, None]
    clipped = torch.maximum(torch.minimum(w, clip[:, None]), -clip[:, None])
    codes = torch.round(clipped / s).clamp_(-qmax, qmax).to(torch.int8)
    return QuantizedTensor(int_row_scheme(bits), shape, codes.contiguous(), scale16.contiguous(), bits)


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
        if q.scale is not None or q.bits is not None:
            raise QuantError(f"{name}: float scheme {q.scheme} must have no scale and no bits")
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


def dequantize_tensor(q: QuantizedTensor, name: str = "tensor") -> torch.Tensor:
    """float32 tensor of q.shape; for intN_row exactly codes * stored fp16 scale (in float32)."""
    validate_quantized(q, name)
    if q.scale is None:
        return q.data.to(torch.float32).reshape(q.shape).clone()
    return (q.data.to(torch.float32) * q.scale.to(torch.float32)[:, None]).reshape(q.shape)


def quantize_state_dict(state: dict[str, torch.Tensor], **kw) -> dict[str, QuantizedTensor]:
    """quantize_tensor over a state dict, keeping its order; kw as for quantize_tensor."""
    return {name: quantize_tensor(name, t, **kw) for name, t in state.items()}


def dequantize_state_dict(q: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    return {name: dequantize_tensor(qt, name) for name, qt in q.items()}

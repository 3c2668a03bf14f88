"""How float tensors become stored tensors: the quantization policy and the encoder that applies it.

A tensor's *role* comes from :func:`loopgolf.model.roles.parameter_role`, grouped for export
(:func:`tensor_role`): the embedding (and an untied output layer), the shared attention and MLP
matrices, the per-virtual-layer LoRA factors, and the control tensors (scales, residual mixes, q
gains, skip weights, depth embeddings). A :class:`QuantPolicy` gives each role its bits and says
how codes are chosen. The default policy is the Parameter Golf baseline export (the official
``train_gpt.py`` of openai/parameter-golf; docs/background.md): tensors of at most 65,536 elements
stay float (fp32 for control tensors, fp16 otherwise), larger matrices are per-row int8 clipped at
the 99.99984th percentile of |w|.

Per tensor (:func:`encode_tensor`): control tensors stay float32 (or float16); small, non-2-D or
``fp16``-role tensors stay float16; every other matrix becomes per-row symmetric intN:

1. optional outliers: the ``outlier_topk`` largest |w| are kept exactly in fp16 and left out of
   the row scales (so one huge weight no longer coarsens its whole row's grid);
2. row scales by the policy's clip search (percentile or MSE);
3. codes by round-to-nearest, or by GPTQ with the layer's calibration Hessian;
4. optional low-rank correction: the top singular directions of the remaining error (weighted by
   the Hessian when there is one), stored as two fp16 factors.

A tensor that appears under two names (tied embeddings) is encoded once. Shared blocks are one
tensor by construction, and LoRA factors are separate tensors that are never merged into them.
Nothing here is needed to read or score an artifact.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace

import torch

from loopgolf.export.artifact import (
    MAX_BITS,
    MIN_BITS,
    ArtifactError,
    QuantizedTensor,
    dequantize_tensor,
    find_aliases,
    int_row_scheme,
    qmax_for_bits,
)
from loopgolf.export.gptq import CalibrationError, gptq_quantize
from loopgolf.model.roles import parameter_role


class QuantError(ValueError):
    """A tensor that cannot be stored under the policy (not float, NaN/inf, beyond fp16, GPTQ
    without a Hessian, ...)."""


class PolicyError(QuantError):
    """An invalid quantization policy or policy string."""


# ------------------------------------------------------------------------------------ roles

ROLES: tuple[str, ...] = ("embed", "attn", "mlp", "lora", "control")
# parameter_role -> export role: the output layer is coded like the embedding (tied, it is the
# embedding), and depth embeddings are small per-layer vectors like the other control tensors.
_EXPORT_ROLE = {"embed": "embed", "head": "embed", "pos": "embed", "attn": "attn", "mlp": "mlp", "lora": "lora", "control": "control", "depth": "control"}


def tensor_role(name: str) -> str:
    """The export role of a model tensor: embed | attn | mlp | lora | control."""
    return _EXPORT_ROLE[parameter_role(name)]


# ----------------------------------------------------------------------------------- policy

CLIP_METHODS: tuple[str, ...] = ("percentile", "mse")
FLOAT16_BITS = 16  # a role's bits set to 16 means: keep it as float16
DEFAULT_FLOAT_MAX_NUMEL = 65536
DEFAULT_CLIP_PERCENTILE = 99.99984


@dataclass(frozen=True)
class QuantPolicy:
    embed_bits: int = 8
    attn_bits: int = 8
    mlp_bits: int = 8
    lora_bits: int = 8
    float_max_numel: int = DEFAULT_FLOAT_MAX_NUMEL  # tensors this small (or not 2-D) stay float16
    control_fp32: bool = True  # control tensors as float32 (else float16); they are never coded
    clip: str = "percentile"  # percentile | mse: how each row's clip (and so its scale) is chosen
    clip_percentile: float = DEFAULT_CLIP_PERCENTILE
    gptq: bool = False  # GPTQ on attn/mlp matrices (needs calibration Hessians)
    gptq_damp: float = 0.01  # GPTQ dampening, a fraction of the Hessian's mean diagonal
    gptq_block: int = 128  # GPTQ lazy-update block size (columns)
    outlier_topk: int = 0  # per coded tensor, the k largest |w| kept exactly in float16
    lowrank_rank: int = 0  # rank of the quantization-error correction on attn/mlp matrices (0 = off)

    def __post_init__(self) -> None:
        for role in ROLES:
            if role == "control":
                continue
            b = getattr(self, f"{role}_bits")
            if isinstance(b, bool) or not isinstance(b, int) or not (MIN_BITS <= b <= MAX_BITS or b == FLOAT16_BITS):
                raise PolicyError(f"{role}_bits must be an integer in [{MIN_BITS}, {MAX_BITS}] or {FLOAT16_BITS} (float16), got {b!r}")
        if self.clip not in CLIP_METHODS:
            raise PolicyError(f"clip must be one of {', '.join(CLIP_METHODS)}, got {self.clip!r}")
        if not 0.0 < self.clip_percentile <= 100.0:
            raise PolicyError(f"clip_percentile must be in (0, 100], got {self.clip_percentile}")
        for name in ("float_max_numel", "outlier_topk", "lowrank_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise PolicyError(f"{name} must be a non-negative integer, got {v!r}")
        if not 0.0 <= self.gptq_damp < 1.0:
            raise PolicyError(f"gptq_damp must be in [0, 1), got {self.gptq_damp}")
        if isinstance(self.gptq_block, bool) or not isinstance(self.gptq_block, int) or self.gptq_block < 1:
            raise PolicyError(f"gptq_block must be a positive integer, got {self.gptq_block!r}")

    @classmethod
    def uniform(cls, bits: int, **kw) -> QuantPolicy:
        """Every coded role at ``bits`` (what ``export_model(bits=N)`` means)."""
        return cls(**{f"{r}_bits": bits for r in ROLES if r != "control"}, **kw)

    def bits_for(self, role: str) -> int | None:
        """Bits of a role's coded matrices; None for control tensors (always float)."""
        if role not in ROLES:
            raise PolicyError(f"unknown role {role!r}; valid: {', '.join(ROLES)}")
        return None if role == "control" else getattr(self, f"{role}_bits")

    def uses_gptq(self, role: str) -> bool:
        return self.gptq and role in ("attn", "mlp")

    def uses_lowrank(self, role: str) -> bool:
        return self.lowrank_rank > 0 and role in ("attn", "mlp")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantPolicy:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise PolicyError(f"unknown policy field(s) {sorted(unknown)}; valid: {[f.name for f in fields(cls)]}")
        return cls(**d)

    def describe(self) -> str:
        """The policy as a string :func:`parse_policy` reads back to an equal policy."""
        default = QuantPolicy()
        items = [f"{r}={self.bits_for(r)}" for r in ROLES if r != "control"]
        for key, name in _SCALAR_KEYS.items():
            value = getattr(self, name)
            if value != getattr(default, name):
                items.append(f"{key}={_format_value(value)}")
        return ",".join(items)


_SCALAR_KEYS = {  # policy-string key -> field (bit widths are handled separately)
    "fp16max": "float_max_numel",
    "control": "control_fp32",
    "clip": "clip",
    "percentile": "clip_percentile",
    "gptq": "gptq",
    "damp": "gptq_damp",
    "block": "gptq_block",
    "outliers": "outlier_topk",
    "lowrank": "lowrank_rank",
}


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _parse_bits(key: str, text: str) -> int:
    t = text.strip().lower()
    if t in ("fp16", "float16", "16"):
        return FLOAT16_BITS
    m = re.fullmatch(r"(?:int)?(\d+)", t)
    if not m:
        raise PolicyError(f"policy item {key}={text!r}: expected a bit width {MIN_BITS}-{MAX_BITS} or fp16")
    return int(m.group(1))


def _parse_scalar(key: str, name: str, text: str) -> object:
    t = text.strip().lower()
    try:
        if name == "control_fp32":
            if t not in ("fp32", "fp16", "1", "0"):
                raise ValueError
            return t in ("fp32", "1")
        if name == "gptq":
            if t not in ("1", "0", "on", "off", "true", "false"):
                raise ValueError
            return t in ("1", "on", "true")
        if name == "clip":
            return t
        if name in ("clip_percentile", "gptq_damp"):
            return float(t)
        return int(t)
    except ValueError:
        raise PolicyError(f"policy item {key}={text!r}: bad value") from None


def parse_policy(text: str | None) -> QuantPolicy:
    """Parse a policy string (for ``--quant``) into a :class:`QuantPolicy`.

    Comma-separated items, applied left to right on top of the default (int8 everywhere):

    - ``intN``: attention, MLP and LoRA matrices at N bits (N in 2..8); the embedding keeps its
      own width (default 8: the tied embedding is also the output layer and suffers most);
    - ``all=N``: every coded role, the embedding included;
    - ``embed=N``, ``attn=N``, ``mlp=N``, ``lora=N``: one role; N may be ``fp16`` to store that
      role as float16;
    - ``gptq`` (or ``gptq=0|1``): GPTQ for attention and MLP matrices (needs calibration tokens);
    - ``clip=percentile|mse`` and ``percentile=P``: how each row's clip is chosen;
    - ``outliers=K``: keep the K largest |w| of each coded tensor exactly, in float16;
    - ``lowrank=R``: rank-R correction of the quantization error on attention and MLP matrices;
    - ``fp16max=N``: tensors of at most N elements stay float (default 65536);
    - ``control=fp32|fp16``: storage of the control tensors (default fp32);
    - ``damp=F``, ``block=N``: GPTQ dampening and block size.

    Examples: ``int6``; ``attn=6,mlp=5,embed=8,gptq``; ``int5,embed=7,clip=mse,outliers=64``.
    An empty string (or None) is the default policy.
    """
    policy = QuantPolicy()
    if text is None or not text.strip():
        return policy
    coded = [r for r in ROLES if r != "control"]
    changes: dict[str, object] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise PolicyError(f"empty item in policy {text!r}")
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        m = re.fullmatch(r"int(\d+)", key)
        if m and not sep:
            bits = int(m.group(1))
            changes.update({f"{r}_bits": bits for r in coded if r != "embed"})
        elif key == "gptq" and not sep:
            changes["gptq"] = True
        elif key == "all" and sep:
            bits = _parse_bits(key, value)
            changes.update({f"{r}_bits": bits for r in coded})
        elif key in coded and sep:
            changes[f"{key}_bits"] = _parse_bits(key, value)
        elif key in _SCALAR_KEYS and sep:
            changes[_SCALAR_KEYS[key]] = _parse_scalar(key, _SCALAR_KEYS[key], value)
        else:
            valid = "intN, all=N, " + ", ".join(f"{r}=N" for r in coded) + ", gptq, " + ", ".join(f"{k}=..." for k in _SCALAR_KEYS)
            raise PolicyError(f"unknown policy item {item!r} in {text!r}; valid items: {valid}")
    try:
        return replace(policy, **changes)
    except PolicyError as e:
        raise PolicyError(f"policy {text!r}: {e}") from None


# --------------------------------------------------------------------------- float helpers

FP16_MAX = float(torch.finfo(torch.float16).max)


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


# ------------------------------------------------------------------------ row scales (clip)

# Clip ratios (of the row's |w| max) tried by the MSE search, coarse to keep export fast.
MSE_RATIOS: tuple[float, ...] = tuple(round(0.5 + 0.02 * i, 2) for i in range(26))  # 0.50 .. 1.00


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


def fp16_scale(scale32: torch.Tensor) -> torch.Tensor:
    """Per-row scales as stored: fp16, with 0 (all-zero row, or underflow) replaced by 1 so that
    such a row's codes are 0 and dequantize to 0. Codes are derived from this ROUNDED scale, so
    dequantization with the stored scale reproduces exactly what was optimised for."""
    if scale32.numel() and float(scale32.max()) > FP16_MAX:
        raise QuantError(f"a row clip of {float(scale32.max()):.4g} per step is beyond the fp16 range")
    scale16 = scale32.to(torch.float16)
    return torch.where(scale16 == 0, torch.ones_like(scale16), scale16).contiguous()


def round_codes(w: torch.Tensor, scale16: torch.Tensor, qmax: int) -> torch.Tensor:
    """int8 codes of a (rows, cols) float32 matrix, rounded to nearest on the grid of its stored
    fp16 row scales; values beyond the clip saturate at +-qmax."""
    s = scale16.to(torch.float32)[:, None]
    return torch.round(w / s).clamp_(-qmax, qmax).to(torch.int8).contiguous()


def row_sq_error(w: torch.Tensor, scale16: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-row squared error of the rounding of ``w`` on the grid of ``scale16``."""
    s = scale16.to(torch.float32)[:, None]
    deq = torch.clamp(torch.round(w / s), -qmax, qmax) * s
    return (deq - w).square().sum(dim=1)


def choose_scales(w: torch.Tensor, bits: int, method: str = "percentile", percentile: float = DEFAULT_CLIP_PERCENTILE) -> torch.Tensor:
    """fp16 per-row scales of a (rows, cols) float32 matrix, exactly as stored:

    - ``percentile``: clip each row at a percentile (0-100] of its |w| (the baseline's 99.99984th,
      about the max);
    - ``mse``: try clips from half the row max to the full max and keep, per row, the one whose
      reconstruction has the least squared error (clipping a few large values buys a finer grid
      for all the others)."""
    if w.dim() != 2:
        raise QuantError(f"row scales need a 2-D matrix, got shape {tuple(w.shape)}")
    qmax = qmax_for_bits(bits)
    if method == "percentile":
        if not 0.0 < percentile <= 100.0:
            raise QuantError(f"clip percentile must be in (0, 100], got {percentile}")
        return fp16_scale(row_quantile(w.abs(), percentile / 100.0) / qmax)
    if method != "mse":
        raise QuantError(f"unknown clip method {method!r}; valid: {', '.join(CLIP_METHODS)}")
    row_max = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
    best_scale = best_err = None
    for r in MSE_RATIOS:
        scale = fp16_scale(row_max * r / qmax)
        err = row_sq_error(w, scale, qmax)
        if best_scale is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale = torch.where(better, scale, best_scale)
            best_err = torch.where(better, err, best_err)
    return best_scale


# --------------------------------------------------------------- outliers and low rank


def outlier_mask(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(sorted flat int64 indices, bool mask) of the k largest |w|, or None for k = 0."""
    k = min(k, w.numel())
    if k == 0:
        return None
    idx = torch.topk(w.abs().reshape(-1), k).indices.sort().values
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[idx] = True
    return idx, mask.reshape(w.shape)


def lowrank_correction(residual: torch.Tensor, rank: int, hessian: torch.Tensor | None = None, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (u, v) with ``u @ v`` the best rank-``rank`` approximation of ``residual``: in the
    Frobenius norm, or, given the inputs' Hessian H, in the output error ``||(R - uv) H^1/2||``."""
    r = min(rank, *residual.shape)
    if hessian is None:
        U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
        u, v = U[:, :r] * S[:r], Vh[:r]
    else:
        n = hessian.shape[0]
        H = hessian.to(torch.float32) + torch.eye(n) * damp * max(float(torch.diag(hessian).mean()), 1e-12)
        L = torch.linalg.cholesky(H)  # H = L L^T, so ||M H^1/2|| = ||M L||
        U, S, Vh = torch.linalg.svd(residual @ L, full_matrices=False)
        u = U[:, :r] * S[:r]
        v = torch.linalg.solve_triangular(L.T, Vh[:r].T, upper=True).T  # v L = Vh_r
    # Split the singular values evenly so both fp16 factors have moderate magnitudes.
    g = (u.norm(dim=0) / v.norm(dim=1).clamp_min(1e-30)).clamp_min(1e-30).sqrt()
    return to_fp16_checked("lowrank_u", u / g), to_fp16_checked("lowrank_v", v * g[:, None])


# ---------------------------------------------------------------------------------- encoder


def stored_scheme(name: str, shape: tuple[int, ...], policy: QuantPolicy) -> str:
    """The scheme a tensor of this name and shape gets under ``policy`` ("float32", "float16" or
    "intN_row"); the byte planner asks this without having the tensor."""
    role = tensor_role(name)
    if role == "control":
        return "float32" if policy.control_fp32 else "float16"
    bits = policy.bits_for(role)
    if bits == FLOAT16_BITS or math.prod(shape) <= policy.float_max_numel or len(shape) != 2:
        return "float16"
    return int_row_scheme(bits)


def encode_tensor(name: str, t: torch.Tensor, policy: QuantPolicy, *, hessian: torch.Tensor | None = None) -> QuantizedTensor:
    """One state-dict tensor as stored under ``policy`` (see the module docstring)."""
    w = as_cpu_float32(name, t)
    shape = tuple(int(s) for s in w.shape)
    role = tensor_role(name)
    scheme = stored_scheme(name, shape, policy)
    if scheme == "float32":
        return QuantizedTensor("float32", shape, w.contiguous(), None, None)
    if scheme == "float16":
        return QuantizedTensor("float16", shape, to_fp16_checked(name, w).contiguous(), None, None)
    bits = policy.bits_for(role)
    picked = outlier_mask(w, policy.outlier_topk)
    keep = None if picked is None else picked[1]
    w_coded = w if keep is None else w.masked_fill(keep, 0.0)
    try:
        scale = choose_scales(w_coded, bits, policy.clip, policy.clip_percentile)
        if policy.uses_gptq(role):
            if hessian is None:
                raise QuantError("the policy asks for GPTQ but there is no calibration Hessian for it (pass calibration tokens to export_model)")
            codes = gptq_quantize(w, hessian, bits, scale, block_size=policy.gptq_block, damp=policy.gptq_damp, keep=keep)
        else:
            codes = round_codes(w_coded, scale, qmax_for_bits(bits))
    except (QuantError, CalibrationError, ArtifactError) as e:
        raise QuantError(f"{name}: {e}") from None
    q = QuantizedTensor(int_row_scheme(bits), shape, codes, scale, bits)
    if picked is not None:
        q.outlier_idx = picked[0].to(torch.int32).contiguous()
        q.outlier_val = to_fp16_checked(name, w.reshape(-1)[picked[0]]).contiguous()
    if policy.uses_lowrank(role):
        residual = w - dequantize_tensor(q, name)  # zero at outliers: they are exact already
        q.lowrank_u, q.lowrank_v = lowrank_correction(residual, policy.lowrank_rank, hessian, policy.gptq_damp)
    return q


def encode_state(
    state: dict[str, torch.Tensor], policy: QuantPolicy, *, hessians: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, QuantizedTensor], dict[str, str]]:
    """(stored tensors by name, aliases {name: the earlier name it repeats}) for a state dict."""
    aliases = find_aliases(state)
    hessians = hessians or {}
    qstate = {name: encode_tensor(name, t, policy, hessian=hessians.get(name)) for name, t in state.items() if name not in aliases}
    return qstate, aliases

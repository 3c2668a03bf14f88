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
   the Hessian when there is one), stored as two fp16 factors, or (LQER) as quantized factors
   with group scales, and optionally only on the few tensors where it removes the most error.

Row clips (step 2) come from a percentile of |w|, an MSE search, or (``clip=sigma``, the
Parameter Golf record's rule) K standard deviations of the row, with K per role.

A tensor that appears under two names (tied embeddings) is encoded once. Shared blocks are one
tensor by construction, and LoRA factors are separate tensors that are never merged into them.
Nothing here is needed to read or score an artifact.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace

import torch

from loopgolf.export import policies
from loopgolf.export.artifact import (
    FLOAT_SCHEMES,
    LAYOUTS,
    MAX_BITS,
    MIN_BITS,
    ArtifactError,
    QuantizedTensor,
    dequantize_factor,
    dequantize_tensor,
    factor_code_range,
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

CLIP_METHODS: tuple[str, ...] = ("percentile", "mse", "sigma")
FLOAT16_BITS = 16  # a role's bits set to 16 means: keep it as float16
DEFAULT_FLOAT_MAX_NUMEL = 65536
DEFAULT_CLIP_PERCENTILE = 99.99984
CODED_ROLES: tuple[str, ...] = ("embed", "attn", "mlp", "lora")
MAX_CLIP_SIGMAS = 1000.0  # a row of n values has max|w| <= sqrt(n) std, so K beyond this clips nothing
MAX_LOWRANK_RANK = 1 << 16
MAX_LQER_GROUP = 1 << 20
MAX_LQER_TOP = 1 << 20
LQER_SELECT: tuple[str, ...] = ("gain", "norm")
# Fields added after artifacts already recorded policies: to_dict leaves them out at their
# defaults, so the meta (and so the bytes) of an artifact under any older policy is unchanged.
_LATER_FIELDS: tuple[str, ...] = (
    "embed_sigmas",
    "attn_sigmas",
    "mlp_sigmas",
    "lora_sigmas",
    "lowrank_roles",
    "lqer_ubits",
    "lqer_vbits",
    "lqer_group",
    "lqer_top",
    "lqer_select",
    "layout",
    "gptq_roles",
)
GPTQ_ROLES: tuple[str, ...] = ("embed", "attn", "mlp")  # roles with a Hessian (the embedding: its use as the output layer)


@dataclass(frozen=True)
class QuantPolicy:
    embed_bits: int = 8
    attn_bits: int = 8
    mlp_bits: int = 8
    lora_bits: int = 8
    float_max_numel: int = DEFAULT_FLOAT_MAX_NUMEL  # tensors this small (or not 2-D) stay float16
    control_fp32: bool = True  # control tensors as float32 (else float16); they are never coded
    clip: str = "percentile"  # percentile | mse | sigma: how each row's clip (and so its scale) is chosen
    clip_percentile: float = DEFAULT_CLIP_PERCENTILE
    gptq: bool = False  # GPTQ on attn/mlp matrices (needs calibration Hessians)
    gptq_damp: float = 0.01  # GPTQ dampening, a fraction of the Hessian's mean diagonal
    gptq_block: int = 128  # GPTQ lazy-update block size (columns)
    outlier_topk: int = 0  # per coded tensor, the k largest |w| kept exactly in float16
    lowrank_rank: int = 0  # rank of the quantization-error correction (0 = off)
    # clip="sigma": a row's clip is K x the row's standard deviation, with K per role. The defaults
    # are the Parameter Golf record's (PR #1855: MLP 11.5, attention 13, embedding 14; 12.85, its
    # value for any other matrix, for LoRA factors).
    embed_sigmas: float = 14.0
    attn_sigmas: float = 13.0
    mlp_sigmas: float = 11.5
    lora_sigmas: float = 12.85
    lowrank_roles: str = "attn+mlp"  # roles whose matrices get the low-rank correction, "+"-joined
    # LQER (quantized low-rank factors, format version 3): bits of u and of v (16 = float16, the
    # plain low-rank correction when both are 16), the group size of their scales, how many
    # tensors get a correction (0 = every one where it helps) and how they are ranked.
    lqer_ubits: int = FLOAT16_BITS
    lqer_vbits: int = FLOAT16_BITS
    lqer_group: int = 64
    lqer_top: int = 0
    lqer_select: str = "gain"  # gain: error removed per stored byte | norm: largest error (the record's rule)
    # How the artifact orders the stored tensors for the entropy coder (not how they are coded):
    # plain (table order) | grouped (codes of like matrices together, column by column; format 3).
    layout: str = "plain"
    # Roles GPTQ codes ("+"-joined, from GPTQ_ROLES). "embed" codes the output layer (the tied
    # embedding, or an untied head) against the Hessian of the final hidden states, as the
    # Parameter Golf record does; an untied input embedding and a position table have no such
    # Hessian and stay rounded to nearest.
    gptq_roles: str = "attn+mlp"

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
        for name in ("float_max_numel", "outlier_topk", "lowrank_rank", "lqer_top"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise PolicyError(f"{name} must be a non-negative integer, got {v!r}")
        if not 0.0 <= self.gptq_damp < 1.0:
            raise PolicyError(f"gptq_damp must be in [0, 1), got {self.gptq_damp}")
        if isinstance(self.gptq_block, bool) or not isinstance(self.gptq_block, int) or self.gptq_block < 1:
            raise PolicyError(f"gptq_block must be a positive integer, got {self.gptq_block!r}")
        if self.layout not in LAYOUTS:
            raise PolicyError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        self._check_sigma_clip()
        self._check_lowrank()
        self._canonical_roles("gptq_roles", GPTQ_ROLES)
        if self.gptq_roles != QuantPolicy.__dataclass_fields__["gptq_roles"].default and not self.gptq:
            raise PolicyError("gptq_roles only applies with GPTQ on: add the item gptq")

    def _canonical_roles(self, name: str, valid: tuple[str, ...]) -> None:
        """Check the "+"-joined role set in field ``name`` and rewrite it in ``valid``'s order: one
        spelling per set of roles, so equal policies compare (and describe) equal."""
        value = getattr(self, name)
        roles = value.split("+") if isinstance(value, str) else None
        if not roles or any(r not in valid for r in roles) or len(set(roles)) != len(roles):
            raise PolicyError(f"{name} must be distinct roles from {', '.join(valid)} joined by '+', got {value!r}")
        object.__setattr__(self, name, "+".join(r for r in valid if r in roles))

    def _check_sigma_clip(self) -> None:
        default = QuantPolicy.__dataclass_fields__
        for role in CODED_ROLES:
            k = getattr(self, f"{role}_sigmas")
            if isinstance(k, bool) or not isinstance(k, (int, float)) or not (math.isfinite(k) and 0.0 < k <= MAX_CLIP_SIGMAS):
                raise PolicyError(f"{role}_sigmas must be a finite number in (0, {MAX_CLIP_SIGMAS:g}], got {k!r}")
            if self.clip != "sigma" and k != default[f"{role}_sigmas"].default:
                raise PolicyError(f"{role}_sigmas={k:g} only applies with clip=sigma (the clip is {self.clip!r})")

    def _check_lowrank(self) -> None:
        if self.lowrank_rank > MAX_LOWRANK_RANK:
            raise PolicyError(f"lowrank_rank must be at most {MAX_LOWRANK_RANK}, got {self.lowrank_rank}")
        self._canonical_roles("lowrank_roles", CODED_ROLES)
        for name in ("lqer_ubits", "lqer_vbits"):
            b = getattr(self, name)
            if isinstance(b, bool) or not isinstance(b, int) or not (MIN_BITS <= b <= MAX_BITS or b == FLOAT16_BITS):
                raise PolicyError(f"{name} must be an integer in [{MIN_BITS}, {MAX_BITS}] or {FLOAT16_BITS} (float16), got {b!r}")
        g = self.lqer_group
        if isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= MAX_LQER_GROUP:
            raise PolicyError(f"lqer_group must be an integer in [1, {MAX_LQER_GROUP}], got {g!r}")
        if self.lqer_top > MAX_LQER_TOP:
            raise PolicyError(f"lqer_top must be at most {MAX_LQER_TOP}, got {self.lqer_top}")
        if self.lqer_select not in LQER_SELECT:
            raise PolicyError(f"lqer_select must be one of {', '.join(LQER_SELECT)}, got {self.lqer_select!r}")
        # Settings that would silently do nothing are refused, so a typo'd policy cannot pass for another.
        default = QuantPolicy.__dataclass_fields__
        changed = [n for n in ("lowrank_roles", "lqer_ubits", "lqer_vbits", "lqer_group", "lqer_top", "lqer_select") if getattr(self, n) != default[n].default]
        if changed and self.lowrank_rank == 0:
            raise PolicyError(f"{', '.join(changed)} need a low-rank correction: set lowrank=R (R >= 1)")
        if self.lqer_group != default["lqer_group"].default and not self.quantized_lowrank:
            raise PolicyError("lqer_group only applies to quantized factors: set lqer_bits=N (or lqer_ubits/lqer_vbits)")

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
        return self.gptq and role in self.gptq_roles.split("+")

    def uses_lowrank(self, role: str) -> bool:
        return self.lowrank_rank > 0 and role in self.lowrank_roles.split("+")

    @property
    def quantized_lowrank(self) -> bool:
        """Whether the low-rank factors are stored quantized (LQER) rather than as float16."""
        return self.lqer_ubits != FLOAT16_BITS or self.lqer_vbits != FLOAT16_BITS

    def sigmas_for(self, role: str) -> float:
        """K of the sigma clip of a coded role (clip = K x the row's standard deviation)."""
        if role not in CODED_ROLES:
            raise PolicyError(f"no clip sigmas for role {role!r}; coded roles: {', '.join(CODED_ROLES)}")
        return getattr(self, f"{role}_sigmas")

    def to_dict(self) -> dict:
        d = asdict(self)
        default = QuantPolicy.__dataclass_fields__
        for name in _LATER_FIELDS:
            if d[name] == default[name].default:
                del d[name]
        return d

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
    "embed_sigmas": "embed_sigmas",
    "attn_sigmas": "attn_sigmas",
    "mlp_sigmas": "mlp_sigmas",
    "lora_sigmas": "lora_sigmas",
    "lowrank_roles": "lowrank_roles",
    "lqer_ubits": "lqer_ubits",
    "lqer_vbits": "lqer_vbits",
    "lqer_group": "lqer_group",
    "lqer_top": "lqer_top",
    "lqer_select": "lqer_select",
    "layout": "layout",
    "gptq_roles": "gptq_roles",
}
# Keys that set several fields at once (like all=N for the bit widths).
_MULTI_KEYS = {
    "sigmas": tuple(f"{r}_sigmas" for r in CODED_ROLES),
    "lqer_bits": ("lqer_ubits", "lqer_vbits"),
}


# The export of the Parameter Golf record, as a policy string (kept where a preset can name it
# without loading this module).
RECORD_POLICY = policies.RECORD_POLICY


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
    if name in ("lqer_ubits", "lqer_vbits"):
        return _parse_bits(key, text)
    try:
        if name == "control_fp32":
            if t not in ("fp32", "fp16", "1", "0"):
                raise ValueError
            return t in ("fp32", "1")
        if name == "gptq":
            if t not in ("1", "0", "on", "off", "true", "false"):
                raise ValueError
            return t in ("1", "on", "true")
        if name in ("clip", "lowrank_roles", "lqer_select", "layout", "gptq_roles"):
            return t
        if name in ("clip_percentile", "gptq_damp") or name.endswith("_sigmas"):
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
      ``gptq_roles=embed+attn+mlp`` (any of them joined by ``+``): which roles, ``embed`` being the
      output layer (the tied embedding) coded against the final hidden states' Hessian;
    - ``clip=percentile|mse|sigma`` and ``percentile=P``: how each row's clip is chosen;
    - ``sigmas=K`` (every role) or ``embed_sigmas=K``, ``attn_sigmas=K``, ``mlp_sigmas=K``,
      ``lora_sigmas=K``: with ``clip=sigma``, each row is clipped at K standard deviations
      (defaults: the record's 14, 13, 11.5, 12.85);
    - ``outliers=K``: keep the K largest |w| of each coded tensor exactly, in float16;
    - ``lowrank=R``: rank-R correction of the quantization error on attention and MLP matrices;
      ``lowrank_roles=attn+mlp+embed`` (any of embed, attn, mlp, lora joined by ``+``): which roles;
    - LQER, quantized low-rank factors (needs ``lowrank=R``): ``lqer_bits=N`` (both factors, N in
      2..8, or fp16), ``lqer_ubits=N``, ``lqer_vbits=N`` (one factor), ``lqer_group=G`` (entries
      per fp16 scale, along each rank component; default 64), ``lqer_top=K`` (only the K tensors
      ranked first; 0 = every one where it helps), ``lqer_select=gain|norm`` (ranked by error
      removed per stored byte, or by error size as the record does);
    - ``layout=plain|grouped``: how the artifact orders the stored tensors for the entropy coder
      (grouped: codes of like matrices together, column by column; artifact format version 3);
    - ``fp16max=N``: tensors of at most N elements stay float (default 65536);
    - ``control=fp32|fp16``: storage of the control tensors (default fp32);
    - ``damp=F``, ``block=N``: GPTQ dampening and block size.

    Examples: ``int6``; ``attn=6,mlp=5,embed=8,gptq``; ``int5,embed=7,clip=mse,outliers=64``;
    the Parameter Golf record's export: :data:`RECORD_POLICY`.
    An empty string (or None) is the default policy. Items that would do nothing (sigmas without
    ``clip=sigma``, LQER items without ``lowrank``) are errors.
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
        elif key in _MULTI_KEYS and sep:
            names = _MULTI_KEYS[key]
            changes.update(dict.fromkeys(names, _parse_scalar(key, names[0], value)))
        else:
            valid = "intN, all=N, " + ", ".join(f"{r}=N" for r in coded) + ", gptq, " + ", ".join(f"{k}=..." for k in (*_SCALAR_KEYS, *_MULTI_KEYS))
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


def sigma_clip(w: torch.Tensor, sigmas: float) -> torch.Tensor:
    """Per-row clip ``sigmas`` x the row's standard deviation (unbiased, as torch.std), the
    Parameter Golf record's rule (PR #1855, ``gptq_quantize_weight``: scale = K std / qmax).

    It is not capped at the row's max |w|: at the record's K (11.5-14) the clip is usually
    above the max, so codes never reach +-qmax and the step is a fixed fraction of the row's
    spread (K / qmax std; 0.37 std for int6 at 11.5) -- fewer distinct codes, which is what the
    entropy coder then pays for. A constant row (std 0) falls back to its max |w|, so its value
    is still representable (the record would divide by a zero scale there)."""
    if w.shape[1] < 2:  # no spread to measure: the max is the only sensible clip
        return w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
    clip = sigmas * w.std(dim=1)
    return torch.where(clip > 0, clip, w.abs().amax(dim=1))


def choose_scales(
    w: torch.Tensor, bits: int, method: str = "percentile", percentile: float = DEFAULT_CLIP_PERCENTILE, sigmas: float | None = None
) -> torch.Tensor:
    """fp16 per-row scales of a (rows, cols) float32 matrix, exactly as stored:

    - ``percentile``: clip each row at a percentile (0-100] of its |w| (the baseline's 99.99984th,
      about the max);
    - ``mse``: try clips from half the row max to the full max and keep, per row, the one whose
      reconstruction has the least squared error (clipping a few large values buys a finer grid
      for all the others);
    - ``sigma``: clip each row at ``sigmas`` x its standard deviation (:func:`sigma_clip`)."""
    if w.dim() != 2:
        raise QuantError(f"row scales need a 2-D matrix, got shape {tuple(w.shape)}")
    qmax = qmax_for_bits(bits)
    if method == "percentile":
        if not 0.0 < percentile <= 100.0:
            raise QuantError(f"clip percentile must be in (0, 100], got {percentile}")
        return fp16_scale(row_quantile(w.abs(), percentile / 100.0) / qmax)
    if method == "sigma":
        if sigmas is None or not (math.isfinite(sigmas) and sigmas > 0):
            raise QuantError(f"the sigma clip needs a finite positive number of standard deviations, got {sigmas!r}")
        return fp16_scale(sigma_clip(w, sigmas) / qmax)
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


# ------------------------------------------------------- LQER: quantized low-rank factors


def quantize_factor(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, fp16 scales (r, ceil(n / group))) of an (r, n) float32 factor, groups of
    ``group`` consecutive entries along each row (the last one possibly shorter).

    Codes use the full two's-complement range [-2^(b-1), 2^(b-1) - 1] and a group's largest |x|
    sits at 2^(b-1) - 0.5 steps (the record's max/7.5 at 4 bits, max/1.5 at 2 bits): the
    positive extreme rounds to 2^(b-1) and is clamped back by one step, the negative one lands on
    -2^(b-1) exactly. Every entry is therefore within half a step of its code: the scale is
    rounded UP to fp16 where rounding to nearest would make the step too small for that."""
    lo, hi = factor_code_range(bits)
    r, n = x.shape
    ngroups = -(-n // group)
    padded = torch.nn.functional.pad(x.abs(), (0, ngroups * group - n)).reshape(r, ngroups, group)
    amax = padded.amax(dim=2)
    steps = hi + 0.5
    if amax.numel() and float(amax.max()) / steps > FP16_MAX:
        raise QuantError(f"a low-rank factor value of {float(amax.max()):.4g} is beyond the fp16 range of its scale")
    s16 = (amax / steps).to(torch.float16)
    short = s16.to(torch.float32) * steps < amax  # exact in float32: an fp16 times a half-integer
    s16 = torch.where(short, torch.nextafter(s16, torch.full_like(s16, math.inf)), s16)
    s16 = torch.where(s16 == 0, torch.ones_like(s16), s16).contiguous()  # an all-zero group: codes 0
    which = torch.div(torch.arange(n), group, rounding_mode="floor")
    codes = torch.round(x / s16.to(torch.float32)[:, which]).clamp_(lo, hi).to(torch.int8).contiguous()
    return codes, s16


@dataclass
class LowRank:
    """A low-rank correction ``u @ v`` as stored: u (rows, r) and v (r, cols), float16 values, or
    int8 codes with fp16 group scales (``bits`` = (u bits, v bits), 16 = float16 factor). With
    ``bits`` None both are float16 (the plain correction, format version 2)."""

    u: torch.Tensor
    v: torch.Tensor
    us: torch.Tensor | None = None
    vs: torch.Tensor | None = None
    bits: tuple[int, int] | None = None
    group: int | None = None

    def attach(self, q: QuantizedTensor) -> None:
        q.lowrank_u, q.lowrank_v, q.lowrank_us, q.lowrank_vs = self.u, self.v, self.us, self.vs
        q.lowrank_bits, q.lowrank_group = self.bits, self.group

    @property
    def nbytes(self) -> int:
        """Uncompressed bytes the correction adds to the artifact."""
        return sum(t.numel() * t.element_size() for t in (self.u, self.v, self.us, self.vs) if t is not None)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (u, v) exactly as the reader dequantizes them."""
        if self.bits is None:
            return self.u.to(torch.float32), self.v.to(torch.float32)
        u = self.u.to(torch.float32) if self.bits[0] == FLOAT16_BITS else dequantize_factor(self.u.T, self.us, self.group).T
        v = self.v.to(torch.float32) if self.bits[1] == FLOAT16_BITS else dequantize_factor(self.v, self.vs, self.group)
        return u, v

    def product(self) -> torch.Tensor:
        u, v = self.factors()
        return u @ v


def _store_factor(
    name: str, x: torch.Tensor, bits: int, group: int, hessian: torch.Tensor | None = None, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(stored values or codes, scales or None, float32 dequantized) of an (r, n) factor; with
    the inputs' Hessian (n, n) its codes are chosen by GPTQ on the group scales, not rounded."""
    if bits == FLOAT16_BITS:
        stored = to_fp16_checked(name, x)
        return stored, None, stored.to(torch.float32)
    codes, scales = quantize_factor(x, bits, group)
    if hessian is not None:
        which = torch.div(torch.arange(x.shape[1]), group, rounding_mode="floor")
        try:
            codes = gptq_quantize(x, hessian, bits, scales[:, which], damp=damp, code_range=factor_code_range(bits))
        except CalibrationError as e:
            raise QuantError(f"{name}: {e}") from None
    return codes, scales, dequantize_factor(codes, scales, group)


def squared_error(m: torch.Tensor, hessian: torch.Tensor | None = None) -> float:
    """``||M||_F^2``, or with the inputs' Hessian H the summed squared output error
    ``tr(M H M^T)`` of a linear layer whose weight is off by M (float64: gains are differences
    of nearly equal numbers)."""
    m = m.to(torch.float64)
    if hessian is None:
        return float(m.square().sum())
    return float(((m @ hessian.to(torch.float64)) * m).sum())


def lqer_correction(
    residual: torch.Tensor,
    rank: int,
    hessian: torch.Tensor | None = None,
    damp: float = 0.01,
    *,
    bits: tuple[int, int] = (4, 4),
    group: int = 64,
    refit: bool = True,
    placements: tuple[str, ...] = ("u", "v"),
    hessian_rounding: bool = True,
) -> LowRank:
    """LQER (Zhang et al. 2024, arXiv 2402.02446; the Parameter Golf record's PR #1797 form): a
    rank-``rank`` approximation of the quantization error ``residual`` (Hessian-weighted when H
    is given, like :func:`lowrank_correction`) stored with quantized factors (``bits`` of u and
    v, 16 = float16; groups of ``group`` along each rank component, see :func:`quantize_factor`).

    With ``E ~ U S V`` (truncated SVD), the record stores u = U S and v = V. Two choices here
    improve on that at no byte cost: the singular values go to u or to v, whichever
    reconstructs better after quantization (``placements``; a per-group scale on a factor that
    holds S must cover columns of very different sizes, so S usually fares better in v), and
    after u is quantized, v is refitted to it by least squares (``refit``): ``v = pinv(u_q) E``,
    which is the best v for that u_q in the plain AND the Hessian-weighted error (``(E - u_q v) L``
    is minimised by ``v L = pinv(u_q) E L``), so the correction before v's own rounding never
    adds error. With a Hessian, v's codes are chosen by GPTQ (``hessian_rounding``): v multiplies
    the layer's inputs just as W does, and rounding it to nearest in plain terms was measured to
    undo the whole weighted gain on layers with a few dominant input directions."""
    if bits == (FLOAT16_BITS, FLOAT16_BITS):
        raise QuantError("lqer_correction quantizes at least one factor; use lowrank_correction for float16 factors")
    r = min(rank, *residual.shape)
    if hessian is None:
        U, S, V = torch.linalg.svd(residual, full_matrices=False)
        V = V[:r]
    else:
        n = hessian.shape[0]
        H = hessian.to(torch.float32) + torch.eye(n) * damp * max(float(torch.diag(hessian).mean()), 1e-12)
        L = torch.linalg.cholesky(H)
        U, S, Vh = torch.linalg.svd(residual @ L, full_matrices=False)
        V = torch.linalg.solve_triangular(L.T, Vh[:r].T, upper=True).T  # V L = Vh_r
    best: tuple[float, LowRank] | None = None
    for place in placements:
        if place not in ("u", "v"):
            raise QuantError(f"unknown singular-value placement {place!r}; valid: u, v")
        u0 = U[:, :r] * S[:r] if place == "u" else U[:, :r]
        u_st, us, u_q = _store_factor("lowrank_u", u0.T.contiguous(), bits[0], group)
        if refit:
            v0 = torch.linalg.lstsq(u_q.T.to(torch.float64), residual.to(torch.float64), driver="gelsd").solution.to(torch.float32)
        else:
            v0 = V if place == "u" else S[:r, None] * V
        v_st, vs, _ = _store_factor("lowrank_v", v0.contiguous(), bits[1], group, hessian if hessian_rounding else None, damp)
        cand = LowRank(u_st.T.contiguous(), v_st, us, vs, bits, group)
        err = squared_error(residual - cand.product(), hessian)
        if best is None or err < best[0]:
            best = (err, cand)
    assert best is not None, "placements must not be empty"
    return best[1]


@dataclass
class LowRankCandidate:
    """A tensor's low-rank correction and what it does: squared reconstruction error before and
    after it, plain and (with a Hessian) weighted by the layer's inputs."""

    name: str
    correction: LowRank
    plain: tuple[float, float]
    weighted: tuple[float, float] | None

    def gain(self, weighted: bool) -> float:
        before, after = self.weighted if weighted and self.weighted is not None else self.plain
        return before - after

    @property
    def own_gain(self) -> float:
        """Error removed in the tensor's own best measure (weighted when it has a Hessian)."""
        return self.gain(self.weighted is not None)


def lowrank_candidate(name: str, w: torch.Tensor, q: QuantizedTensor, policy: QuantPolicy, hessian: torch.Tensor | None = None) -> LowRankCandidate:
    """The correction ``policy`` would give the coded tensor ``q`` of the float32 weight ``w``."""
    residual = w - dequantize_tensor(q, name)  # zero at outliers: they are exact already
    rank = policy.lowrank_rank
    try:
        if policy.quantized_lowrank:
            bits = (policy.lqer_ubits, policy.lqer_vbits)
            corr = lqer_correction(residual, rank, hessian, policy.gptq_damp, bits=bits, group=policy.lqer_group)
        else:
            corr = LowRank(*lowrank_correction(residual, rank, hessian, policy.gptq_damp))
    except (QuantError, ArtifactError) as e:
        raise QuantError(f"{name}: {e}") from None
    product = corr.product()
    if q.outlier_idx is not None:  # the reader puts the exact outliers back over the correction
        product.view(-1)[q.outlier_idx.long()] = 0.0
    after = residual - product
    weighted = None if hessian is None else (squared_error(residual, hessian), squared_error(after, hessian))
    return LowRankCandidate(name, corr, (squared_error(residual), squared_error(after)), weighted)


def select_lowrank(candidates: list[LowRankCandidate], top: int, how: str = "gain") -> list[LowRankCandidate]:
    """The ``top`` candidates (0 = all) that get their correction, among those it helps.

    ``gain`` ranks by error removed per stored byte; ``norm`` by the size of the error before
    correction, the Parameter Golf record's rule (PR #1797: the top-k tensors by ||W - Q||_F,
    plain). Gains are Hessian-weighted only when every candidate has a Hessian: weighted and
    plain errors are in different units and cannot be ranked together."""
    if how not in LQER_SELECT:
        raise PolicyError(f"lqer_select must be one of {', '.join(LQER_SELECT)}, got {how!r}")
    weighted = bool(candidates) and all(c.weighted is not None for c in candidates)
    # Useful in the tensor's own best measure: a correction that lowers the plain error but
    # raises the output error of a layer with a Hessian is not stored, whatever the ranking.
    useful = [c for c in candidates if c.own_gain > 0 and c.gain(weighted) > 0]
    if how == "gain":
        key = lambda c: c.gain(weighted) / max(1, c.correction.nbytes)
    else:
        key = lambda c: c.plain[0]
    ranked = sorted(useful, key=lambda c: (-key(c), c.name))
    return ranked if top == 0 else ranked[:top]


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


def encode_tensor(name: str, t: torch.Tensor, policy: QuantPolicy, *, hessian: torch.Tensor | None = None, lowrank: bool = True) -> QuantizedTensor:
    """One state-dict tensor as stored under ``policy`` (see the module docstring).

    With ``lowrank=False`` no low-rank correction is added (:func:`encode_state` adds them itself
    when ``policy.lqer_top`` picks which tensors get one). A quantized (LQER) correction is kept
    only where it reduces the error; a float16 one always (as before LQER existed)."""
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
        scale = choose_scales(w_coded, bits, policy.clip, policy.clip_percentile, policy.sigmas_for(role))
        if policy.uses_gptq(role) and not (role == "embed" and hessian is None):  # an embedding never used as the output layer has no Hessian
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
    if lowrank and policy.uses_lowrank(role):
        if policy.quantized_lowrank:
            cand = lowrank_candidate(name, w, q, policy, hessian)
            if cand.own_gain > 0:
                cand.correction.attach(q)
        else:
            residual = w - dequantize_tensor(q, name)  # zero at outliers: they are exact already
            q.lowrank_u, q.lowrank_v = lowrank_correction(residual, policy.lowrank_rank, hessian, policy.gptq_damp)
    return q


def encode_state(
    state: dict[str, torch.Tensor], policy: QuantPolicy, *, hessians: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, QuantizedTensor], dict[str, str]]:
    """(stored tensors by name, aliases {name: the earlier name it repeats}) for a state dict.

    With ``policy.lqer_top`` = K > 0, the low-rank correction goes to the K tensors that
    :func:`select_lowrank` ranks first (by ``policy.lqer_select``) rather than to every one."""
    aliases = find_aliases(state)
    hessians = hessians or {}
    if policy.uses_gptq("embed") and not any(tensor_role(name) == "embed" and name in hessians for name in state):
        raise QuantError("gptq_roles includes embed, but no output layer has a Hessian (collect_hessians(..., include_embedding=True) gathers it)")
    pick = policy.lqer_top > 0
    qstate = {name: encode_tensor(name, t, policy, hessian=hessians.get(name), lowrank=not pick) for name, t in state.items() if name not in aliases}
    if pick:
        candidates = [
            lowrank_candidate(name, as_cpu_float32(name, state[name]), q, policy, hessians.get(name))
            for name, q in qstate.items()
            if q.scheme not in FLOAT_SCHEMES and policy.uses_lowrank(tensor_role(name))
        ]
        for cand in select_lowrank(candidates, policy.lqer_top, policy.lqer_select):
            cand.correction.attach(qstate[cand.name])
    return qstate, aliases

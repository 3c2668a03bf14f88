"""Quantization policy: how each kind of tensor is stored in an artifact.

A tensor's *role* comes from its state-dict name (:func:`tensor_role`): the tied embedding, the
shared attention and MLP sublayers, the per-virtual-layer LoRA factors, the control tensors
(scales, residual mixes, q gains, skip weights, depth embeddings), or anything else. The policy
gives each role its bits and says how codes are chosen (clip search, GPTQ, outliers, low-rank
correction). The default policy is the Parameter Golf baseline: int8 everywhere, percentile clip,
floats at or below 65,536 elements.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace

from loopgolf.export.quant import DEFAULT_CLIP_PERCENTILE, DEFAULT_FLOAT_MAX_NUMEL, MAX_BITS, MIN_BITS

ROLES: tuple[str, ...] = ("embed", "attn", "mlp", "lora", "control", "other")
CLIP_METHODS: tuple[str, ...] = ("percentile", "mse")
FLOAT16_BITS = 16  # a role's bits set to 16 means: keep it as float16

_CONTROL_NAMES = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight", "depth_emb")
_ROLE_RES = (
    ("embed", re.compile(r"^(tok_emb|lm_head)\.weight$")),
    ("attn", re.compile(r"^attn\.\d+\.")),
    ("mlp", re.compile(r"^mlps\.\d+\.")),
    ("lora", re.compile(r"^lora\.")),
)


class PolicyError(ValueError):
    """An invalid quantization policy or policy string."""


def tensor_role(name: str) -> str:
    """The role of a state-dict tensor: embed | attn | mlp | lora | control | other."""
    if name.split(".")[-1] in _CONTROL_NAMES or name in _CONTROL_NAMES:
        return "control"
    for role, pattern in _ROLE_RES:
        if pattern.match(name):
            return role
    return "other"


@dataclass(frozen=True)
class QuantPolicy:
    embed_bits: int = 8
    attn_bits: int = 8
    mlp_bits: int = 8
    lora_bits: int = 8
    other_bits: int = 8
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
    def uniform(cls, bits: int, **kw) -> "QuantPolicy":
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
    def from_dict(cls, d: dict) -> "QuantPolicy":
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

    - ``intN``: attention, MLP, LoRA and other matrices at N bits (N in 2..8); the embedding keeps
      its own width (default 8: the tied embedding is also the output layer and suffers most);
    - ``all=N``: every coded role, the embedding included;
    - ``embed=N``, ``attn=N``, ``mlp=N``, ``lora=N``, ``other=N``: one role; N may be ``fp16``
      to store that role as float16;
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
            changes.update({f"{r}_bits": bits for r in ("attn", "mlp", "lora", "other")})
        elif key == "gptq" and not sep:
            changes["gptq"] = True
        elif key == "all" and sep:
            bits = _parse_bits(key, value)
            changes.update({f"{r}_bits": bits for r in ROLES if r != "control"})
        elif key in ROLES and key != "control" and sep:
            changes[f"{key}_bits"] = _parse_bits(key, value)
        elif key in _SCALAR_KEYS and sep:
            changes[_SCALAR_KEYS[key]] = _parse_scalar(key, _SCALAR_KEYS[key], value)
        else:
            valid = "intN, all=N, " + ", ".join(f"{r}=N" for r in ROLES if r != "control") + ", gptq, " + ", ".join(f"{k}=..." for k in _SCALAR_KEYS)
            raise PolicyError(f"unknown policy item {item!r} in {text!r}; valid items: {valid}")
    try:
        return replace(policy, **changes)
    except PolicyError as e:
        raise PolicyError(f"policy {text!r}: {e}") from None

"""Depth plans: which stored attention and MLP sublayer each virtual layer runs.

A model stores U unique attention sublayers and M unique MLP sublayers and executes V virtual
layers; virtual layer v runs attention ``attn_of[v]`` and MLP ``mlp_of[v]``. Every sharing scheme
is a plan, so parameter counts, byte budgets and the forward pass read the plan and nothing else
needs to know about sharing.

A :class:`PlanSpec` is the plain-data description that lives in the model config (and therefore in
every ``config.json`` and artifact); :func:`build_plan` turns it into the explicit
:class:`DepthPlan` map.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PLAN_KINDS = ("vanilla", "cycle", "explicit")


@dataclass(frozen=True)
class PlanSpec:
    """How virtual layers map onto stored blocks.

    kind:
      - ``vanilla``: ``layers`` unique blocks, each run once (the identity plan).
      - ``cycle``: ``layers`` (K) unique blocks run ``loops`` (B) times as 0..K-1, 0..K-1, ...
      - ``explicit``: the lists ``attn_of`` and ``mlp_of`` (one entry per virtual layer).
    """

    kind: str = "vanilla"
    layers: int = 9
    loops: int = 1
    attn_of: tuple[int, ...] | None = None
    mlp_of: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("attn_of", "mlp_of"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PlanSpec":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown plan field(s) {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        d = dict(d)
        for key in ("attn_of", "mlp_of"):
            if d.get(key) is not None:
                d[key] = tuple(int(i) for i in d[key])
        return cls(**d)


@dataclass(frozen=True)
class DepthPlan:
    """The explicit virtual-layer map built from a :class:`PlanSpec`."""

    attn_of: tuple[int, ...]
    mlp_of: tuple[int, ...]
    spec: PlanSpec = field(default_factory=PlanSpec)

    @property
    def num_virtual(self) -> int:
        return len(self.attn_of)

    @property
    def num_attn(self) -> int:
        return max(self.attn_of) + 1

    @property
    def num_mlp(self) -> int:
        return max(self.mlp_of) + 1

    def attn_uses(self, i: int) -> int:
        """How many virtual layers run stored attention sublayer ``i``."""
        return self.attn_of.count(i)

    def mlp_uses(self, i: int) -> int:
        return self.mlp_of.count(i)

    def describe(self) -> str:
        s = self.spec
        if s.kind == "vanilla":
            head = f"vanilla L={s.layers}"
        elif s.kind == "cycle":
            head = f"cycle K={s.layers} B={s.loops}"
        else:
            head = "explicit"
        return f"{head}: V={self.num_virtual} virtual layers over {self.num_attn} attn / {self.num_mlp} mlp stored"

    def to_dict(self) -> dict[str, Any]:
        """The virtual-layer map as printed in every summary."""
        return {
            "spec": self.spec.to_dict(),
            "virtual_layers": self.num_virtual,
            "unique_attn": self.num_attn,
            "unique_mlp": self.num_mlp,
            "attn_of": list(self.attn_of),
            "mlp_of": list(self.mlp_of),
        }


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"plan {name} must be a positive integer, got {value!r}")


def _check_map(name: str, ids: tuple[int, ...]) -> None:
    if not ids:
        raise ValueError(f"plan {name} is empty: a model needs at least one virtual layer")
    if min(ids) < 0:
        raise ValueError(f"plan {name} has a negative sublayer index: {list(ids)}")
    missing = sorted(set(range(max(ids) + 1)) - set(ids))
    if missing:
        # A stored sublayer that no virtual layer runs would cost bytes and never train.
        raise ValueError(f"plan {name} never uses stored sublayer(s) {missing}: {list(ids)}")


def build_plan(spec: PlanSpec) -> DepthPlan:
    """Turn a spec into the explicit map, validating it."""
    if spec.kind not in PLAN_KINDS:
        raise ValueError(f"unknown plan kind {spec.kind!r}; valid kinds: {', '.join(PLAN_KINDS)}")
    if spec.kind == "vanilla":
        _check_positive("layers", spec.layers)
        if spec.loops != 1:
            raise ValueError(f"a vanilla plan runs each layer once (loops=1), got loops={spec.loops}; use kind='cycle'")
        ids = tuple(range(spec.layers))
        return DepthPlan(ids, ids, spec)
    if spec.kind == "cycle":
        _check_positive("layers", spec.layers)
        _check_positive("loops", spec.loops)
        ids = tuple(i for _ in range(spec.loops) for i in range(spec.layers))
        return DepthPlan(ids, ids, spec)
    # explicit
    if spec.attn_of is None or spec.mlp_of is None:
        raise ValueError("an explicit plan needs both attn_of and mlp_of lists")
    attn_of, mlp_of = tuple(spec.attn_of), tuple(spec.mlp_of)
    if len(attn_of) != len(mlp_of):
        raise ValueError(f"explicit plan: attn_of has {len(attn_of)} entries but mlp_of has {len(mlp_of)}")
    _check_map("attn_of", attn_of)
    _check_map("mlp_of", mlp_of)
    return DepthPlan(attn_of, mlp_of, spec)


def parse_plan(text: str) -> PlanSpec:
    """Parse a command-line plan: ``vanilla:9``, ``cycle:3x3`` (K x B), or ``explicit:0,1,0,1``
    (the same list for attention and MLP) / ``explicit:0,1,0,1/0,0,1,1`` (attention/MLP)."""
    kind, _, arg = text.strip().partition(":")
    kind = kind.strip().lower()
    try:
        if kind == "vanilla":
            return PlanSpec(kind="vanilla", layers=int(arg))
        if kind == "cycle":
            k, _, b = arg.lower().partition("x")
            return PlanSpec(kind="cycle", layers=int(k), loops=int(b))
        if kind == "explicit":
            attn, _, mlp = arg.partition("/")
            attn_of = tuple(int(i) for i in attn.split(","))
            mlp_of = tuple(int(i) for i in mlp.split(",")) if mlp else attn_of
            return PlanSpec(kind="explicit", layers=max(attn_of) + 1, attn_of=attn_of, mlp_of=mlp_of)
    except ValueError:
        pass
    raise ValueError(
        f"cannot parse plan {text!r}: expected 'vanilla:L', 'cycle:KxB' or 'explicit:0,1,0,1[/0,0,1,1]'"
    )

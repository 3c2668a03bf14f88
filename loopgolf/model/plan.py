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

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from loopgolf.checks import check_types, from_dict

PLAN_KINDS = ("vanilla", "cycle", "sequence", "cycle-rev", "middle-cycle", "middle-sequence", "mini-loop", "explicit")
SHARE_MODES = ("block", "mlp", "attn")
LOOPED_KINDS = ("cycle", "sequence", "cycle-rev", "middle-cycle", "middle-sequence", "mini-loop")
# The most virtual layers a plan may run (the presets run 6-17). A bound, so that a typo or a
# crafted artifact header asking for a billion layers is an error, not a hang.
MAX_VIRTUAL_LAYERS = 1024


@dataclass(frozen=True)
class PlanSpec:
    """How virtual layers map onto stored blocks.

    kind:
      - ``vanilla``: ``layers`` unique blocks, each run once (the identity plan).
      - ``cycle``: ``layers`` (K) unique blocks run ``loops`` (B) times: 0..K-1, 0..K-1, ...
      - ``sequence``: each of the K blocks repeated B times in place: 0,0,1,1,2,2.
      - ``cycle-rev``: the block order alternates forward and reversed: 0,1,2,2,1,0,0,1,2.
      - ``middle-cycle`` / ``middle-sequence``: ``first`` unique layers, then K shared blocks
        in cycle / sequence order B times, then ``last`` unique layers.
      - ``mini-loop``: an L-layer stack (``layers``) whose slice ``loop_start..loop_end``
        (inclusive) runs ``loops`` extra times after its first pass; 11 layers with 3..5 looped
        twice is 0..5, 3,4,5, 3,4,5, 6..10 = 17 virtual layers.
      - ``explicit``: the lists ``attn_of`` and ``mlp_of`` (one entry per virtual layer).

    share: which sublayers follow the plan. ``block`` (both), ``mlp`` (MLPs shared by the plan,
    attention unique per virtual layer) or ``attn`` (attention shared, MLPs unique).
    """

    kind: str = "vanilla"
    layers: int = 9
    loops: int = 1
    first: int = 1
    last: int = 1
    loop_start: int = 0
    loop_end: int = 0
    share: str = "block"
    attn_of: tuple[int, ...] | None = None
    mlp_of: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_types(self, "plan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("attn_of", "mlp_of"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanSpec:
        if isinstance(d, dict):
            d = dict(d)
            for key in ("attn_of", "mlp_of"):
                if isinstance(d.get(key), list):  # JSON has no tuples
                    d[key] = tuple(d[key])
        return from_dict(cls, d, "plan")


@dataclass(frozen=True)
class DepthPlan:
    """The explicit virtual-layer map built from a :class:`PlanSpec`.

    ``loop_of[v]`` is the pass a virtual layer belongs to: 0 for the first pass over the stored
    blocks, k for the k-th repetition. Progressive recurrence runs only the virtual layers whose
    pass is at most the current stage.
    """

    attn_of: tuple[int, ...]
    mlp_of: tuple[int, ...]
    spec: PlanSpec = field(default_factory=PlanSpec)
    loop_of: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.loop_of:
            object.__setattr__(self, "loop_of", (0,) * len(self.attn_of))

    @property
    def num_virtual(self) -> int:
        return len(self.attn_of)

    @property
    def num_attn(self) -> int:
        return max(self.attn_of) + 1

    @property
    def num_mlp(self) -> int:
        return max(self.mlp_of) + 1

    @property
    def num_loops(self) -> int:
        """Number of passes (1 + the extra loops that progressive recurrence can stage)."""
        return max(self.loop_of) + 1

    def active_layers(self, stage: int | None = None) -> tuple[int, ...]:
        """Virtual layers that run at a progressive-recurrence stage (None: all of them)."""
        if stage is None:
            return tuple(range(self.num_virtual))
        return tuple(v for v in range(self.num_virtual) if self.loop_of[v] <= stage)

    @property
    def skip_pairs(self) -> tuple[tuple[int, int], ...]:
        """U-Net skips as (encoder layer, decoder layer), one per skip-weight row: the first
        ``V // 2`` virtual layers are the encoder, and decoder layer ``V//2 + i`` receives the
        output of encoder layer ``V//2 - 1 - i`` (last in, first out)."""
        n_enc = self.num_virtual // 2
        return tuple((n_enc - 1 - i, n_enc + i) for i in range(n_enc))

    def schedule(self, passes: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(trained virtual layer, pass) of every layer run when the looped block(s) run
        ``passes`` times instead of the trained count (``num_loops``).

        The layers run are those of the same plan built with ``passes`` loops; each runs the
        parameters of a trained virtual layer: the same block at the same pass while the pass
        exists in training, else at the last trained pass. Fewer passes than trained are the
        progressive-recurrence stages (``active_layers(passes - 1)``); a pass beyond training
        repeats the last trained pass's controls, adapters and depth embeddings over the same
        stored block. U-Net skips keep their trained pairs: see ``GPT.skip_in``."""
        s = self.spec
        if s.kind not in LOOPED_KINDS:
            raise ValueError(
                f"a {s.kind} plan has no loop to run more or fewer times; changing the loop count needs a plan with loops ({', '.join(LOOPED_KINDS)})"
            )
        if not isinstance(passes, int) or isinstance(passes, bool) or passes < 1:
            raise ValueError(f"the loop count must be a positive integer, got {passes!r}")
        if _virtual_count(replace(s, loops=passes - 1 if s.kind == "mini-loop" else passes)) > MAX_VIRTUAL_LAYERS:
            raise ValueError(f"{passes} loops would run more than the {MAX_VIRTUAL_LAYERS} virtual layers allowed")
        trained_blocks, trained_passes = _block_order(s)
        layer_of = {(b, p): v for v, (b, p) in enumerate(zip(trained_blocks, trained_passes))}
        last = self.num_loops - 1
        blocks, pass_of = _block_order(s, passes)
        return tuple(layer_of[(b, min(p, last))] for b, p in zip(blocks, pass_of)), pass_of

    def attn_uses(self, i: int) -> int:
        """How many virtual layers run stored attention sublayer ``i``."""
        return self.attn_of.count(i)

    def mlp_uses(self, i: int) -> int:
        return self.mlp_of.count(i)

    def describe(self) -> str:
        s = self.spec
        heads = {
            "vanilla": f"vanilla L={s.layers}",
            "cycle": f"cycle K={s.layers} B={s.loops}",
            "sequence": f"sequence K={s.layers} B={s.loops}",
            "cycle-rev": f"cycle-rev K={s.layers} B={s.loops}",
            "middle-cycle": f"middle-cycle {s.first}+K={s.layers}xB={s.loops}+{s.last}",
            "middle-sequence": f"middle-sequence {s.first}+K={s.layers}xB={s.loops}+{s.last}",
            "mini-loop": f"mini-loop L={s.layers} layers {s.loop_start}-{s.loop_end} +{s.loops} loops",
            "explicit": "explicit",
        }
        share = "" if s.share == "block" else f", {s.share}-only sharing"
        return f"{heads[s.kind]}{share}: V={self.num_virtual} virtual layers over {self.num_attn} attn / {self.num_mlp} mlp stored"

    def to_dict(self) -> dict[str, Any]:
        """The virtual-layer map as printed in every summary."""
        return {
            "spec": self.spec.to_dict(),
            "virtual_layers": self.num_virtual,
            "unique_attn": self.num_attn,
            "unique_mlp": self.num_mlp,
            "attn_of": list(self.attn_of),
            "mlp_of": list(self.mlp_of),
            "loop_of": list(self.loop_of),
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


def _virtual_count(spec: PlanSpec) -> int:
    """How many virtual layers the spec asks for, computed before anything is built."""
    k, b = spec.layers, spec.loops
    if spec.kind == "explicit":
        return max(len(spec.attn_of or ()), len(spec.mlp_of or ()))
    if spec.kind == "vanilla":
        return k
    if spec.kind == "mini-loop":
        return k + b * max(0, spec.loop_end - spec.loop_start + 1)
    extra = spec.first + spec.last if spec.kind.startswith("middle-") else 0
    return k * b + extra


def _block_order(spec: PlanSpec, passes: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(block index, pass index) per virtual layer for the shared-block kinds, before sharing
    modes are applied. ``passes`` runs the looped blocks that many times instead of the spec's
    count (for mini-loop, 1 + its extra loops)."""
    k, b = spec.layers, spec.loops
    if passes is not None:
        b = passes - 1 if spec.kind == "mini-loop" else passes
    if spec.kind == "vanilla":
        return tuple(range(k)), (0,) * k
    if spec.kind in ("cycle", "middle-cycle"):
        order = [(i, loop) for loop in range(b) for i in range(k)]
    elif spec.kind in ("sequence", "middle-sequence"):
        order = [(i, r) for i in range(k) for r in range(b)]
    elif spec.kind == "cycle-rev":
        order = [(i if loop % 2 == 0 else k - 1 - i, loop) for loop in range(b) for i in range(k)]
    elif spec.kind == "mini-loop":
        a, e = spec.loop_start, spec.loop_end
        if not 0 <= a <= e < k:
            raise ValueError(f"mini-loop slice {a}..{e} must lie inside the {k}-layer stack (0 <= start <= end < {k})")
        if b < (1 if passes is None else 0):
            raise ValueError(f"mini-loop needs loops >= 1 extra passes over the slice, got {b}")
        order = [(i, 0) for i in range(e + 1)]
        order += [(i, loop) for loop in range(1, b + 1) for i in range(a, e + 1)]
        order += [(i, 0) for i in range(e + 1, k)]
    else:  # pragma: no cover - kinds are checked by the caller
        raise AssertionError(spec.kind)
    if spec.kind.startswith("middle-"):
        for name in ("first", "last"):
            if getattr(spec, name) < 0:
                raise ValueError(f"plan {name} must be >= 0, got {getattr(spec, name)}")
        f, n = spec.first, spec.last
        order = [(i, 0) for i in range(f)] + [(f + i, loop) for i, loop in order] + [(f + k + i, 0) for i in range(n)]
    return tuple(i for i, _ in order), tuple(loop for _, loop in order)


# The fields each kind reads; any other field must keep its default, so a mistake such as
# ``loops=3`` on a vanilla plan or ``@mlp`` on an explicit one is an error, not silently ignored.
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "vanilla": ("layers",),
    "cycle": ("layers", "loops", "share"),
    "sequence": ("layers", "loops", "share"),
    "cycle-rev": ("layers", "loops", "share"),
    "middle-cycle": ("layers", "loops", "first", "last", "share"),
    "middle-sequence": ("layers", "loops", "first", "last", "share"),
    "mini-loop": ("layers", "loops", "loop_start", "loop_end", "share"),
    "explicit": ("attn_of", "mlp_of"),
}


def _check_fields(spec: PlanSpec) -> None:
    default = PlanSpec()
    for name in PlanSpec.__dataclass_fields__:
        if name == "kind" or name in KIND_FIELDS[spec.kind]:
            continue
        value = getattr(spec, name)
        if spec.kind == "explicit" and name == "layers" and spec.attn_of and value == max(spec.attn_of) + 1:
            continue  # explicit plans have always recorded their stored attention count here
        if value != getattr(default, name):
            hint = {
                ("vanilla", "loops"): "; to run layers several times use kind='cycle'",
                ("vanilla", "share"): ": nothing is shared in a vanilla plan",
                ("explicit", "share"): ": its attn_of/mlp_of lists already say which sublayers are shared",
            }.get((spec.kind, name), "")
            article = "an" if spec.kind[0] in "aeiou" else "a"
            raise ValueError(
                f"{article} {spec.kind} plan does not use {name}, got {name}={value!r}{hint} ({spec.kind} plans take {', '.join(KIND_FIELDS[spec.kind])})"
            )


def build_plan(spec: PlanSpec) -> DepthPlan:
    """Turn a spec into the explicit map, validating it."""
    if spec.kind not in PLAN_KINDS:
        raise ValueError(f"unknown plan kind {spec.kind!r}; valid kinds: {', '.join(PLAN_KINDS)}")
    if spec.share not in SHARE_MODES:
        raise ValueError(f"unknown share mode {spec.share!r}; valid: {', '.join(SHARE_MODES)}")
    _check_fields(spec)
    n = _virtual_count(spec)
    if n > MAX_VIRTUAL_LAYERS:
        raise ValueError(f"the plan asks for {n:,} virtual layers, more than the {MAX_VIRTUAL_LAYERS} allowed")
    if spec.kind == "explicit":
        if spec.attn_of is None or spec.mlp_of is None:
            raise ValueError("an explicit plan needs both attn_of and mlp_of lists")
        attn_of, mlp_of = tuple(spec.attn_of), tuple(spec.mlp_of)
        if len(attn_of) != len(mlp_of):
            raise ValueError(f"explicit plan: attn_of has {len(attn_of)} entries but mlp_of has {len(mlp_of)}")
        _check_map("attn_of", attn_of)
        _check_map("mlp_of", mlp_of)
        return DepthPlan(attn_of, mlp_of, spec)
    _check_positive("layers", spec.layers)
    _check_positive("loops", spec.loops)
    blocks, loop_of = _block_order(spec)
    unique = tuple(range(len(blocks)))
    attn_of = unique if spec.share == "mlp" else blocks
    mlp_of = unique if spec.share == "attn" else blocks
    return DepthPlan(attn_of, mlp_of, spec, loop_of)


PLAN_SYNTAX = (
    "vanilla:L | cycle:KxB | sequence:KxB | cycle-rev:KxB | middle-cycle:F+KxB+L | "
    "middle-sequence:F+KxB+L | mini-loop:L:A-BxN | explicit:0,1,0,1[/0,0,1,1]; all but vanilla and "
    "explicit may end in @mlp (share only MLPs) or @attn (share only attention)"
)


def _kxb(text: str) -> tuple[int, int]:
    k, sep, b = text.lower().partition("x")
    if not sep:
        raise ValueError(text)
    return int(k), int(b)


def parse_plan(text: str) -> PlanSpec:
    """Parse a command-line plan (see PLAN_SYNTAX), e.g. ``cycle:3x2``, ``mini-loop:11:3-5x2``,
    ``middle-cycle:1+2x3+1``, ``cycle:2x3@mlp``."""
    body, _, share = text.strip().partition("@")
    kind, _, arg = body.partition(":")
    kind = kind.strip().lower()
    share = share.strip().lower() or "block"
    try:
        if kind == "vanilla":
            return PlanSpec(kind="vanilla", layers=int(arg), share=share)
        if kind in ("cycle", "sequence", "cycle-rev"):
            k, b = _kxb(arg)
            return PlanSpec(kind=kind, layers=k, loops=b, share=share)
        if kind in ("middle-cycle", "middle-sequence"):
            first, mid, last = arg.split("+")
            k, b = _kxb(mid)
            return PlanSpec(kind=kind, layers=k, loops=b, first=int(first), last=int(last), share=share)
        if kind == "mini-loop":
            layers, span = arg.split(":")
            rng, _, n = span.lower().partition("x")
            a, _, e = rng.partition("-")
            return PlanSpec(kind=kind, layers=int(layers), loops=int(n), loop_start=int(a), loop_end=int(e), share=share)
        if kind == "explicit":
            attn, _, mlp = arg.partition("/")
            attn_of = tuple(int(i) for i in attn.split(","))
            mlp_of = tuple(int(i) for i in mlp.split(",")) if mlp else attn_of
            return PlanSpec(kind="explicit", layers=max(attn_of) + 1, attn_of=attn_of, mlp_of=mlp_of, share=share)
    except ValueError:
        pass
    raise ValueError(f"cannot parse plan {text!r}: expected {PLAN_SYNTAX}")

"""A run's configuration, typed, and the named presets it starts from.

:class:`RunConfig` is everything that decides what a run computes: the model (``model``, the
only thing needed to rebuild it; it travels inside every artifact), how it trains (``train``),
how it is stored (``export``), how it is scored (``eval``), what it starts from and learns
towards when it uptrains a converted model (``uptrain``), the checkpoint interval and the data.
It is the only thing a run writes to ``config.json`` (:mod:`loopgolf.rundir`) and reads back
losslessly: ``RunConfig.from_dict(cfg.to_dict()) == cfg``.

Which fields a resumed run may change is marked on the fields themselves
(:data:`MAY_CHANGE_ON_RESUME`): the budget, the device, compilation, the
checkpoint interval and where the data lives. :meth:`RunConfig.fixed_changes` lists the others
that differ between two configurations, which is what a resume refuses.

A preset is a (ModelConfig, TrainConfig) pair derived from a base; a run's configuration is a
preset with the command line's changes applied (:meth:`RunConfig.from_preset`, then
:meth:`RunConfig.with_changes`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from loopgolf.checks import ADDED_LATER, check_range, check_types, from_dict
from loopgolf.export.artifact import CODECS
from loopgolf.export.pack import DEFAULT_CAP_BYTES
from loopgolf.export.policies import RECORD_POLICY
from loopgolf.model.gpt import MAX_SEQ_LEN, ModelConfig, unique_params_formula
from loopgolf.model.plan import PlanSpec, build_plan

# Field metadata: a resumed run may give this field a new value (the budget, where it runs);
# every other field of a run's configuration is fixed by its first start.
MAY_CHANGE_ON_RESUME = {"on_resume": "may change"}


def may_change_on_resume(f: Any) -> bool:
    """Whether dataclass field ``f`` may take a new value when a run resumes."""
    return f.metadata.get("on_resume") == "may change"


# The Newton-Schulz coefficient schedules Muon knows (loopgolf.train.optim.NS_SCHEDULES, which a
# test keeps equal to this list; named here so that checking a config loads no training code).
MUON_NS_SCHEDULES = ("standard", "polar_express")


@dataclass
class OptimizerConfig:
    """Learning rates and settings of the Muon + Adam optimizers (loopgolf.train.optim)."""

    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    embed_lr: float = 0.05  # tied embedding (it is also the output head)
    head_lr: float = 0.008  # untied output head
    untied_embed_lr: float = 0.6
    adapter_lr: float = 0.01  # per-virtual-layer LoRA factors (under either adapter_optimizer)
    adapter_optimizer: str = "adam"  # "adam" or "muon": per-depth LoRA diverged under Muon in a public report
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
    # Newton-Schulz coefficients of Muon (MUON_NS_SCHEDULES): "standard" repeats one tuple every
    # step; "polar_express" takes a minimax-optimal tuple per step (the record's Muon, PR #1787).
    muon_ns: str = field(default="standard", metadata=ADDED_LATER)
    # Decoupled weight decay (each step w <- w * (1 - lr * wd) before the update, lr the scheduled
    # one) and Muon's per-row normalisation of the update before Newton-Schulz: the record's
    # MUON_WD 0.095, EMBED_WD 0.085, ADAM_WD 0.02, MUON_ROW_NORMALIZE (PR #1855's stack).
    # 0 / false: the baseline (plain Adam, no decay).
    muon_weight_decay: float = field(default=0.0, metadata=ADDED_LATER)
    muon_row_normalize: bool = field(default=False, metadata=ADDED_LATER)
    embed_weight_decay: float = field(default=0.0, metadata=ADDED_LATER)  # the tied embedding (or untied input embedding)
    adam_weight_decay: float = field(default=0.0, metadata=ADDED_LATER)  # control tensors and an untied head

    def __post_init__(self) -> None:
        check_types(self, "optim")
        if self.adapter_optimizer not in ("adam", "muon"):
            raise ValueError(f"adapter_optimizer must be 'adam' or 'muon', got {self.adapter_optimizer!r}")
        if self.muon_ns not in MUON_NS_SCHEDULES:
            raise ValueError(f"optim muon_ns must be one of {', '.join(MUON_NS_SCHEDULES)}, got {self.muon_ns!r}")
        for name in ("matrix_lr", "scalar_lr", "embed_lr", "head_lr", "untied_embed_lr", "adapter_lr"):
            check_range("optim", name, getattr(self, name), 0.0)
        for name in ("beta1", "beta2", "muon_momentum", "muon_momentum_warmup_start"):
            check_range("optim", name, getattr(self, name), 0.0, 1.0)
        check_range("optim", "adam_eps", self.adam_eps, 0.0, None, lo_open=True)
        check_range("optim", "muon_momentum_warmup_steps", self.muon_momentum_warmup_steps, 0)
        check_range("optim", "muon_backend_steps", self.muon_backend_steps, 1, 100)
        for name in ("muon_weight_decay", "embed_weight_decay", "adam_weight_decay"):
            check_range("optim", name, getattr(self, name), 0.0, 10.0)


MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit seed


LOOP_SAMPLING_SYNTAX = "uniform:LO-HI (each count equally likely) or poisson:MEAN[:MAX] (1 + Poisson(MEAN - 1), at most MAX, default 2 x MEAN)"
MAX_SAMPLED_LOOPS = 64


@dataclass(frozen=True)
class LoopSampler:
    """How many times depth-sampled training runs a recursive plan's loop at a step.

    ``uniform:LO-HI`` draws every count in LO..HI with equal chance; ``poisson:MEAN[:MAX]`` draws
    ``1 + Poisson(MEAN - 1)`` (mean MEAN before the cap), at most MAX (default ``2 * MEAN``,
    rounded up), as recurrent-depth models train with a random number of iterations so that
    they can be run deeper later. A step's count depends only on the run's seed and the step
    (so every rank and a resumed run draw the same)."""

    kind: str
    low: int = 1
    high: int = 1
    mean: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoopSampler:
        kind, _, arg = str(text).strip().partition(":")
        try:
            if kind == "uniform":
                lo, sep, hi = arg.partition("-")
                if not sep:
                    raise ValueError
                sampler = cls("uniform", int(lo), int(hi))
            elif kind == "poisson":
                mean, _, top = arg.partition(":")
                m = float(mean)
                if not math.isfinite(m):
                    raise ValueError
                sampler = cls("poisson", 1, int(top) if top else math.ceil(2 * m), m)
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"cannot parse loop_sampling {text!r}: expected {LOOP_SAMPLING_SYNTAX}") from None
        if not 1 <= sampler.low <= sampler.high <= MAX_SAMPLED_LOOPS:
            raise ValueError(f"loop_sampling {text!r}: the counts must satisfy 1 <= low <= high <= {MAX_SAMPLED_LOOPS}")
        if kind == "poisson" and not 1.0 <= sampler.mean <= sampler.high:
            raise ValueError(f"loop_sampling {text!r}: the mean must be in [1, max]")
        return sampler

    def __str__(self) -> str:
        return f"uniform:{self.low}-{self.high}" if self.kind == "uniform" else f"poisson:{self.mean:g}:{self.high}"

    def draw(self, seed: int, step: int) -> int:
        """The loop count of training step ``step`` of a run seeded ``seed``."""
        rng = np.random.default_rng([seed, step, 0x100B5])
        if self.kind == "uniform":
            return int(rng.integers(self.low, self.high + 1))
        return int(min(1 + rng.poisson(self.mean - 1.0), self.high))


@dataclass
class TrainConfig:
    seq_len: int = 1024
    batch_tokens: int = 524_288  # global tokens per optimizer step (all ranks, all micro-steps)
    micro_batch_tokens: int | None = None  # at most this many tokens per rank per forward; None = batch_tokens / world
    max_steps: int | None = field(default=20_000, metadata=MAY_CHANGE_ON_RESUME)
    time_budget: float | None = field(default=600.0, metadata=MAY_CHANGE_ON_RESUME)  # seconds of training (validation excluded)
    warmup_steps: int = 0  # linear lr warmup (the baseline uses none)
    warmdown_frac: float = 0.1  # linear decay to zero over the last fraction of the budget
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    grad_clip: float = 0.0
    recurrence_stages: list[float] = field(default_factory=list)  # progressive recurrence: training fraction at which each extra pass switches on
    # Depth-sampled training: each step runs the plan's loop a drawn number of times
    # (LoopSampler: "uniform:LO-HI" or "poisson:MEAN[:MAX]"); None: the trained count.
    loop_sampling: str | None = field(default=None, metadata=ADDED_LATER)
    val_every: int = 0  # steps between periodic validations (0 = only at the end)
    val_max_tokens: int | None = 65_536  # periodic validation scores a prefix this long
    log_every: int = 10
    seed: int = 1337
    compile: bool = field(
        default=False, metadata=MAY_CHANGE_ON_RESUME
    )  # torch.compile (inductor): CUDA, or CPU with a C++ compiler; compiled before the clock starts
    device: str = field(default="auto", metadata=MAY_CHANGE_ON_RESUME)  # auto | cpu | cuda
    # The warmdown's floor: the lr multiplier decays to this fraction instead of 0 (the record's
    # MIN_LR, 0.10; PR #1787). 0: decay to zero.
    min_lr_frac: float = field(default=0.0, metadata=ADDED_LATER)
    # Decay of an exponential moving average of the weights, kept (in float32) after every
    # optimizer step and swapped in for the live weights when training ends, so the exported and
    # scored model is the average (the record: 0.9965). None: no average, the live weights.
    ema_decay: float | None = field(default=None, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        if isinstance(self.optim, dict):
            self.optim = from_dict(OptimizerConfig, self.optim, "optim")
        if isinstance(self.recurrence_stages, list):  # JSON writes 0.0 as 0.0 but a hand edit may write 0
            self.recurrence_stages = [float(f) if isinstance(f, int) and not isinstance(f, bool) else f for f in self.recurrence_stages]
        check_types(self, "train")
        check_range("train", "seq_len", self.seq_len, 1, MAX_SEQ_LEN)
        check_range("train", "seed", self.seed, 0, MAX_SEED)
        check_range("train", "warmup_steps", self.warmup_steps, 0)
        check_range("train", "grad_clip", self.grad_clip, 0.0)
        check_range("train", "val_every", self.val_every, 0)
        check_range("train", "log_every", self.log_every, 1)
        for name in ("micro_batch_tokens", "val_max_tokens"):
            if getattr(self, name) is not None:
                check_range("train", name, getattr(self, name), 1)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"train device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {self.seq_len}")
        if self.batch_tokens < self.seq_len or self.batch_tokens % self.seq_len:
            raise ValueError(f"batch_tokens {self.batch_tokens} must be a positive multiple of seq_len {self.seq_len}")
        if self.max_steps is None and self.time_budget is None:
            raise ValueError("training needs a stop: set max_steps and/or time_budget")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"time_budget must be positive seconds, got {self.time_budget}")
        if any(not 0.0 <= f < 1.0 for f in self.recurrence_stages) or self.recurrence_stages != sorted(self.recurrence_stages):
            raise ValueError(f"recurrence_stages must be increasing fractions in [0, 1), got {self.recurrence_stages}")
        if not 0.0 <= self.warmdown_frac <= 1.0:
            raise ValueError(f"warmdown_frac must be in [0, 1], got {self.warmdown_frac}")
        check_range("train", "min_lr_frac", self.min_lr_frac, 0.0, 1.0)
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"train ema_decay must be in (0, 1) (e.g. 0.9965), or null for no weight average; got {self.ema_decay!r}")
        if self.loop_sampling is not None:
            self.loop_sampling = str(LoopSampler.parse(self.loop_sampling))
            if self.recurrence_stages:
                raise ValueError("loop_sampling draws the loop count at every step; it cannot be combined with recurrence_stages")


def train_config_from_dict(d: dict[str, Any], *, required: bool = False) -> TrainConfig:
    """A TrainConfig from JSON-like data; unknown (and with ``required``, missing) fields are a
    ValueError naming them."""
    return from_dict(TrainConfig, d, "train config", required=required)


QAT_MODES = ("off", "ste", "noise")


@dataclass
class QATSchedule:
    """Loop-aware QAT over the end of training (:mod:`loopgolf.train.qat`): ``off``, ``ste``
    (straight-through fake quantization) or ``noise`` (quantization-sized noise), on after
    ``start_frac`` of the budget."""

    mode: str = "off"
    start_frac: float = 0.85

    def __post_init__(self) -> None:
        check_types(self, "export qat")
        if self.mode not in QAT_MODES:
            raise ValueError(f"unknown QAT mode {self.mode!r}; valid: {', '.join(QAT_MODES)}")
        check_range("export qat", "start_frac", self.start_frac, 0.0, 1.0)


@dataclass
class ExportConfig:
    """How the trained model is stored: under which byte cap (code included), with which codec
    (``auto``: the smallest) and quantization policy (``""``: the int8 baseline;
    :func:`loopgolf.export.quantize.parse_policy` syntax), and the QAT that prepares for it.
    ``code_form`` is the form of ``train_gpt.py`` whose bytes count against the cap (and that
    ``loopgolf submission`` writes): :data:`CODE_FORMS`."""

    cap_bytes: int = DEFAULT_CAP_BYTES
    codec: str = "auto"
    quant: str = ""
    qat: QATSchedule = field(default_factory=QATSchedule)
    code_form: str = field(default="plain", metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        if isinstance(self.qat, dict):
            self.qat = from_dict(QATSchedule, self.qat, "export qat")
        check_types(self, "export")
        if self.cap_bytes < 1:
            raise ValueError(f"the byte cap must be a positive integer, got {self.cap_bytes!r}")
        if self.codec not in ("auto", *CODECS):
            raise ValueError(f"unknown codec {self.codec!r}; valid: auto, {', '.join(CODECS)}")
        split_code_form(self.code_form)
        from loopgolf.export.quantize import parse_policy  # the encoders load only where a policy is checked

        parse_policy(self.quant)


# The forms of the generated train_gpt.py: the sources as they are (plain) or through
# python-minifier (minify), optionally wrapped in a self-extracting lzma or brotli stub.
CODE_FORMS = ("plain", "minify", "plain+lzma", "plain+brotli", "minify+lzma", "minify+brotli")


def split_code_form(code_form: str) -> tuple[str, str | None]:
    """``"minify+lzma"`` -> ``("minify", "lzma")``; ValueError for anything not in :data:`CODE_FORMS`."""
    if code_form not in CODE_FORMS:
        raise ValueError(f"unknown code form {code_form!r}; valid: {', '.join(CODE_FORMS)}")
    form, _, compress = code_form.partition("+")
    return form, compress or None


@dataclass
class EvalConfig:
    """How the final scores are computed: sliding windows every ``stride`` tokens (None:
    non-overlapping windows of the training seq_len), ``batch_size`` windows per forward."""

    stride: int | None = None
    batch_size: int = 8
    # Compute spent at evaluation on the roundtrip model (docs/evaluation.md): the loop count of a
    # recursive plan (None: the trained count), score-first test-time training (a TTTSpec in
    # its text form; None: none) and the seconds it may adapt for (None: unbounded).
    loops: int | None = field(default=None, metadata=ADDED_LATER)
    ttt: str | None = field(default=None, metadata=ADDED_LATER)
    eval_time: float | None = field(default=None, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        if isinstance(self.eval_time, int) and not isinstance(self.eval_time, bool):
            self.eval_time = float(self.eval_time)
        check_types(self, "eval")
        if self.stride is not None:
            check_range("eval", "stride", self.stride, 1)
        check_range("eval", "batch_size", self.batch_size, 1)
        if self.loops is not None:
            check_range("eval", "loops", self.loops, 1, 1024)
        if self.ttt is not None:
            from loopgolf.ttt import TTTSpec

            self.ttt = str(TTTSpec.parse(self.ttt))
            if TTTSpec.parse(self.ttt).reset == "doc" and self.stride is not None:
                raise ValueError("eval ttt with reset=doc scores documents in chunks of their own; it takes no stride")
        if self.eval_time is not None:
            check_range("eval", "eval_time", self.eval_time, 0.0, None, lo_open=True)
            if self.ttt is None:
                raise ValueError("eval eval_time bounds test-time training; set eval ttt too")

    @property
    def computes(self) -> bool:
        """Whether the final evaluation spends compute beyond plain scoring."""
        return self.loops is not None or self.ttt is not None


@dataclass
class UptrainConfig:
    """Uptraining after ``loopgolf convert``: start weights (``init_from``: a convert or run
    directory, an artifact or a Hugging Face directory), a teacher for forward-KL distillation
    (loss = (1 - w) CE + w T^2 KL(teacher || student)), and the weight of the intermediate-loop
    losses that prepare early exit."""

    init_from: str | None = None
    distill_from: str | None = None
    distill_weight: float = 0.0
    distill_temp: float = 1.0
    exit_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        check_types(self, "uptrain")
        check_range("uptrain", "distill_weight", self.distill_weight, 0.0, 1.0)
        check_range("uptrain", "distill_temp", self.distill_temp, 0.0, None, lo_open=True)
        check_range("uptrain", "exit_loss_weight", self.exit_loss_weight, 0.0)


@dataclass
class DataRef:
    """Which data a run trains on: its name (the path as given, or ``embedded:<corpus>``) and
    the directory it was found in."""

    name: str
    dir: str

    def __post_init__(self) -> None:
        check_types(self, "data")


def check_recurrence_stages(stages: list[float], plan: Any) -> None:
    """Progressive recurrence switches on one extra pass at each start fraction: a plan with L
    loops needs L - 1 of them (or none, to train at full depth throughout)."""
    if stages and len(stages) != plan.num_loops - 1:
        raise ValueError(
            f"recurrence_stages has {len(stages)} start fractions but the plan has {plan.num_loops - 1} extra pass(es) to switch on "
            f"({plan.describe()}); give one start per extra pass, e.g. recurrence_stages={[stages[0]] * max(plan.num_loops - 1, 1)}, or []"
        )


@dataclass
class RunConfig:
    """Everything that decides what a run computes (see the module docstring)."""

    preset: str
    model: ModelConfig
    train: TrainConfig
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    uptrain: UptrainConfig | None = None
    checkpoint_every: int = field(default=0, metadata=MAY_CHANGE_ON_RESUME)  # steps between checkpoints; 0: none
    data: DataRef | None = field(default=None, metadata=MAY_CHANGE_ON_RESUME)  # None until the run opens its data

    def __post_init__(self) -> None:
        parts = {
            "model": (ModelConfig, "model config"),
            "train": (TrainConfig, "train config"),
            "export": (ExportConfig, "export"),
            "eval": (EvalConfig, "eval"),
            "uptrain": (UptrainConfig, "uptrain"),
            "data": (DataRef, "data"),
        }
        for name, (cls, where) in parts.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, from_dict(cls, value, where, required=name in ("data",)))
        check_types(self, "run config")
        check_range("run config", "checkpoint_every", self.checkpoint_every, 0)
        check_recurrence_stages(self.train.recurrence_stages, self.model.depth_plan)  # here, not hours into a sweep
        # Loop counts other than the trained one need a plan with loops (refused here, before a run starts).
        if self.train.loop_sampling is not None:
            self.model.depth_plan.schedule(LoopSampler.parse(self.train.loop_sampling).high)
        if self.eval.loops is not None:
            self.model.depth_plan.schedule(self.eval.loops)
        if self.uptrain is not None and self.export.qat.mode != "off" and (self.uptrain.distill_from is not None or self.uptrain.exit_loss_weight > 0):
            raise ValueError("QAT cannot be combined with distillation or exit losses yet: uptrain first, then run QAT on the result")

    @classmethod
    def from_preset(cls, preset: Preset) -> RunConfig:
        export = ExportConfig(quant=preset.export_quant) if preset.export_quant is not None else ExportConfig()
        return cls(preset.name, preset.model, preset.train, export=export, eval=EvalConfig(batch_size=preset.eval_batch_size, **preset.eval_settings))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, in the layout ``config.json`` holds."""
        out = asdict(self)
        out["model"] = self.model.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Any) -> RunConfig:
        """The configuration a ``to_dict`` (or an older loopgolf's flat ``config.json``) wrote;
        a ValueError naming the key or field for anything else. Every field of the train, export
        and eval parts must be present: a file that lacks one was not written by this loopgolf."""
        if isinstance(d, dict) and "cap_bytes" in d:
            d = _from_flat_layout(d)
        if not isinstance(d, dict):
            raise ValueError(f"a run config must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted({"preset", "model", "train", "export", "eval"} - set(d)), sorted(set(d) - names)
        if missing or unknown:
            raise ValueError(f"not a run config written by loopgolf: missing keys {missing}, unknown keys {unknown}")
        export = d["export"]
        if isinstance(export, dict) and isinstance(export.get("qat"), dict):
            export = {**export, "qat": from_dict(QATSchedule, export["qat"], "export qat", required=True)}
        return cls(
            **{
                **d,
                "train": from_dict(TrainConfig, d["train"], "train config", required=True),
                "export": from_dict(ExportConfig, export, "export", required=True),
                "eval": from_dict(EvalConfig, d["eval"], "eval", required=True),
            }
        )

    def with_changes(self, changes: dict[str, Any]) -> RunConfig:
        """A copy with ``changes`` applied: dotted paths (``train.seq_len``, ``export.qat.mode``,
        ``model.plan``) -> new values, checked as the fields are rebuilt."""
        tree = self.to_dict()
        for path, value in changes.items():
            node = tree
            *parents, leaf = path.split(".")
            for part in parents:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            node[leaf] = value
        return RunConfig.from_dict(tree)

    def fixed_changes(self, other: RunConfig) -> list[tuple[str, Any, Any]]:
        """``(dotted path, this value, other's value)`` of every field that differs between the
        two configurations and may not change when a run resumes."""
        mine, theirs = dict(_leaves(self)), dict(_leaves(other))
        out = []
        for path in sorted(set(mine) | set(theirs)):
            (a, a_free), (b, b_free) = mine.get(path, (None, False)), theirs.get(path, (None, False))
            if a != b and not (a_free or b_free):
                out.append((path, a, b))
        return out


def _leaves(obj: Any, prefix: str = "", free: bool = False) -> Iterator[tuple[str, tuple[Any, bool]]]:
    """(dotted path, (value, may change on resume)) for every leaf field of a config dataclass.
    A field inside one marked as changeable (``data``) is changeable too."""
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), f"{prefix}{f.name}"
        changeable = free or may_change_on_resume(f)
        if dataclasses.is_dataclass(value) and not isinstance(value, PlanSpec):
            yield from _leaves(value, path + ".", changeable)
        else:
            yield path, (value.to_dict() if isinstance(value, PlanSpec) else value, changeable)


# The keys of the flat config.json loopgolf wrote before RunConfig had parts.
_FLAT_KEYS = frozenset(
    {"preset", "model", "train", "cap_bytes", "codec", "quant", "eval_stride", "data", "data_dir", "qat", "eval_batch_size", "checkpoint_every", "uptrain"}
)


def _from_flat_layout(d: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(d) - _FLAT_KEYS)
    if unknown:
        raise ValueError(f"not a run config written by loopgolf: unknown keys {unknown}")
    out: dict[str, Any] = {k: d[k] for k in ("preset", "model", "train", "uptrain") if k in d}
    out["export"] = {"cap_bytes": d["cap_bytes"], "codec": d.get("codec", "auto"), "quant": d.get("quant", ""), "qat": d.get("qat") or {"mode": "off"}}
    out["eval"] = {"stride": d.get("eval_stride")}
    if d.get("eval_batch_size") is not None:
        out["eval"]["batch_size"] = d["eval_batch_size"]
    out["checkpoint_every"] = d.get("checkpoint_every") or 0
    if "data" in d or "data_dir" in d:
        out["data"] = {"name": d.get("data"), "dir": d.get("data_dir")}
    return out


@dataclass
class Preset:
    name: str
    description: str
    model: ModelConfig
    train: TrainConfig
    eval_batch_size: int = 8
    # The export policy and evaluation settings a preset's runs use (None / empty: the int8
    # baseline export, plain evaluation); the record presets carry the record's. Kept as plain
    # values and made into configs only when a run is built: checking a policy or a TTT spec
    # loads the encoders and the TTT code, which `import loopgolf.config` must not.
    export_quant: str | None = None
    eval_settings: dict[str, Any] = field(default_factory=dict)


# The default run stops at a fixed step count, not a wallclock budget, so its score does not
# depend on how busy the machine is: about what a quiet 2-core CPU reaches in the 150 s the default
# once trained for (246 steps in 150.6 s; 250 steps took 158-162 s; docs/LOG.md, 2026-12-04).
CPU_DEFAULT_STEPS = 250


def _cpu_train(**kw: Any) -> TrainConfig:
    base = dict(
        seq_len=128,
        batch_tokens=4_096,
        max_steps=CPU_DEFAULT_STEPS,
        time_budget=None,
        warmdown_frac=0.3,
        val_every=200,
        val_max_tokens=16_384,
        log_every=10,
        optim=OptimizerConfig(muon_momentum_warmup_steps=100),
    )
    base.update(kw)
    return TrainConfig(**base)


def _pg_train(**kw: Any) -> TrainConfig:
    # 65,536 tokens per forward: 8 accumulation micro-steps on one GPU, 1 on eight, as the
    # official script does (the whole 524,288-token batch in one forward would not fit in 80 GB).
    base = dict(warmdown_frac=0.087, val_every=1000, log_every=50, micro_batch_tokens=65_536)
    base.update(kw)
    return TrainConfig(**base)


@dataclass(frozen=True)
class Scale:
    """One size of the preset family: the vanilla model every variant is compared with."""

    prefix: str
    width: int
    depth: int  # virtual layers of the vanilla model (and of the shared variants)
    loops: int  # B for the shared variants (K = depth // loops)
    heads: int
    kv_heads: int
    train: Callable[..., TrainConfig]
    note: str
    eval_batch_size: int
    mini_loop: PlanSpec
    mini_stages: list[float]


SCALES = (
    Scale(
        "cpu",
        256,
        6,
        3,
        4,
        2,
        lambda: _cpu_train(max_steps=None, time_budget=600.0),
        "CPU scale, 600 s on 2 cores",
        8,
        PlanSpec("mini-loop", layers=4, loops=1, loop_start=1, loop_end=2),
        [0.35],
    ),
    Scale(
        "pg",
        512,
        9,
        3,
        8,
        4,
        _pg_train,
        "Parameter Golf scale, 600 s on one GPU",
        32,
        PlanSpec("mini-loop", layers=9, loops=2, loop_start=3, loop_end=5),
        [0.35, 0.5],
    ),
)


def widest_matching(base: ModelConfig, plan: PlanSpec, step: int = 128, **kw: Any) -> ModelConfig:
    """The widest model (width a multiple of ``step``, 64-wide heads, half as many KV heads)
    on ``plan`` whose unique parameters do not exceed ``base``'s: the bytes saved by sharing
    reinvested in width."""
    budget = unique_params_formula(base)
    best = None
    width = step
    while True:
        heads = width // 64
        cfg = ModelConfig(**{**base.to_dict(), "model_dim": width, "num_heads": heads, "num_kv_heads": max(1, heads // 2), "plan": plan.to_dict(), **kw})
        if unique_params_formula(cfg) > budget:
            break
        best, width = cfg, width + step
    if best is None:
        raise ValueError(f"no width fits the budget of {budget:,} parameters on {plan}")
    return best


def _family(scale: Scale) -> list[Preset]:
    """The seed hypothesis's variants at one scale, all with the vanilla model's virtual depth."""
    base = ModelConfig(model_dim=scale.width, num_heads=scale.heads, num_kv_heads=scale.kv_heads, plan=PlanSpec("vanilla", layers=scale.depth))
    k, b = scale.depth // scale.loops, scale.loops

    def model(plan: PlanSpec, **kw: Any) -> ModelConfig:
        return ModelConfig(**{**base.to_dict(), "plan": plan.to_dict(), **kw})

    shared = PlanSpec("cycle", layers=k, loops=b)
    all_lora = ("q", "k", "v", "o", "mlp_in", "mlp_out")
    variants: list[tuple[str, str, ModelConfig, dict[str, Any]]] = [
        ("vanilla", f"{scale.depth} x {scale.width} unique layers", base, {}),
        ("shared", f"strict full-block sharing: {k} blocks x {b} loops (CYCLE)", model(shared), {}),
        (
            "shared-scales",
            f"{k} blocks x {b} loops + unshared per-layer scales, mixes and q gains (the K={k} few-block point)",
            model(shared, per_layer_controls=True),
            {},
        ),
        ("shared-depth", f"{k} blocks x {b} loops + per-layer scales + depth embeddings", model(shared, per_layer_controls=True, depth_embeddings=True), {}),
        (
            "shared-lora4",
            f"{k} blocks x {b} loops + per-layer scales + rank-4 LoRA on every projection",
            model(shared, per_layer_controls=True, lora_ranks=dict.fromkeys(all_lora, 4)),
            {},
        ),
        (
            "shared-lora16",
            f"{k} blocks x {b} loops + per-layer scales + rank-16 LoRA on every projection",
            model(shared, per_layer_controls=True, lora_ranks=dict.fromkeys(all_lora, 16)),
            {},
        ),
        (
            "mlp-share",
            f"MLP-heavy sharing: {k} MLPs x {b} loops, attention unique per layer",
            model(PlanSpec("cycle", layers=k, loops=b, share="mlp"), per_layer_controls=True),
            {},
        ),
        (
            "attn-share",
            f"attention sharing: {k} attention sublayers x {b} loops, MLPs unique per layer",
            model(PlanSpec("cycle", layers=k, loops=b, share="attn"), per_layer_controls=True),
            {},
        ),
        *[
            (
                f"k{n}",
                f"{'single' if n == 1 else 'few'}-block recurrence: {n} block(s) x {scale.depth // n} loops + per-layer scales",
                model(PlanSpec("cycle", layers=n, loops=scale.depth // n), per_layer_controls=True),
                {},
            )
            for n in (1, 2, 3)
            if n != k  # K = k is the shared-scales preset
        ],
        (
            "mini-loop",
            f"mini-loop: {build_plan(scale.mini_loop).describe()}, extra passes switched on at {scale.mini_stages} of training",
            model(scale.mini_loop, per_layer_controls=True),
            {"recurrence_stages": scale.mini_stages},
        ),
    ]
    wide = widest_matching(base, shared, per_layer_controls=True)
    variants.append(("wide", f"wide recurrent: {k} blocks x {b} loops at width {wide.model_dim}, unique params matched to vanilla's", wide, {}))
    presets = []
    for name, desc, cfg, train_kw in variants:
        train = scale.train()
        presets.append(Preset(f"{scale.prefix}-{name}", f"{desc} ({scale.note})", cfg, TrainConfig(**{**asdict(train), **train_kw}), scale.eval_batch_size))
    return presets


# The current Parameter Golf record's recipe (openai/parameter-golf PR #1855, 1.0611 val_bpb;
# docs/models.md "The record's architecture", docs/training.md, docs/export.md).
RECORD_ARCH: dict[str, Any] = dict(
    mlp_mult=4,
    mlp_act="leaky_relu2",
    ln_scale=True,
    rope_dims=16,
    xsa=True,
    attn_gate=True,
    attn_gate_scale=0.5,
    gate_window=12,
    skip_gates=True,
    smear_gate=True,
    qk_gain_init=5.0,
)
RECORD_OPTIM: dict[str, Any] = dict(
    matrix_lr=0.026,
    embed_lr=0.03,
    scalar_lr=0.02,
    beta2=0.99,
    muon_momentum=0.97,
    muon_momentum_warmup_start=0.92,
    muon_ns="polar_express",
    muon_row_normalize=True,
    muon_weight_decay=0.095,
    embed_weight_decay=0.085,
    adam_weight_decay=0.02,
)
RECORD_TRAIN: dict[str, Any] = dict(warmdown_frac=0.85, min_lr_frac=0.1, grad_clip=0.3)
# The record's export (docs/export.md): GPTQ int6, int7 embedding, sigma clips, LQER.
RECORD_QUANT = RECORD_POLICY


def _record_presets() -> list[Preset]:
    """``pg-record`` (the record's configuration on loopgolf) and ``cpu-record`` (the same recipe
    at the cpu family's scale; pg-record's 2-lane decoder from layer 8, as the record's, is left
    out of cpu-record until measured at that scale). Not carried over: the SP8192
    case-operations tokenizer (pg-record uses plain SP8192 FineWeb), and phased global TTT
    (pg-record evaluates with loopgolf's per-document score-first TTT)."""
    pg = Preset(
        "pg-record",
        "the Parameter Golf record's recipe (PR #1855): 11 x 512, 8/4 heads, MLP 4x LeakyReLU(0.5)^2, layers 3-5 run 3x from 35%, "
        "XSA, partial RoPE, gates, SmearGate, 2-lane decoder from layer 8, Polar-Express Muon, EMA; SP8192 data (loopgolf data fineweb --variant sp8192), 600 s on one GPU",
        ModelConfig(
            vocab_size=8192,
            max_seq_len=2048,
            plan=PlanSpec("mini-loop", layers=11, loops=2, loop_start=3, loop_end=5),
            parallel_from=8,  # the record's PARALLEL_START_LAYER: stored layers 8-10 run two lanes
            parallel_lanes=True,
            **RECORD_ARCH,
        ),
        _pg_train(
            seq_len=2048,
            batch_tokens=786_432,
            ema_decay=0.9965,
            recurrence_stages=[0.35, 0.35],
            optim=OptimizerConfig(**RECORD_OPTIM, muon_momentum_warmup_steps=1500),
            **RECORD_TRAIN,
        ),
        eval_batch_size=8,
        export_quant=RECORD_QUANT,
        eval_settings=dict(ttt="rank=80,lr=0.0001,chunk=48,reset=doc", eval_time=480.0),
    )
    # At the cpu family's scale (about 300-600 steps in 600 s) the record's EMA (an average over
    # ~286 of its 4,931 steps) would average in the early, poor weights: 0.97 averages over ~33
    # steps, about the same few percent of the run. Muon's momentum warmup keeps the family's 100.
    cpu = Preset(
        "cpu-record",
        "the record's recipe at the cpu family's scale: 4 x 256, 4/2 heads, MLP 4x LeakyReLU(0.5)^2, layers 1-2 run 3x from 35%, "
        "XSA, partial RoPE (16 of 64), gates, SmearGate, Polar-Express Muon, EMA 0.97, int6 GPTQ export; 600 s on 2 cores",
        ModelConfig(model_dim=256, num_heads=4, num_kv_heads=2, plan=PlanSpec("mini-loop", layers=4, loops=2, loop_start=1, loop_end=2), **RECORD_ARCH),
        _cpu_train(
            max_steps=None,
            time_budget=600.0,
            ema_decay=0.97,
            recurrence_stages=[0.35, 0.35],
            optim=OptimizerConfig(**RECORD_OPTIM, muon_momentum_warmup_steps=100),
            **RECORD_TRAIN,
        ),
        export_quant=RECORD_QUANT,
    )
    return [pg, cpu]


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "cpu",
            f"default: 4 x 256 vanilla, seq 128, {CPU_DEFAULT_STEPS} steps (about 160 s on 2 quiet CPU cores; the `loopgolf run` default)",
            ModelConfig(model_dim=256, num_heads=4, num_kv_heads=2, plan=PlanSpec("vanilla", layers=4)),
            _cpu_train(),
        ),
        Preset(
            "debug",
            "tiny 2 x 32 model, seq 32, 8 steps: for tests and smoke checks",
            ModelConfig(model_dim=32, num_heads=2, num_kv_heads=1, plan=PlanSpec("vanilla", layers=2)),
            TrainConfig(
                seq_len=32,
                batch_tokens=256,
                max_steps=8,
                time_budget=None,
                warmdown_frac=0.25,
                val_every=4,
                val_max_tokens=2048,
                log_every=1,
                optim=OptimizerConfig(muon_momentum_warmup_steps=4),
            ),
        ),
        Preset(
            "baseline",
            "the official Parameter Golf baseline: 9 x 512, 8/4 heads, seq 1024, 524,288 tokens/step, 600 s (GPU); same as pg-vanilla",
            ModelConfig(),
            _pg_train(),
            eval_batch_size=32,
        ),
        *[p for scale in SCALES for p in _family(scale)],
        *_record_presets(),
    ]
}

DEFAULT_PRESET = "cpu"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    p = PRESETS[name]
    # Hand out copies so callers can override freely.
    return Preset(
        p.name,
        p.description,
        ModelConfig.from_dict(p.model.to_dict()),
        replace(p.train, optim=replace(p.train.optim)),
        p.eval_batch_size,
        p.export_quant,
        dict(p.eval_settings),
    )

"""The byte budget (``loopgolf budget``): a configuration's artifact size before training, and
the configurations of a preset family that fit a cap.

Prediction (:func:`predict_bytes`): the model is built on the meta device (no memory, no
training) to list its unique stored tensors; each gets the scheme the exporter would give it
under the quantization policy (``quantize.stored_scheme``) and a compressed size from the measured
rates in ``budget_calibration.json`` (regenerate with ``python scripts/quant_calibrate.py
--write``): rates of Gaussian rows, scaled for coded matrices by ``trained_factor`` (measured on
trained models) unless ``weights="init"`` asks for a freshly initialised model. The header is
built by the artifact writer itself on placeholder tensors and compressed, and the container's
fixed bytes are added exactly. The rates were measured with round-to-nearest codes: a policy
with GPTQ is predicted with them too, and its prediction is marked ``uncalibrated``.

Search (:func:`search`): for each preset of a family (and optional other layer/loop counts), the
widest width (a multiple of ``width_step``; the query/KV ratio kept from the preset, the head size
too unless ``head_dim`` is given)
whose predicted artifact, code bytes included, fits the cap. Candidates are ranked widest first,
then deepest (virtual layers), then most loops, and each carries the ``loopgolf run`` arguments
that build exactly it, its forward FLOPs per token, and the preset's tokens per step, from which
:func:`train_step_seconds` estimates a training step's time on a machine of a given matmul rate.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from loopgolf.export.artifact import CODECS, FLOAT_SCHEMES, QuantizedTensor, build_payload, compress, container_overhead, scheme_bits
from loopgolf.export.quantize import QuantPolicy, parse_policy, stored_scheme, tensor_role
from loopgolf.model.gpt import GPT, ModelConfig, effective_params, forward_flops_per_token, unique_params_formula
from loopgolf.model.plan import PlanSpec, build_plan, parse_plan

# The measured rates, written by ``python scripts/quant_calibrate.py --write`` (package data).
CALIBRATION_PATH = Path(__file__).with_name("budget_calibration.json")

# A run's meta in the artifact header (preset, seed, steps, seq_len) is unknown before training;
# this stand-in has the same keys and typical lengths.
_META_STANDIN = {"preset": "pg-shared-scales", "seed": 1337, "steps": 13780, "seq_len": 1024}


class PlanError(ValueError):
    """A planner request that cannot be answered (unknown family, nothing fits, ...)."""


@functools.cache
def calibration_table() -> dict:
    """The measured compression rates the planner predicts with (``budget_calibration.json``)."""
    return json.loads(CALIBRATION_PATH.read_text(encoding="utf-8"))


# Parts of a policy the measured rates do not cover, and what that means for a prediction.
# Where a candidate's step time comes from: a few real steps here (cached per device), or the
# matmul estimate (3 x forward FLOPs x tokens / a measured matmul rate).
STEP_TIME_SOURCES = ("measure", "estimate")
# A candidate whose estimated step is longer than this is not measured (three real steps of a
# Parameter Golf-scale model on a CPU take minutes): its estimate stands, marked as such.
MEASURE_LIMIT_SECONDS = 2.0

UNCALIBRATED: dict[str, str] = {
    "gptq": "GPTQ codes are predicted with round-to-nearest rates; GPTQ's compressed size was not measured",
    "sigma": "sigma clips are predicted with the percentile clip's rates (an overestimate: their codes are fewer); not measured",
    "lqer": "LQER (quantized low-rank factors, lqer_top) is predicted as float16 factors on every low-rank tensor; not measured",
    "layout": "layout=grouped is predicted as the plain layout (measured 0.5-3% smaller on one trained model, docs/export.md)",
}


def uncalibrated(policy: QuantPolicy) -> list[str]:
    """The keys of :data:`UNCALIBRATED` that apply to ``policy`` (empty: fully calibrated)."""
    keys = ["gptq"] if policy.gptq else []
    if policy.clip == "sigma":
        keys.append("sigma")
    if policy.lowrank_rank and (policy.quantized_lowrank or policy.lqer_top):
        keys.append("lqer")
    if policy.layout != "plain":
        keys.append("layout")
    return keys


def default_family() -> str:
    """The preset family that suits this machine: ``pg`` (Parameter Golf scale: seq 1024, 524,288
    tokens per step) with CUDA, ``cpu`` without; one pg step on a CPU takes minutes and GBs."""
    return "pg" if torch.cuda.is_available() else "cpu"


def train_step_seconds(forward_flops: float, tokens_per_step: int, flops_per_second: float) -> float:
    """Estimated seconds per training step: 3 x forward FLOPs (forward + backward) per token x
    tokens per step / the machine's matmul rate. A lower bound: elementwise work, the optimizer
    and data movement are left out, and real matmuls are smaller than the rate's."""
    if flops_per_second <= 0:
        raise PlanError(f"the matmul rate must be positive, got {flops_per_second}")
    return 3 * forward_flops * tokens_per_step / flops_per_second


def coded_rate(table: dict, codec: str, clip: str, bits: int, cols: int) -> float:
    """Bytes per element of an intN matrix with rows of ``cols`` (scales included), interpolated
    linearly in log2(cols) between measured row lengths (clamped at the ends)."""
    points = table["coded"][clip][str(bits)][codec]
    xs = [math.log2(c) for c, _ in points]
    x = math.log2(max(cols, 1))
    i = bisect.bisect_left(xs, x)
    if i == 0:
        return points[0][1]
    if i == len(xs):
        return points[-1][1]
    t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return points[i - 1][1] + t * (points[i][1] - points[i - 1][1])


WEIGHTS: tuple[str, ...] = ("trained", "init")


def trained_factor(table: dict, codec: str, clip: str, bits: int) -> float:
    """How much smaller trained matrices code than Gaussian rows (measured on trained models by
    ``scripts/quant_calibrate.py --trained``), for the nearest measured bit width; 1 if unmeasured."""
    by_bits = table.get("trained_factor", {}).get(codec, {}).get(clip, {})
    if not by_bits:
        return 1.0
    nearest = min(by_bits, key=lambda b: (abs(int(b) - bits), int(b)))
    return by_bits[nearest]


def _tensor_bytes(table: dict, codec: str, scheme: str, shape: tuple[int, ...], policy: QuantPolicy, role: str, weights: str) -> float:
    numel = math.prod(shape)
    if scheme in FLOAT_SCHEMES:
        return numel * table[scheme][codec]
    rows, cols = shape
    bits = scheme_bits(scheme)
    clip = policy.clip if policy.clip in table["coded"] else "percentile"  # unmeasured clips: see uncalibrated()
    rate = coded_rate(table, codec, clip, bits, cols)
    if weights == "trained":
        rate *= trained_factor(table, codec, clip, bits)
    n = numel * rate
    if policy.outlier_topk:
        k = min(policy.outlier_topk, numel)
        n += k * (table["float16"][codec] + table["int32_index"][codec])
    if policy.uses_lowrank(role):
        r = min(policy.lowrank_rank, rows, cols)
        n += r * (rows + cols) * table["float16"][codec]
    return n


def _placeholder(scheme: str, shape: tuple[int, ...], policy: QuantPolicy, role: str) -> QuantizedTensor:
    """Meta tensors of the stored dtypes and shapes (no memory), for laying out the real header."""

    def empty(size: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device="meta")

    bits = scheme_bits(scheme)
    if bits is None:
        return QuantizedTensor(scheme, shape, empty(shape, torch.float32 if scheme == "float32" else torch.float16), None, None)
    rows, cols = shape
    q = QuantizedTensor(scheme, shape, empty(shape, torch.int8), empty((rows,), torch.float16), bits)
    if policy.outlier_topk:
        k = min(policy.outlier_topk, rows * cols)
        q.outlier_idx, q.outlier_val = empty((k,), torch.int32), empty((k,), torch.float16)
    if policy.uses_lowrank(role):
        r = min(policy.lowrank_rank, rows, cols)
        q.lowrank_u, q.lowrank_v = empty((rows, r), torch.float16), empty((r, cols), torch.float16)
    return q


def _as_config(model_config: ModelConfig | dict) -> ModelConfig:
    return model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_dict(model_config)


def stored_tensors(model_config: ModelConfig | dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor an artifact of this configuration stores (meta-device build)."""
    with torch.device("meta"):
        model = GPT(_as_config(model_config))
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def predict_bytes(
    model_config: ModelConfig | dict,
    policy: QuantPolicy | None = None,
    codec: str = "auto",
    *,
    meta: dict | None = None,
    calibration: dict | None = None,
    weights: str = "trained",
) -> dict[str, Any]:
    """Predicted artifact (model file) bytes of a configuration under ``policy`` and ``codec``.

    The tensors' measured rates are summed and multiplied by the codec's ``export_factor`` (what
    whole exports measured against that sum: one stream of mixed tensors compresses a little
    differently from each tensor alone), then the compressed header and the container are
    added. ``weights="trained"`` (the default) predicts a trained model: coded matrices get the
    measured ``trained_factor`` (trained weights have heavier tails than Gaussian rows, so their
    codes concentrate and compress 3-6% better); ``"init"`` predicts Gaussian-like weights (a
    freshly initialised model). ``calibration`` replaces the stored table (the calibration script
    uses it).

    Returns ``{"model_bytes", "uncalibrated", "codec", "by_codec", "header_bytes",
    "unique_params", "tensors": [{"name", "role", "scheme", "shape", "predicted_bytes"}, ...]}``
    (``uncalibrated``: :func:`uncalibrated` of the policy, the parts the rates do not cover); with
    ``codec="auto"`` the codec with the smallest prediction is chosen, as the exporter would."""
    cfg = _as_config(model_config)
    table = calibration_table() if calibration is None else calibration
    policy = policy or QuantPolicy()
    if codec != "auto" and codec not in CODECS:
        raise PlanError(f"unknown codec {codec!r}; valid: auto, {', '.join(CODECS)}")
    if weights not in WEIGHTS:
        raise PlanError(f"unknown weights {weights!r}; valid: {', '.join(WEIGHTS)}")
    names = stored_tensors(cfg)
    rows, qstate = [], {}
    for name, shape in names:
        role = tensor_role(name)
        scheme = stored_scheme(name, shape, policy)
        rows.append({"name": name, "role": role, "scheme": scheme, "shape": list(shape)})
        qstate[name] = _placeholder(scheme, shape, policy, role)
    meta = {**_META_STANDIN, **(meta or {}), "quant": policy.to_dict()}
    header, _, _ = build_payload(cfg.to_dict(), [n for n, _ in names], qstate, {}, meta, header_only=True)
    by_codec: dict[str, int] = {}
    header_bytes: dict[str, int] = {}
    per_tensor: dict[str, list[float]] = {}
    for c in CODECS if codec == "auto" else (codec,):
        factor = table.get("export_factor", {}).get(c, 1.0)
        sizes = [factor * _tensor_bytes(table, c, r["scheme"], tuple(r["shape"]), policy, r["role"], weights) for r in rows]
        per_tensor[c] = sizes
        header_bytes[c] = len(compress(header, c))
        by_codec[c] = round(sum(sizes)) + header_bytes[c] + container_overhead(c)
    best = min(by_codec, key=lambda c: (by_codec[c], list(by_codec).index(c)))
    for r, n in zip(rows, per_tensor[best]):
        r["predicted_bytes"] = round(n)
    return {
        "model_bytes": by_codec[best],
        "uncalibrated": uncalibrated(policy),
        "codec": best,
        "by_codec": by_codec,
        "header_bytes": header_bytes[best],
        "unique_params": unique_params_formula(cfg),
        "tensors": rows,
    }


# --------------------------------------------------------------------------------- search


def family_presets(family: str | list[str]) -> list[str]:
    """Preset names of a family: "cpu" / "pg" (the presets named cpu-* / pg-*), "all", a preset
    name, a comma-separated list, or a list of names. A family prefix wins over the preset of the
    same name ("cpu" is the cpu-* family, not just the default preset; ``["cpu"]`` is that preset)."""
    from loopgolf.config import PRESETS, SCALES

    if isinstance(family, str):
        if family == "all":
            return list(PRESETS)
        if family in PRESETS and family not in {s.prefix for s in SCALES}:
            return [family]
        names = [p for p in PRESETS if p.startswith(f"{family}-")]
        if names:
            return names
        family = [f.strip() for f in family.split(",") if f.strip()]
    unknown = [f for f in family if f not in PRESETS]
    if unknown or not family:
        prefixes = sorted({p.split("-")[0] for p in PRESETS if "-" in p})
        raise PlanError(f"unknown preset family {family!r}: use a prefix ({', '.join(prefixes)}), 'all', or preset names")
    return list(family)


def plan_to_cli(spec: PlanSpec) -> str | None:
    """The ``--plan`` text that parses back to ``spec``, or None when the syntax cannot say it."""
    share = "" if spec.share == "block" else f"@{spec.share}"
    k = spec.kind
    if k == "vanilla":
        text = f"vanilla:{spec.layers}"
    elif k in ("cycle", "sequence", "cycle-rev"):
        text = f"{k}:{spec.layers}x{spec.loops}{share}"
    elif k in ("middle-cycle", "middle-sequence"):
        text = f"{k}:{spec.first}+{spec.layers}x{spec.loops}+{spec.last}{share}"
    elif k == "mini-loop":
        text = f"mini-loop:{spec.layers}:{spec.loop_start}-{spec.loop_end}x{spec.loops}{share}"
    elif k == "explicit" and spec.attn_of is not None and spec.mlp_of is not None:
        text = f"explicit:{','.join(map(str, spec.attn_of))}/{','.join(map(str, spec.mlp_of))}"
    else:
        return None
    try:
        return text if parse_plan(text) == spec else None
    except ValueError:
        return None


_FLAGS = {"model_dim": "--dim", "num_heads": "--heads", "num_kv_heads": "--kv-heads", "mlp_mult": "--mlp-mult"}


def run_overrides(preset_model: ModelConfig, cfg: ModelConfig) -> list[str]:
    """``loopgolf run`` arguments that turn the preset's model config into ``cfg`` exactly."""
    base, want = preset_model.to_dict(), cfg.to_dict()
    args: list[str] = []
    for key, value in want.items():
        if base.get(key) == value:
            continue
        if key in _FLAGS:
            args += [_FLAGS[key], str(value)]
        elif key == "plan" and plan_to_cli(cfg.plan) is not None:
            args += ["--plan", plan_to_cli(cfg.plan)]
        elif key == "per_layer_controls" and value is True:
            args += ["--per-layer-controls"]
        else:
            args += ["--model", f"{key}={json.dumps(value, separators=(',', ':'))}"]
    return args


def stages_for(train: Any, plan: Any) -> tuple[Any, list[str]]:
    """The preset's training config for a plan of another loop count, and the ``loopgolf run``
    arguments that make it: progressive recurrence needs one start per extra pass, so a preset
    that grows its depth during training switches every extra pass of the new plan on at its
    first start (as the Parameter Golf record does: layers 3-5 run 3 times from 35%); a plan
    without loops trains at full depth."""
    stages = train.recurrence_stages
    want = [] if plan.num_loops == 1 else [stages[0]] * (plan.num_loops - 1) if stages else []
    if want == list(stages):
        return train, []
    return replace(train, recurrence_stages=want), ["--train", f"recurrence_stages={json.dumps(want, separators=(',', ':'))}"]


def _with_width(cfg: ModelConfig, width: int, head_dim: int, kv_ratio: int) -> ModelConfig | None:
    heads = width // head_dim
    if heads < 1 or width % head_dim or heads % kv_ratio:
        return None
    try:
        return ModelConfig.from_dict({**cfg.to_dict(), "model_dim": width, "num_heads": heads, "num_kv_heads": heads // kv_ratio})
    except ValueError:
        return None


def _plan_variants(spec: PlanSpec, layers: list[int] | None, loops: list[int] | None) -> list[PlanSpec]:
    out = []
    for n_layers in layers or [spec.layers]:
        for n_loops in loops or [spec.loops]:
            if spec.kind == "vanilla" and n_loops != 1:
                continue
            if spec.kind == "explicit" and (n_layers, n_loops) != (spec.layers, spec.loops):
                continue
            v = replace(spec, layers=n_layers, loops=n_loops)
            try:
                build_plan(v)
            except ValueError:
                continue
            if v not in out:
                out.append(v)
    return out


def search(
    cap_bytes: int,
    preset_family: str | list[str],
    policy: QuantPolicy | None = None,
    *,
    codec: str = "auto",
    code_bytes: int,
    overrides: dict[str, Any] | None = None,
    layers: list[int] | None = None,
    loops: list[int] | None = None,
    width_step: int | None = None,
    head_dim: int | None = None,
    max_width: int = 8192,
    weights: str = "trained",
    keep_configs: bool = False,
) -> list[dict[str, Any]]:
    """Configurations of ``preset_family`` that fit ``cap_bytes`` (model + code bytes), best first.

    For each preset (with ``overrides`` applied, e.g. ``{"per_layer_controls": True}``) and each
    plan variant (``layers`` / ``loops`` replace the plan's unique-layer and loop counts; default:
    the preset's own), the widest width that fits (heads of ``head_dim``, default the preset's). ``code_bytes``: the code counted beside the
    model (a run counts its generated ``train_gpt.py``, :mod:`loopgolf.codebytes`). Each candidate: ``{"preset", "overrides", "predicted_bytes" (model + code),
    "predicted_model_bytes", "code_bytes", "cap_bytes", "headroom_bytes", "codec", "quant",
    "model_dim", "num_heads", "num_kv_heads", "plan", "virtual_layers", "loops",
    "unique_params", "effective_params", "uncalibrated", "seq_len", "tokens_per_step",
    "forward_flops_per_token"}`` (and with ``keep_configs`` the built ``_configs``: its
    ModelConfig and the preset's TrainConfig). ``weights`` as in :func:`predict_bytes`."""
    from loopgolf.config import get_preset

    policy = policy or QuantPolicy()
    budget = cap_bytes - code_bytes
    if budget <= 0:
        raise PlanError(f"the cap of {cap_bytes:,} bytes leaves nothing for the model after {code_bytes:,} bytes of code")
    candidates = []
    for name in family_presets(preset_family):
        preset = get_preset(name)
        base = ModelConfig.from_dict({**preset.model.to_dict(), **(overrides or {})})
        kv_ratio = base.num_heads // base.num_kv_heads
        head = head_dim or base.head_dim
        step = width_step or head * kv_ratio
        for spec in _plan_variants(base.plan, layers, loops):
            cfg0 = ModelConfig.from_dict({**base.to_dict(), "plan": spec.to_dict()})
            best = _widest_fitting(cfg0, budget, policy, codec, step, head, kv_ratio, max_width, weights)
            if best is None:
                continue
            cfg, pred = best
            plan = build_plan(cfg.plan)
            with torch.device("meta"):
                n_eff = effective_params(GPT(cfg))
            train, train_args = stages_for(preset.train, plan)
            candidates.append(
                {
                    "preset": name,
                    "overrides": run_overrides(preset.model, cfg) + train_args,
                    "predicted_bytes": pred["model_bytes"] + code_bytes,
                    "predicted_model_bytes": pred["model_bytes"],
                    "code_bytes": code_bytes,
                    "cap_bytes": cap_bytes,
                    "headroom_bytes": cap_bytes - pred["model_bytes"] - code_bytes,
                    "codec": pred["codec"],
                    "quant": policy.describe(),
                    "model_dim": cfg.model_dim,
                    "num_heads": cfg.num_heads,
                    "num_kv_heads": cfg.num_kv_heads,
                    "plan": plan_to_cli(cfg.plan) or cfg.plan.to_dict(),
                    "virtual_layers": plan.num_virtual,
                    "loops": plan.num_loops,
                    "unique_params": pred["unique_params"],
                    "effective_params": n_eff,
                    "uncalibrated": pred["uncalibrated"],
                    "seq_len": preset.train.seq_len,
                    "tokens_per_step": preset.train.batch_tokens,
                    "forward_flops_per_token": forward_flops_per_token(cfg, preset.train.seq_len),
                }
            )
            if keep_configs:  # for measuring its step time; not part of the report
                candidates[-1]["_configs"] = (cfg, train)
    candidates.sort(key=lambda c: (-c["model_dim"], -c["virtual_layers"], -c["loops"], -c["predicted_bytes"], c["preset"]))
    return candidates


def _widest_fitting(
    cfg: ModelConfig,
    budget: int,
    policy: QuantPolicy,
    codec: str,
    step: int,
    head_dim: int,
    kv_ratio: int,
    max_width: int,
    weights: str = "trained",
) -> tuple[ModelConfig, dict] | None:
    """The widest width within ``budget`` (bytes grow with width): doubling steps from the
    narrowest until one is over, then bisection, so huge widths are never built."""
    widths = [w for w in range(step, max_width + 1, step) if _with_width(cfg, w, head_dim, kv_ratio) is not None]
    cache: dict[int, tuple[ModelConfig, dict]] = {}

    def fits(i: int) -> bool:
        if i not in cache:
            c = _with_width(cfg, widths[i], head_dim, kv_ratio)
            cache[i] = (c, predict_bytes(c, policy, codec, weights=weights))
        return cache[i][1]["model_bytes"] <= budget

    if not widths or not fits(0):
        return None
    lo, probe = 0, 1  # invariant: widths[lo] fits
    while probe < len(widths) and fits(probe):
        lo, probe = probe, 2 * probe + 1
    hi = min(probe, len(widths)) - 1  # widths[probe] is over (or past the end)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return cache[lo]


# ------------------------------------------------------------------------------ the report


def measure_matmul_rate() -> tuple[float, str]:
    """(FLOP/s, what was measured) of a short matmul benchmark on this machine's training device:
    1024 x 1024 float32 matmuls on CPU (well under a second), the bench's bf16 size on CUDA."""
    from loopgolf import device as devices

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = devices.matmul_peak(dev, size=None if dev.type == "cuda" else 1024, reps=2, trials=3)
    return peak.flops, f"{peak.size} x {peak.size} {peak.dtype} matmuls on {dev.type}"


def script_code_bytes(preset: str, code_form: str = "plain") -> int:
    """The bytes of the train_gpt.py a default run of ``preset`` generates in ``code_form``
    (what the run counts)."""
    from dataclasses import replace

    from loopgolf.codebytes import code_counts
    from loopgolf.config import RunConfig, get_preset

    config = RunConfig.from_preset(get_preset(preset))
    config = replace(config, export=replace(config.export, code_form=code_form))
    return code_counts(config).code_bytes


def _dedupe(candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row once: layer/loop variants can land on the preset's own plan, which would list
    byte-identical rows (the same command, the same prediction)."""
    seen, out = set(), []
    for c in candidates:
        key = json.dumps({k: v for k, v in c.items() if k != "_configs"}, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def budget_report(
    cap: int,
    *,
    preset: str | None,
    family: str | None,
    policy: QuantPolicy | list[QuantPolicy],
    codec: str,
    weights: str,
    code_bytes: int | None,
    overrides: dict[str, Any],
    code_form: str = "plain",
    layers: list[int] | None = None,
    loops: list[int] | None = None,
    width_step: int | None = None,
    head_dim: int | None = None,
    top: int = 10,
    matmul_flops: float | None = None,
    step_time: str | None = None,
    time_budget: float | None = None,
    steps_budget: int | None = None,
    flops_budget: float | None = None,
    progress: bool = False,
    fit: Any = None,
) -> dict[str, Any]:
    """What ``loopgolf budget`` prints: ``preset``'s predicted bytes (with ``overrides``), and the
    widest configurations of ``family`` (default: ``preset``, else the family that suits this
    machine) fitting ``cap``, each with its forward FLOPs per token and an estimated step time.

    ``policy`` may be a list: the search runs for each policy and lists them together. ``fit``
    is one loss fit for every policy, or ``{policy.describe(): fit}`` (a policy without one gets
    no prediction: a fit is made on runs of one policy)."""
    from loopgolf.config import get_preset

    given = [(k, v) for k, v in (("seconds", time_budget), ("steps", steps_budget), ("flops", flops_budget)) if v is not None]
    if len(given) > 1:
        raise PlanError("give one training budget: --time, --steps or --flops")
    budget_kind = given[0][0] if given else None
    if steps_budget is not None and (isinstance(steps_budget, bool) or not isinstance(steps_budget, int) or steps_budget < 1):
        raise PlanError(f"--steps must be a positive whole number of steps, got {steps_budget!r}")
    if flops_budget is not None and (
        isinstance(flops_budget, bool) or not (isinstance(flops_budget, (int, float)) and math.isfinite(flops_budget) and flops_budget > 0)
    ):
        raise PlanError(f"--flops must be a positive number of training FLOPs, got {flops_budget!r}")
    if time_budget is not None and not (math.isfinite(time_budget) and time_budget > 0):
        raise PlanError(f"--time must be a positive number of seconds, got {time_budget!r}")
    policies = policy if isinstance(policy, list) else [policy]
    if not policies:
        raise PlanError("no quantization policy to plan for")
    policy = policies[0]  # the one --preset's own prediction uses
    fits: dict[str, Any] = fit if isinstance(fit, dict) else ({p.describe(): fit for p in policies} if fit is not None else {})
    fam = family or ([preset] if preset else default_family())  # a list: that preset, not its family
    n_code = script_code_bytes(preset or family_presets(fam)[0], code_form) if code_bytes is None else code_bytes
    out: dict[str, Any] = {
        "cap_bytes": cap,
        "code_bytes": n_code,
        "code_form": None if code_bytes is not None else code_form,
        "quant": " | ".join(p.describe() for p in policies),
    }
    if preset:
        base = get_preset(preset)
        cfg = ModelConfig.from_dict({**base.model.to_dict(), **overrides})
        pred = predict_bytes(cfg, policy, codec, weights=weights)
        total = pred["model_bytes"] + n_code
        out["config"] = {
            "preset": preset,
            "overrides": run_overrides(base.model, cfg),
            "predicted_bytes": total,
            "predicted_model_bytes": pred["model_bytes"],
            "codec": pred["codec"],
            "by_codec": pred["by_codec"],
            "fits": total <= cap,
            "headroom_bytes": cap - total,
            "unique_params": pred["unique_params"],
            "uncalibrated": pred["uncalibrated"],
            "tensors": pred["tensors"],
        }
    search_overrides = {k: v for k, v in overrides.items() if k not in ("model_dim", "num_heads", "num_kv_heads")}
    candidates = _dedupe(
        [
            c
            for pol in policies
            for c in search(
                cap,
                fam,
                pol,
                codec=codec,
                code_bytes=n_code,
                overrides=search_overrides,
                layers=layers,
                loops=loops,
                width_step=width_step,
                head_dim=head_dim,
                weights=weights,
                keep_configs=True,
            )
        ]
    )
    # With a loss fit and a training budget the ranking is by predicted val_bpb, so every
    # candidate is timed and predicted before the top are kept; otherwise the widest first.
    ranked = bool(fits) and budget_kind is not None
    if not ranked:
        candidates = candidates[:top]
    rate, measured = (matmul_flops, "given by --matmul-flops") if matmul_flops else measure_matmul_rate()
    # Step times: measured here by default (cached per device), or the matmul estimate when asked
    # (or when a matmul rate is given, which only the estimate uses).
    step_time = step_time or ("estimate" if matmul_flops else "measure")
    if step_time not in STEP_TIME_SOURCES:
        raise PlanError(f"unknown step time source {step_time!r}; valid: {', '.join(STEP_TIME_SOURCES)}")
    bar = None
    if step_time == "measure" and candidates and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(candidates), desc="timing steps", unit="candidate", leave=False)
    for c in candidates:
        model_cfg, train_cfg = c.pop("_configs")
        c["est_step_seconds"] = train_step_seconds(c["forward_flops_per_token"], c["tokens_per_step"], rate)
        if step_time == "measure" and c["est_step_seconds"] <= MEASURE_LIMIT_SECONDS:
            from loopgolf.train.steptime import step_time as measured_step_time

            st = measured_step_time(model_cfg, train_cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
            c["step_seconds"], c["step_stage_seconds"], c["step_time"] = st.mean_seconds(), st.stage_seconds, "cached" if st.cached else "measured"
            if budget_kind == "seconds":
                c["steps_in_budget"] = st.steps_in(time_budget)
            if bar is not None:
                bar.update(1)
        else:
            if bar is not None:
                bar.update(1)
            c["step_seconds"], c["step_time"] = c["est_step_seconds"], "estimate"
            if budget_kind == "seconds":
                c["steps_in_budget"] = int(time_budget / c["est_step_seconds"])
        if budget_kind == "steps":
            c["steps_in_budget"] = steps_budget
        elif budget_kind == "flops":  # training FLOPs as ledgers count them: 3 x forward FLOPs/token x tokens
            c["steps_in_budget"] = int(flops_budget // (3.0 * c["forward_flops_per_token"] * c["tokens_per_step"]))
        if budget_kind is not None:
            if (
                budget_kind == "seconds" and train_cfg.time_budget is not None and train_cfg.max_steps is not None
            ):  # `run --time` keeps such a preset's step cap
                c["steps_in_budget"] = min(c["steps_in_budget"], train_cfg.max_steps)
            c["tokens_in_budget"] = c["steps_in_budget"] * c["tokens_per_step"]
            own_fit = fits.get(c["quant"])  # each policy's candidates by that policy's fit
            if fits and (own_fit is None or c["tokens_in_budget"] < 1):
                c["predicted_bpb"], c["predicted_bpb_interval"] = None, None
            elif own_fit is not None:
                pred = own_fit.predict(c["unique_params"], c["effective_params"], c["tokens_in_budget"], c["virtual_layers"])
                c["predicted_bpb"], c["predicted_bpb_interval"] = pred, [pred - own_fit.loo_mae, pred + own_fit.loo_mae]
                c["extrapolated"] = own_fit.outside(c["unique_params"], c["tokens_in_budget"])
                c["epochs"] = own_fit.epochs(c["tokens_in_budget"])  # passes over the fit's dataset (None: its size unknown)
    if bar is not None:
        bar.close()
    if ranked:
        candidates = sorted(candidates, key=lambda c: (c["predicted_bpb"] is None, c["predicted_bpb"] or 0.0))[:top]
    out["family"] = fam if isinstance(fam, str) else ",".join(fam)
    out["matmul_flops"] = {"flops_per_second": rate, "measured": measured}
    out["step_time"] = step_time
    out["time_budget"] = time_budget
    out["train_budget"] = None if budget_kind is None else {"kind": budget_kind, "amount": given[0][1]}
    summaries = {q: {"dataset": f.dataset, "quant": f.quant, "runs": len(f.runs), "loo_mae": f.loo_mae, "params": f.params} for q, f in fits.items()}
    out["fit"] = next(iter(summaries.values()), None)  # the first policy's (one policy: the fit)
    out["fits"] = summaries
    warnings = [
        f"the loss fit was made on runs with quant {f.quant or 'int8'!r}; this plan asks for {q}"
        for q, f in fits.items()
        if parse_policy(f.quant).describe() != q
    ]
    if warnings:
        out["fit_warning"] = "; ".join(warnings)
    out["candidates"] = candidates
    return out


_DEFAULT_QUANT = QuantPolicy().describe()


def fit_file(dataset: str, quant: str = "") -> Path:
    """The loss fit file of ``dataset``'s runs exported with ``quant`` (any spelling of a policy:
    "int6" and "embed=8,attn=6,mlp=6,lora=6" are one file; the int8 default keeps the plain name)."""
    from loopgolf.lossmodel import fit_path

    policy = parse_policy(quant).describe()
    return fit_path(dataset, None if policy == _DEFAULT_QUANT else policy)


def _budget_text(budget: dict[str, Any]) -> str:
    kind, amount = budget["kind"], budget["amount"]
    return {"seconds": f"{amount:g} s", "steps": f"{amount:,} steps", "flops": f"{amount:.3g} training FLOPs"}[kind]


def format_budget_report(out: dict[str, Any]) -> str:
    lines = []
    cap, n_code, candidates = out["cap_bytes"], out["code_bytes"], out["candidates"]
    form_flag = f" --code-form {out['code_form']}" if out.get("code_form") not in (None, "plain") else ""
    code_note = f" code ({out['code_form']})" if out.get("code_form") not in (None, "plain") else " code"
    notes = {key for c in [*candidates, out.get("config", {})] for key in c.get("uncalibrated", [])}
    if "config" in out:
        c = out["config"]
        verdict = f"fits, {c['headroom_bytes']:,} to spare" if c["fits"] else f"OVER by {-c['headroom_bytes']:,}"
        mark = " (uncalibrated)" if c["uncalibrated"] else ""
        lines.append(f"{c['preset']} {' '.join(c['overrides'])}".rstrip())
        lines.append(
            f"  predicted{mark} {c['predicted_model_bytes']:,} model ({c['codec']}) + {n_code:,}{code_note} = {c['predicted_bytes']:,} of {cap:,}: {verdict}"
        )
    budget = out.get("train_budget")
    ranked = out.get("fit") is not None and budget is not None
    order = f"best predicted val_bpb in {_budget_text(budget)} first" if ranked else "widest, deepest, most loops first"
    lines.append(f"candidates of family {out['family']} fitting {cap:,} bytes with quant {out['quant']} ({order}):")
    if not candidates:
        lines.append("  none: lower the bits, or raise the cap")
    else:
        step_head = "step s" if out.get("step_time") == "measure" else "~step s"
        steps_head = f"  {'steps':>7}" if budget is not None else ""
        steps_head += f"  {'val_bpb (+-)':>15}" if ranked else ""
        lines.append(f"  {'bytes':>12}  {'d':<5} {'V':<3} {'loops':<5} {'unique':>11}  {'fwd FLOPs/tok':>13}  {step_head:>8}{steps_head}  command")
    for c in candidates:
        mark = "*" if c["uncalibrated"] else " "
        steps = f"  {c['steps_in_budget']:>7,}" if "steps_in_budget" in c else ""
        if ranked:
            pred = c.get("predicted_bpb")
            far = "!" if c.get("extrapolated") else " "
            steps += f"  {pred:>7.4f}{far}+-{out['fits'][c['quant']]['loo_mae']:.3f}" if pred is not None else f"  {'-':>15}"  # its policy's fit
        run_flags = "" if c["quant"] == _DEFAULT_QUANT else f" --quant {shlex.quote(c['quant'])}"  # the run exports as planned
        if budget is not None:  # the run that trains what the row predicts: the same wallclock, or its steps
            run_flags += f" --time {budget['amount']:g}" if budget["kind"] == "seconds" else f" --steps {c['steps_in_budget']} --train time_budget=null"
        command = f"loopgolf run --preset {c['preset']} {' '.join(c['overrides'])}".rstrip() + form_flag + run_flags
        if c.get("steps_in_budget") == 0:  # `run` refuses --steps 0, and a run of no step predicts nothing
            command = f"(the budget buys no step of this model: {_budget_text(budget)})"
        lines.append(
            f"  {c['predicted_bytes']:>11,}{mark}  {c['model_dim']:<5} {c['virtual_layers']:<3} {c['loops']:<5} {c['unique_params']:>11,}  "
            f"{c['forward_flops_per_token']:>13.3g}  {c['step_seconds']:>8.3g}{steps}  {command}"
        )
    if candidates and out.get("step_time") == "measure":
        lines.append(
            "  step s: measured here, a few real training steps on synthetic tokens (each progressive-recurrence stage at its own "
            "depth, weighted by its share of the budget); cached per device under the loopgolf cache"
        )
        slow = [c for c in candidates if c["step_time"] == "estimate"]
        if slow:
            lines.append(
                f"  {len(slow)} candidate(s) estimated at over {MEASURE_LIMIT_SECONDS:g} s per step were not measured: their step s is "
                "the matmul estimate (a lower bound)"
            )
    elif candidates:
        rate, measured = out["matmul_flops"]["flops_per_second"], out["matmul_flops"]["measured"]
        lines.append(
            f"  ~step s: an estimate of one training step here, 3 x forward FLOPs/token x tokens/step / {rate / 1e9:,.1f} GFLOP/s "
            f"({measured}); real steps are slower (elementwise work, optimizer, data)"
        )
    if candidates and budget is not None:
        lines.append(
            f"  steps: optimizer steps each candidate gets in {_budget_text(budget)}" + (" of training on this machine" if budget["kind"] == "seconds" else "")
        )
        if ranked:
            f = out["fit"]
            lines.append(
                f"  val_bpb: roundtrip val_bpb predicted by the loss fit of {f['dataset']} ({f['runs']} runs); +- its mean error on runs left out of the fit"
            )
            far = [c for c in candidates if c.get("extrapolated")]
            if far:
                lines.append(
                    f"  ! {len(far)} prediction(s) outside the runs the fit saw ({far[0]['extrapolated'][0]}{', ...' if len(far) > 1 else ''}): "
                    "the error does not hold there and can be far larger; add calibration runs of that size and length"
                )
        elif out.get("fit_missing"):
            lines.append(f"  no val_bpb prediction: {out['fit_missing']}")
    if out.get("fit_warning"):
        lines.append(f"  warning: {out['fit_warning']}")
    lines += [f"  * uncalibrated: {UNCALIBRATED[key]}" for key in sorted(notes)]
    return "\n".join(lines)

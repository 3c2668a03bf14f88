"""`loopgolf run`: data -> train -> export -> roundtrip eval -> summary (and `loopgolf train`:
data -> train -> checkpoint).

Every run directory holds ``config.json`` (model + run config), ``log.jsonl`` (starting with
versions, config and hardware), the artifact and ``summary.json`` (the contract in DESIGN.md),
and ``checkpoint.pt`` when checkpoints were asked for. ``resume`` continues a run directory
from its checkpoint with the configuration stored in its ``config.json``.

Under torchrun every rank executes :func:`run`; rank 0 alone writes files and prints, and only
rank 0 exports and evaluates after training.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

import loopgolf
from loopgolf.config import Preset, get_preset
from loopgolf.train.config import TrainConfig, train_config_from_dict
from loopgolf.data.dataset import Dataset
from loopgolf.data.shards import TokenLoader, read_shard_header
from loopgolf.device import resolve_device
from loopgolf.evaluate import EvalResult, evaluate_bpb
from loopgolf.export.artifact import CODECS
from loopgolf.export.pack import DEFAULT_CAP_BYTES, CapReport, export_model, load_model
from loopgolf.export.quantize import QuantPolicy, parse_policy
from loopgolf.train.qat import QAT, QATConfig
from loopgolf.model.gpt import GPT, ModelConfig, effective_params, unique_params
from loopgolf.train.checkpoint import CHECKPOINT_NAME, CheckpointPolicy, check_resumable, read_checkpoint
from loopgolf.train.distributed import DistContext, barrier, broadcast_object, init_distributed, shutdown_distributed
from loopgolf.train.trainer import TrainResult, train
from loopgolf.util import append_jsonl, atomic_write_json

ARTIFACT_NAME = "artifact.lgz"


@dataclass
class RunOptions:
    preset: str = "cpu"
    data: Path | None = None  # None = the embedded default corpus
    out: Path | None = None  # None = runs/<preset>-<timestamp>
    cap_bytes: int = DEFAULT_CAP_BYTES
    seed: int | None = None
    time_budget: float | None = None
    max_steps: int | None = None
    codec: str = "auto"
    quant: str = ""  # quantization policy (loopgolf.export.quantize.parse_policy syntax); "" = int8 baseline
    qat: str = "off"  # loop-aware QAT over the end of training: off | ste | noise
    qat_start: float = 0.85  # fraction of the budget after which QAT is on
    stride: int | None = None  # sliding-window eval stride for the final scores
    device: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    force: bool = False
    checkpoint_every: int | None = None  # steps between checkpoints; None: 0 (none), or the resumed run's setting
    resume: Path | None = None  # run directory to continue from its checkpoint
    train_only: bool = False  # `loopgolf train`: stop after training and the final checkpoint
    verify_data: bool = True  # check the shards against the dataset's manifest (sizes, sha256) before training
    init_from: Path | None = None  # start from this model (a `loopgolf convert` directory, run directory, artifact or HF directory)
    distill_from: Path | None = None  # teacher for forward-KL distillation (any source `loopgolf convert` reads)
    distill_weight: float = 0.5  # loss = (1 - w) CE + w T^2 KL(teacher || student)
    distill_temp: float = 1.0
    exit_loss_weight: float = 0.0  # weight of the intermediate-loop (early-exit) losses
    tokenizer: Path | None = None  # None: found from the data directory (manifest, *.model, or the official layout)
    # Set by a generated train_gpt.py: (its own size, its code id) instead of measuring loopgolf's
    # files, and no xz reference baseline (its code is not part of the script).
    code: tuple[int, str] | None = None
    xz_baseline: bool = True

    def __post_init__(self) -> None:
        # Everything that can be checked before training is checked here, so a typo does not
        # cost a whole training budget before export fails on it.
        if self.checkpoint_every is not None and self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 steps, got {self.checkpoint_every}")
        if self.codec not in ("auto", *CODECS):
            raise ValueError(f"unknown codec {self.codec!r}; valid: auto, {', '.join(CODECS)}")
        parse_policy(self.quant)
        if self.qat not in ("off", "ste", "noise"):
            raise ValueError(f"unknown QAT mode {self.qat!r}; valid: off, ste, noise")
        if not 0.0 <= self.qat_start <= 1.0:  # also refuses NaN
            raise ValueError(f"qat_start must be a fraction of the budget in [0, 1], got {self.qat_start}")
        if isinstance(self.cap_bytes, bool) or not isinstance(self.cap_bytes, int) or self.cap_bytes < 1:
            raise ValueError(f"the byte cap must be a positive integer, got {self.cap_bytes!r}")
        if self.time_budget is not None and not (math.isfinite(self.time_budget) and self.time_budget > 0):
            raise ValueError(f"--time must be a positive, finite number of seconds, got {self.time_budget}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"--distill-weight must be in [0, 1], got {self.distill_weight}")
        if not (math.isfinite(self.distill_temp) and self.distill_temp > 0):
            raise ValueError(f"--distill-temp must be a positive, finite number, got {self.distill_temp}")
        if not (math.isfinite(self.exit_loss_weight) and self.exit_loss_weight >= 0):
            raise ValueError(f"--exit-loss-weight must be a finite number >= 0, got {self.exit_loss_weight}")
        if self.qat != "off" and (self.distill_from is not None or self.exit_loss_weight > 0):
            raise ValueError("QAT cannot be combined with distillation or exit losses yet: uptrain first, then run QAT on the result")
        if self.init_from is not None and self.model_overrides:
            raise ValueError(f"--init-from takes the model from {self.init_from}; model overrides ({', '.join(sorted(self.model_overrides))}) cannot change it")


def environment() -> dict[str, Any]:
    env = {
        "loopgolf": loopgolf.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
    return env


def resolve_data(opts: RunOptions, vocab_size: int) -> tuple[Path, str]:
    if opts.data is not None:
        return Path(opts.data), str(opts.data)
    from loopgolf.data.default_corpus import DEFAULT_CORPUS_NAME, ensure_default_dataset

    return ensure_default_dataset(vocab_size=vocab_size, progress=opts.progress), f"embedded:{DEFAULT_CORPUS_NAME}"


def budget_changes(train: dict[str, Any], time_budget: float | None, max_steps: int | None) -> dict[str, Any]:
    """The training-config changes that ``--time`` / ``--steps`` make to ``train`` (a TrainConfig
    as a dict). ``--steps N`` sets the step budget. ``--time S`` sets the wallclock budget, and on
    a configuration that stops on steps alone (the default ``cpu`` preset) it replaces that stop,
    so ``--time 600`` trains for 600 s rather than stopping at the preset's step count; where the
    configuration already has a wallclock budget (the ``pg`` presets: 20,000 steps or 600 s) its
    step cap stays. Both together: whichever comes first."""
    changes: dict[str, Any] = {}
    if time_budget is not None:
        changes["time_budget"] = time_budget
        if max_steps is None and train.get("time_budget") is None:
            changes["max_steps"] = None
    if max_steps is not None:
        changes["max_steps"] = max_steps
    return changes


def describe_budget(cfg: TrainConfig) -> str:
    """``250 steps``, ``600 s`` or ``600 s or 20,000 steps (whichever comes first)``."""
    parts = ([f"{cfg.time_budget:g} s"] if cfg.time_budget is not None else []) + ([f"{cfg.max_steps:,} steps"] if cfg.max_steps is not None else [])
    return " or ".join(parts) + (" (whichever comes first)" if len(parts) == 2 else "")


def build_configs(opts: RunOptions) -> Preset:
    preset = get_preset(opts.preset)
    model_cfg = ModelConfig.from_dict({**preset.model.to_dict(), **opts.model_overrides})
    train_kw = {**asdict(preset.train), **opts.train_overrides}
    if opts.seed is not None:
        train_kw["seed"] = opts.seed
    train_kw.update(budget_changes(train_kw, opts.time_budget, opts.max_steps))
    if opts.device is not None:
        train_kw["device"] = opts.device
    train_cfg = train_config_from_dict(train_kw)
    return Preset(preset.name, preset.description, model_cfg, train_cfg, preset.eval_batch_size)


def score(model: torch.nn.Module, ds: Dataset, tokens: np.ndarray, seq_len: int, device: torch.device, *, stride: int | None, batch_size: int, progress: bool) -> EvalResult:
    return evaluate_bpb(model, tokens, ds.tables, seq_len, stride=stride, batch_size=batch_size, device=device, progress=progress)


@dataclass
class RunSetup:
    """A run with its configuration fixed: what training and the finish need."""

    preset: Preset  # model and train configs as this run uses them
    config: dict[str, Any]  # what config.json holds
    out: Path
    data_dir: Path
    data_name: str
    ds: Dataset
    device: torch.device
    dist: DistContext
    resume: dict[str, Any] | None  # the checkpoint to continue from


# The keys of config.json (see fresh_config); a resumed run refuses a file with others or fewer.
CONFIG_KEYS = frozenset({"preset", "model", "train", "cap_bytes", "codec", "quant", "eval_stride", "data", "data_dir"})
OPTIONAL_CONFIG_KEYS = frozenset({"qat", "eval_batch_size", "checkpoint_every", "uptrain"})  # written since 0.1, read with defaults


def fresh_config(opts: RunOptions) -> tuple[Preset, dict[str, Any]]:
    preset = build_configs(opts)
    if opts.init_from is not None:
        from loopgolf.sources.load import load_source

        preset.model = load_source(opts.init_from).config  # checked here, before any data is touched
    config = {
        "preset": preset.name, "model": preset.model.to_dict(), "train": asdict(preset.train), "cap_bytes": opts.cap_bytes,
        "codec": opts.codec, "quant": opts.quant, "qat": {"mode": opts.qat, "start_frac": opts.qat_start}, "eval_stride": opts.stride, "eval_batch_size": preset.eval_batch_size,
        "checkpoint_every": opts.checkpoint_every or 0,
    }
    if opts.init_from is not None or opts.distill_from is not None or opts.exit_loss_weight > 0:
        config["uptrain"] = {
            "init_from": None if opts.init_from is None else str(opts.init_from),
            "distill_from": None if opts.distill_from is None else str(opts.distill_from),
            "distill_weight": opts.distill_weight if opts.distill_from is not None else 0.0,
            "distill_temp": opts.distill_temp,
            "exit_loss_weight": opts.exit_loss_weight,
        }
    return preset, config


def _resumed_config(opts: RunOptions) -> tuple[Preset, dict[str, Any]]:
    """The stored configuration of the run in ``opts.resume``, with the changes a resume may make:
    the budget (to train longer), the device, the data location and the checkpoint interval."""
    run_dir = Path(opts.resume)
    path = run_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{run_dir} has no config.json: --resume takes a run directory written by `loopgolf run` or `loopgolf train`")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    missing, unknown = sorted(CONFIG_KEYS - set(config)), sorted(set(config) - CONFIG_KEYS - OPTIONAL_CONFIG_KEYS)
    if missing or unknown:
        raise ValueError(f"{path} is not a run config written by loopgolf: missing keys {missing}, unknown keys {unknown}")
    try:
        train_kw = dict(config["train"])
        train_kw.update(budget_changes(train_kw, opts.time_budget, opts.max_steps))
        if opts.device is not None:
            train_kw["device"] = opts.device
        train_cfg = train_config_from_dict(train_kw, required=True)
        model_cfg = ModelConfig.from_dict(config["model"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    eval_bs = config.get("eval_batch_size") or get_preset(config["preset"]).eval_batch_size
    config["train"] = asdict(train_cfg)
    if opts.checkpoint_every is not None:
        config["checkpoint_every"] = opts.checkpoint_every
    return Preset(config["preset"], "", model_cfg, train_cfg, eval_bs), config


def _data_location(opts: RunOptions, config: dict[str, Any], vocab_size: int, ctx: DistContext) -> tuple[Path, str]:
    """Where the data is. A resumed run reuses its stored directory unless --data moves it (the
    embedded corpus is rebuilt if its cache is gone). Under torchrun the first rank of each node
    builds a missing default dataset while the others wait, then they find it cached."""
    if opts.resume is not None and opts.data is None and not str(config["data"]).startswith("embedded:"):
        return Path(config["data_dir"]), config["data"]
    if ctx.enabled and ctx.local_rank != 0:
        barrier()
    try:
        return resolve_data(opts, vocab_size)
    finally:
        if ctx.enabled and ctx.local_rank == 0:
            barrier()


def _run_dir(opts: RunOptions, preset_name: str, ctx: DistContext) -> Path:
    """Rank 0 names and checks the run directory; every rank gets the same answer (or error)."""
    error = None
    if opts.resume is not None:
        out = Path(opts.resume)
    else:
        out = Path(opts.out) if opts.out else Path("runs") / f"{preset_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        if ctx.is_main and out.exists() and not out.is_dir():
            error = f"--out {out} is a file, not a directory"
        elif ctx.is_main and out.exists() and any(out.iterdir()) and not opts.force:
            error = f"run directory {out} exists and is not empty (pass --force to overwrite, or --resume to continue it)"
    if ctx.enabled:
        out, error = broadcast_object((out, error))
    if error:
        raise ValueError(error)
    return out


# What a finished run leaves that a new start makes stale (checkpoint.pt only for a fresh start).
RESULT_FILES = ("summary.json", ARTIFACT_NAME)


def clear_stale_results(out: Path, *, fresh: bool) -> None:
    """Remove what an earlier run in ``out`` left that this one will replace: its summary and
    artifact (and, for a fresh start over it with --force, its checkpoint), so a run killed early
    never leaves a directory claiming results it does not have; and the ``.*.tmp`` files of
    writes that were killed before their rename."""
    for name in RESULT_FILES + ((CHECKPOINT_NAME,) if fresh else ()):
        (out / name).unlink(missing_ok=True)
    for tmp in out.glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def check_val_length(ds: Dataset, seq_len: int) -> None:
    """The final scores need at least one full window of validation tokens."""
    n = sum(read_shard_header(p) for p in ds.val_shards)
    if n < seq_len + 1:
        raise ValueError(f"the validation split has {n:,} tokens, fewer than one seq_len={seq_len} window needs ({seq_len + 1}); lower --seq-len or add validation data")


def setup(opts: RunOptions) -> RunSetup:
    """Fix a run's configuration, join the process group under torchrun, open the data and
    (rank 0) create the run directory with ``config.json`` and the first log record."""
    preset, config = _resumed_config(opts) if opts.resume is not None else fresh_config(opts)
    ctx, device = init_distributed(resolve_device(preset.train.device))
    data_dir, data_name = _data_location(opts, config, preset.model.vocab_size, ctx)
    ds = Dataset.open(data_dir, opts.tokenizer, verify=opts.verify_data)
    check_val_length(ds, preset.train.seq_len)
    if ds.vocab_size != preset.model.vocab_size:
        if "vocab_size" in opts.model_overrides or opts.resume is not None or opts.init_from is not None:
            raise ValueError(
                f"tokenizer {ds.tokenizer_path} has {ds.vocab_size} pieces but the model was asked for vocab_size "
                f"{preset.model.vocab_size}: they must match"
            )
        preset.model = ModelConfig.from_dict({**preset.model.to_dict(), "vocab_size": ds.vocab_size})
    config.update(data=data_name, data_dir=str(data_dir), model=preset.model.to_dict())
    out = _run_dir(opts, preset.name, ctx)
    resume = None
    if opts.resume is not None:
        resume = read_checkpoint(out / CHECKPOINT_NAME)
        check_resumable(resume, preset.model.to_dict(), asdict(preset.train))
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        clear_stale_results(out, fresh=resume is None)
        atomic_write_json(out / "config.json", config)
        if resume is None:
            log_path = out / "log.jsonl"
            log_path.unlink(missing_ok=True)
            append_jsonl(log_path, {"event": "start", "time": datetime.now(timezone.utc).isoformat(), "argv": sys.argv, "env": environment(), "world_size": ctx.world_size, "config": config})
    return RunSetup(preset, config, out, data_dir, data_name, ds, device, ctx, resume)


def run(opts: RunOptions) -> dict[str, Any]:
    """Execute one run and return its summary (also written to ``summary.json``). With
    ``opts.train_only`` stop after training and return the training summary. Under torchrun,
    ranks other than 0 return ``{"rank": r, ...}`` after training."""
    t_start = time.perf_counter()
    try:
        rs = setup(opts)  # joins the process group under torchrun
        return _execute(opts, rs, t_start)
    finally:
        shutdown_distributed()


def build_qat(model: torch.nn.Module, qat: dict[str, Any], policy: QuantPolicy, *, seed: int) -> QAT | None:
    """The run's QAT (None when off): it fakes the bits the export will store the shared block
    matrices in, and its noise follows the run's seed."""
    if qat["mode"] == "off":
        return None
    role_bits = {r: b for r in ("attn", "mlp") if (b := policy.bits_for(r))}
    cfg = QATConfig(mode=qat["mode"], start_frac=qat["start_frac"], bits=policy.bits_for("mlp") or 8, role_bits=role_bits,
                    float_max_numel=policy.float_max_numel, seed=seed)
    return QAT(model, cfg)


def _execute(opts: RunOptions, rs: RunSetup, t_start: float) -> dict[str, Any]:
    preset, config, out, device, ds = rs.preset, rs.config, rs.out, rs.device, rs.ds
    model_cfg, train_cfg = preset.model, preset.train
    log_path = out / "log.jsonl"

    torch.manual_seed(train_cfg.seed)
    np.random.seed(train_cfg.seed % 2**32)
    model = GPT(model_cfg).to(device)
    n_unique, n_effective = unique_params(model), effective_params(model)
    say = print if opts.progress and rs.dist.is_main else (lambda *a, **k: None)
    verb = "train" if opts.train_only else "run"
    say(f"loopgolf {verb}: preset {preset.name} | {model.plan.describe()} | {n_unique:,} unique / {n_effective:,} effective params")
    say(f"data: {rs.data_name} ({ds.root}) | device {device} x {rs.dist.world_size} | budget {describe_budget(train_cfg)}")
    if rs.resume is not None:
        say(f"resuming {out} from step {rs.resume['train']['step']} ({rs.resume['train']['elapsed']:.1f} s of training used)")

    loader = TokenLoader(ds.train_shards, train_cfg.seq_len, rank=rs.dist.rank, world_size=rs.dist.world_size, seed=train_cfg.seed, vocab_size=ds.vocab_size)
    val_tokens = ds.val_tokens()
    eval_bs = preset.eval_batch_size

    def validate(m: torch.nn.Module) -> dict:
        r = evaluate_bpb(m, val_tokens, ds.tables, train_cfg.seq_len, batch_size=eval_bs, max_tokens=train_cfg.val_max_tokens, device=device)
        return {"val_loss": r.val_loss, "val_bpb": r.val_bpb, "tokens": r.num_targets}

    policy_q = parse_policy(config.get("quant", ""))
    qat_cfg = config.get("qat") or {"mode": "off"}
    qat = build_qat(model, qat_cfg, policy_q, seed=train_cfg.seed)
    uptrain = config.get("uptrain")
    objective = None
    if uptrain is not None:
        objective = build_objective(model, uptrain, fresh=rs.resume is None, device=device, say=say)

    every = int(config.get("checkpoint_every") or 0)
    policy = None
    if every or opts.train_only:
        policy = CheckpointPolicy(out / CHECKPOINT_NAME, every=every, config={"model": model_cfg.to_dict(), "train": asdict(train_cfg)})
    result = train(
        model, loader, train_cfg, device=device, tied_embeddings=model_cfg.tie_embeddings, log_path=log_path,
        validate=validate, on_step=qat, forward=qat.forward if qat is not None else objective, progress=opts.progress,
        checkpoint=policy, resume=rs.resume,
    )
    uptrain_info = None if objective is None else uptrain_summary(objective, uptrain, result)
    if opts.train_only or not rs.dist.is_main:
        summary = _train_summary(result, rs, policy, t_start)
        if uptrain_info is not None:
            summary["uptrain"] = uptrain_info
        if rs.dist.is_main:
            append_jsonl(log_path, {"event": "train_end", **{k: summary[k] for k in ("steps", "train_seconds", "tokens_per_second")}})
        return summary

    pre = score(model, ds, val_tokens, train_cfg.seq_len, device, stride=config["eval_stride"], batch_size=eval_bs, progress=opts.progress)
    append_jsonl(log_path, {"event": "eval_pre", **pre.to_dict()})

    if opts.code is None:
        from loopgolf.submit.bundle import code_counts

        counted = code_counts(config)  # the plain train_gpt.py this configuration generates
        n_code, code_id, n_code_scoring = counted.code_bytes, counted.code_id, counted.code_bytes_scoring
    else:
        (n_code, code_id), n_code_scoring = opts.code, None
    artifact_path = out / ARTIFACT_NAME
    calibration = None
    if policy_q.gptq:
        from loopgolf.export.gptq import calibration_tokens

        # Windows straight from the memory-mapped shard: loading it whole would cost ~1 GB.
        calibration = calibration_tokens(model, "train", shards=ds.train_shards[:1], seq_len=train_cfg.seq_len, seed=train_cfg.seed)
    info = export_model(
        model, artifact_path, policy=policy_q, codec=config["codec"], calibration=calibration,
        meta={"preset": preset.name, "seed": train_cfg.seed, "steps": result.steps, "seq_len": train_cfg.seq_len},
    )
    cap = CapReport(model_bytes=info.total_bytes, code_bytes=n_code, cap_bytes=config["cap_bytes"])
    append_jsonl(log_path, {"event": "export", "codec": info.codec, **cap.to_dict()})

    reloaded, _ = load_model(artifact_path, device=device)
    post = score(reloaded, ds, val_tokens, train_cfg.seq_len, device, stride=config["eval_stride"], batch_size=eval_bs, progress=opts.progress)
    append_jsonl(log_path, {"event": "eval_post", **post.to_dict()})

    xz = None
    if opts.xz_baseline:
        from loopgolf.data.corpus import baseline_xz_bpb

        xz = baseline_xz_bpb(rs.data_dir)
    summary = {
        "val_bpb_pre": pre.val_bpb,
        "val_bpb_post": post.val_bpb,
        "val_loss_pre": pre.val_loss,
        "val_loss_post": post.val_loss,
        "quant_gap_bpb": post.val_bpb - pre.val_bpb,
        "baseline_xz_bpb": None if xz is None else xz.bpb,
        "baseline_xz_approximate": None if xz is None else xz.approximate,  # decoded from the shards: tokenizer-normalized text
        "baseline_xz_unknown_targets": None if xz is None else xz.unknown_targets,
        "artifact_bytes": cap.artifact_bytes,
        "model_bytes": cap.model_bytes,
        "code_bytes": cap.code_bytes,  # the train_gpt.py this configuration generates (loopgolf.submit.bundle)
        "code_id": code_id,  # sha256 of that script's embedded sources and configuration
        "code_bytes_scoring": n_code_scoring,  # the scoring path's source alone, for information
        "cap_bytes": cap.cap_bytes,
        "headroom_bytes": cap.headroom,
        "fits": cap.fits,
        "codec": info.codec,
        "quant": policy_q.describe(),
        "qat": qat_cfg,
        "export": info.to_summary(),
        "unique_params": n_unique,
        "effective_params": n_effective,
        "train_tokens": result.train_tokens,
        "train_seconds": result.train_seconds,
        "tokens_per_second": result.tokens_per_second,
        "steps": result.steps,
        "stage_steps": result.stage_steps,
        "final_train_loss": result.final_train_loss,
        "val_targets": post.num_targets,
        "val_target_bytes": post.target_bytes,
        "eval_seq_len": post.seq_len,
        "eval_stride": post.stride,
        "device": str(device),
        "world_size": rs.dist.world_size,
        "resumed_from": result.resumed_from,
        "preset": preset.name,
        "seed": train_cfg.seed,
        "plan": model.plan.to_dict(),
        "data": rs.data_name,
        "artifact": str(artifact_path),
        "total_seconds": time.perf_counter() - t_start,
        "loopgolf_version": loopgolf.__version__,
        "torch_version": torch.__version__,
    }
    if uptrain_info is not None:
        summary["uptrain"] = uptrain_info
    atomic_write_json(out / "summary.json", summary)
    append_jsonl(log_path, {"event": "end", "total_seconds": summary["total_seconds"]})
    summary["run_dir"] = str(out)
    return summary


def build_objective(model: torch.nn.Module, uptrain: dict[str, Any], *, fresh: bool, device: torch.device, say=print):
    """Load the start weights (fresh runs) and the teacher; return the training objective, or
    None when the loss is plain cross-entropy."""
    from loopgolf.sources.load import load_source
    from loopgolf.train.checkpoint import load_model_state
    from loopgolf.train.distill import TrainingObjective

    if fresh and uptrain.get("init_from"):
        load_model_state(model, load_source(uptrain["init_from"]).state)
        say(f"initialised from {uptrain['init_from']}")
    teacher = None
    if uptrain.get("distill_from"):
        teacher = load_source(uptrain["distill_from"]).model(device)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"the teacher {uptrain['distill_from']} has vocab {teacher.config.vocab_size}, the student {model.config.vocab_size}: they must match")
        n = unique_params(teacher)
        say(f"teacher {uptrain['distill_from']}: {teacher.plan.describe()} | {n:,} params ({4 * n / 2**20:.1f} MiB in float32) | weight {uptrain['distill_weight']}, T {uptrain['distill_temp']}")
    if teacher is None and not uptrain.get("exit_loss_weight"):
        return None
    return TrainingObjective(model, teacher=teacher, distill_weight=uptrain["distill_weight"], distill_temp=uptrain["distill_temp"], exit_weight=uptrain["exit_loss_weight"])


def uptrain_summary(objective: Any, uptrain: dict[str, Any], result: TrainResult) -> dict[str, Any]:
    """What uptraining used: the start, the teacher's size and time, the loss weights."""
    info = dict(uptrain)
    if objective is not None and objective.teacher is not None:
        n = unique_params(objective.teacher)
        info.update(teacher_params=n, teacher_param_bytes=4 * n, teacher_seconds=objective.teacher_seconds,
                    teacher_time_fraction=objective.teacher_seconds / max(result.train_seconds, 1e-9))
    if objective is not None:
        info["last_loss_parts"] = objective.log_values()
    return info


def _train_summary(result: TrainResult, rs: RunSetup, policy: CheckpointPolicy | None, t_start: float) -> dict[str, Any]:
    return {
        "rank": rs.dist.rank,
        "world_size": rs.dist.world_size,
        "preset": rs.preset.name,
        "seed": rs.preset.train.seed,
        "steps": result.steps,
        "train_tokens": result.train_tokens,
        "train_seconds": result.train_seconds,
        "tokens_per_second": result.tokens_per_second,
        "final_train_loss": result.final_train_loss,
        "stage_steps": result.stage_steps,
        "resumed_from": result.resumed_from,
        "checkpoint": str(policy.path) if policy is not None else None,
        "device": str(rs.device),
        "total_seconds": time.perf_counter() - t_start,
        "run_dir": str(rs.out),
    }


def format_train_summary(s: dict[str, Any]) -> str:
    """The table printed at the end of `loopgolf train`."""
    rows = [
        ("preset", s["preset"]),
        ("steps / train tokens", f"{s['steps']:,} / {s['train_tokens']:,}" + (f"  (resumed from step {s['resumed_from']:,})" if s["resumed_from"] is not None else "")),
        ("train time / tokens per s", f"{s['train_seconds']:.1f} s / {s['tokens_per_second']:,.0f}"),
        ("final train loss", f"{s['final_train_loss']:.4f}"),
        ("checkpoint", s["checkpoint"]),
        ("device / ranks", f"{s['device']} x {s['world_size']}"),
        ("next", f"loopgolf run --resume {s['run_dir']}  (export + roundtrip eval; add --steps/--time to train longer)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def format_summary(s: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    rows = [
        ("preset", s["preset"]),
        ("plan", f"{s['plan']['spec']['kind']} V={s['plan']['virtual_layers']} (attn_of {s['plan']['attn_of']})"),
        ("params unique / effective", f"{s['unique_params']:,} / {s['effective_params']:,}"),
        ("steps / train tokens", f"{s['steps']:,} / {s['train_tokens']:,}"),
        ("train time / tokens per s", f"{s['train_seconds']:.1f} s / {s['tokens_per_second']:,.0f}"),
        ("val_bpb pre-export", f"{s['val_bpb_pre']:.4f}"),
        ("val_bpb post-roundtrip", f"{s['val_bpb_post']:.4f}  (gap {s['quant_gap_bpb']:+.4f})"),
        ("baseline xz bpb", "not measured" if s.get("baseline_xz_bpb") is None else f"{s['baseline_xz_bpb']:.4f}" + (f"  (approximate, {s.get('baseline_xz_unknown_targets', 0):,} unknown-piece targets)" if s.get("baseline_xz_approximate") else "")),
        ("artifact bytes", f"{s['model_bytes']:,} model ({s['codec']}) + {s['code_bytes']:,} code = {s['artifact_bytes']:,}"),
        ("cap", f"{s['cap_bytes']:,}: " + (f"fits, {s['headroom_bytes']:,} to spare" if s["fits"] else f"OVER by {-s['headroom_bytes']:,} bytes")),
        ("device / total time", f"{s['device']} / {s['total_seconds']:.1f} s"),
        ("run dir", s.get("run_dir", "")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def summary_json(s: dict[str, Any]) -> str:
    return json.dumps(s, indent=2)

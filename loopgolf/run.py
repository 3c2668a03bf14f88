"""`loopgolf run`: data -> train -> export -> roundtrip eval -> summary (and `loopgolf train`:
data -> train -> checkpoint).

A run's configuration is a :class:`~loopgolf.config.RunConfig`: a preset with the command
line's changes (:class:`RunOptions`), or, with ``resume``, the one its directory stored, where
only the fields marked as changeable on resume may take new values. Its files are written
through :class:`~loopgolf.rundir.RunDir` (config, log, checkpoint, artifact, summary), whose lock
the run holds while it runs.

Under torchrun every rank executes :func:`run`; rank 0 alone writes files and prints, and only
rank 0 exports and evaluates after training.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

import loopgolf
from loopgolf.config import EvalConfig, RunConfig, TrainConfig, get_preset, split_code_form
from loopgolf.data.dataset import Dataset
from loopgolf.data.shards import TokenLoader, read_shard_header
from loopgolf.device import resolve_device
from loopgolf.evaluate import EvalResult, evaluate_bpb
from loopgolf.export.pack import CapReport, export_model, load_model
from loopgolf.export.quantize import QuantPolicy, parse_policy
from loopgolf.model.gpt import GPT, effective_params, unique_params
from loopgolf.rundir import RunDir, RunSummary, TrainSummary
from loopgolf.train.checkpoint import CheckpointPolicy, check_resumable
from loopgolf.train.distributed import DistContext, barrier, broadcast_object, init_distributed, shutdown_distributed
from loopgolf.train.qat import QAT, QATConfig
from loopgolf.train.trainer import TrainResult, train


@dataclass
class RunOptions:
    """What the command line (or a sweep, or a generated script) asks of a run. ``None`` means
    "not given": a fresh run takes the preset's value, a resumed run its stored one."""

    preset: str | None = None  # None: the default preset (fresh runs)
    data: Path | None = None  # None = the embedded default corpus (or a resumed run's data)
    out: Path | None = None  # None = runs/<preset>-<timestamp>
    cap_bytes: int | None = None
    seed: int | None = None
    time_budget: float | None = None
    max_steps: int | None = None
    codec: str | None = None
    code_form: str | None = None  # the form of train_gpt.py counted against the cap (config.CODE_FORMS)
    quant: str | None = None  # quantization policy (loopgolf.export.quantize.parse_policy syntax)
    qat: str | None = None  # off | ste | noise
    qat_start: float | None = None  # fraction of the budget after which QAT is on
    stride: int | None = None  # sliding-window eval stride for the final scores
    loops: int | None = None  # loop count of a recursive plan at the final evaluation
    ttt: str | None = None  # score-first test-time training at the final evaluation (loopgolf.ttt.TTTSpec)
    eval_time: float | None = None  # seconds test-time training may adapt for
    loop_sampling: str | None = None  # depth-sampled training (loopgolf.config.LoopSampler)
    device: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig field -> value
    train_overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig field -> value (optim: a dict of OptimizerConfig fields)
    progress: bool = True
    force: bool = False
    checkpoint_every: int | None = None  # steps between checkpoints (0: none)
    resume: Path | None = None  # run directory to continue from its checkpoint
    train_only: bool = False  # `loopgolf train`: stop after training and the final checkpoint
    verify_data: bool = True  # check the shards against the dataset's manifest (sizes, sha256) before training
    init_from: Path | None = None  # start from this model (a `loopgolf convert` directory, run directory, artifact or HF directory)
    distill_from: Path | None = None  # teacher for forward-KL distillation (any source `loopgolf convert` reads)
    distill_weight: float | None = None  # loss = (1 - w) CE + w T^2 KL(teacher || student); default 0.5 with a teacher
    distill_temp: float | None = None
    exit_loss_weight: float | None = None  # weight of the intermediate-loop (early-exit) losses
    tokenizer: Path | None = None  # None: found from the data directory (manifest, *.model, or the official layout)
    base: RunConfig | None = None  # start from this configuration instead of a preset (a generated train_gpt.py)
    # Set by a generated train_gpt.py: (its own size, its code id) instead of measuring loopgolf's
    # files, and no xz reference baseline (its code is not part of the script).
    code: tuple[int, str] | None = None
    xz_baseline: bool = True

    def __post_init__(self) -> None:
        # What the configuration types cannot check (flags that are not fields), checked before
        # anything starts, so a typo does not cost a whole training budget.
        if self.time_budget is not None and not (math.isfinite(self.time_budget) and self.time_budget > 0):
            raise ValueError(f"--time must be a positive, finite number of seconds, got {self.time_budget}")
        if self.resume is not None:
            given = [
                flag
                for flag, value in (
                    ("--out", self.out),
                    ("--force", self.force or None),
                    ("--init-from", self.init_from),
                    ("--distill-from", self.distill_from),
                )
                if value is not None
            ]
            if given:
                raise ValueError(f"--resume continues the run in its own directory with its own start; drop {', '.join(given)}")
        if self.init_from is not None and self.model_overrides:
            raise ValueError(f"--init-from takes the model from {self.init_from}; model overrides ({', '.join(sorted(self.model_overrides))}) cannot change it")
        # Values are checked when the configuration is built from them (build_config, first thing a
        # run does): a bad one fails there, naming its field, before any data is touched.

    def changes(self) -> dict[str, Any]:
        """The configuration fields these options set: dotted path -> value."""
        out: dict[str, Any] = {f"model.{k}": v for k, v in self.model_overrides.items()}
        for key, value in self.train_overrides.items():
            if key == "optim" and isinstance(value, dict):
                out.update({f"train.optim.{k}": v for k, v in value.items()})
            else:
                out[f"train.{key}"] = value
        given = {
            "train.seed": self.seed,
            "train.device": self.device,
            "export.cap_bytes": self.cap_bytes,
            "export.codec": self.codec,
            "export.code_form": self.code_form,
            "export.quant": self.quant,
            "export.qat.mode": self.qat,
            "export.qat.start_frac": self.qat_start,
            "eval.stride": self.stride,
            "eval.loops": self.loops,
            "eval.ttt": self.ttt,
            "eval.eval_time": self.eval_time,
            "train.loop_sampling": self.loop_sampling,
            "checkpoint_every": self.checkpoint_every,
        }
        out.update({k: v for k, v in given.items() if v is not None})
        if self.init_from is not None or self.distill_from is not None or self.exit_loss_weight:
            out.update(
                {
                    "uptrain.init_from": None if self.init_from is None else str(self.init_from),
                    "uptrain.distill_from": None if self.distill_from is None else str(self.distill_from),
                    "uptrain.distill_weight": (0.5 if self.distill_weight is None else self.distill_weight) if self.distill_from is not None else 0.0,
                    "uptrain.distill_temp": 1.0 if self.distill_temp is None else self.distill_temp,
                    "uptrain.exit_loss_weight": self.exit_loss_weight or 0.0,
                }
            )
        return out


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
    from loopgolf.data.default_corpus import DEFAULT_DATA_NAME, ensure_default_dataset

    return ensure_default_dataset(vocab_size=vocab_size, progress=opts.progress), DEFAULT_DATA_NAME


def budget_changes(configured_time_budget: float | None, time_budget: float | None, max_steps: int | None) -> dict[str, Any]:
    """The changes ``--time`` / ``--steps`` make to ``train``. ``--steps N`` sets the step
    budget. ``--time S`` sets the wallclock budget, and on a configuration that stops on steps
    alone (the default ``cpu`` preset) it replaces that stop, so ``--time 600`` trains for 600 s
    rather than stopping at the preset's step count; where the configuration already has a
    wallclock budget (the ``pg`` presets: 20,000 steps or 600 s) its step cap stays. Both
    together: whichever comes first. ``configured_time_budget``: the configuration's own wallclock
    budget, before these flags."""
    changes: dict[str, Any] = {}
    if time_budget is not None:
        changes["train.time_budget"] = time_budget
        if max_steps is None and configured_time_budget is None:
            changes["train.max_steps"] = None
    if max_steps is not None:
        changes["train.max_steps"] = max_steps
    return changes


def describe_budget(cfg: TrainConfig) -> str:
    """``250 steps``, ``600 s`` or ``600 s or 20,000 steps (whichever comes first)``."""
    parts = ([f"{cfg.time_budget:g} s"] if cfg.time_budget is not None else []) + ([f"{cfg.max_steps:,} steps"] if cfg.max_steps is not None else [])
    return " or ".join(parts) + (" (whichever comes first)" if len(parts) == 2 else "")


def _apply(base: RunConfig, opts: RunOptions) -> RunConfig:
    changes = opts.changes()
    # --train may change the wallclock budget --time looks at. Read it from the changes rather
    # than from a config built without --steps/--time: `--steps N --train time_budget=null`
    # is valid only once --steps is in (it failed with "training needs a stop" before).
    configured = changes["train.time_budget"] if "train.time_budget" in changes else base.train.time_budget
    return base.with_changes({**changes, **budget_changes(configured, opts.time_budget, opts.max_steps)})


def build_config(opts: RunOptions) -> RunConfig:
    """A fresh run's configuration: the preset (or ``opts.base``) with the options' changes."""
    from loopgolf.config import DEFAULT_PRESET

    base = opts.base if opts.base is not None else RunConfig.from_preset(get_preset(opts.preset or DEFAULT_PRESET))
    if opts.init_from is not None:
        from loopgolf.sources.load import load_source

        base = base.with_changes({"model": load_source(opts.init_from).config.to_dict()})  # checked here, before any data is touched
    return _apply(base, opts)


def resumed_config(opts: RunOptions) -> RunConfig:
    """The stored configuration of the run in ``opts.resume``, with the changes a resume may make
    (the fields marked as changeable on resume: the budget, the device, the checkpoint interval
    and the data location); any other setting given that differs from the stored one is refused."""
    stored = RunDir(Path(opts.resume)).read_config()
    try:
        wanted = _apply(stored, opts)
    except ValueError as e:
        raise ValueError(f"--resume {opts.resume}: {e}") from None
    fixed = stored.fixed_changes(wanted)
    if opts.preset is not None and opts.preset != stored.preset:
        fixed.insert(0, ("preset", stored.preset, opts.preset))
    if fixed:
        what = "; ".join(f"{path} (stored {a!r:.60}, given {b!r:.60})" for path, a, b in fixed)
        raise ValueError(
            f"--resume continues the run with its stored config.json, and these settings cannot change: {what}. "
            "Only the budget (--steps, --time), --device, --data and --checkpoint-every may"
        )
    return wanted


@dataclass
class RunSetup:
    """A run with its configuration fixed: what training and the finish need."""

    config: RunConfig
    rundir: RunDir
    ds: Dataset
    device: torch.device
    dist: DistContext
    resume: dict[str, Any] | None  # the checkpoint to continue from


def _data_location(opts: RunOptions, config: RunConfig, ctx: DistContext) -> tuple[Path, str]:
    """Where the data is. A resumed run reuses its stored directory unless --data moves it (the
    embedded corpus is rebuilt if its cache is gone). Under torchrun the first rank of each node
    builds a missing default dataset while the others wait, then they find it cached."""
    stored = config.data
    if opts.resume is not None and opts.data is None and stored is not None and not stored.name.startswith("embedded:"):
        return Path(stored.dir), stored.name
    if ctx.enabled and ctx.local_rank != 0:
        barrier()
    try:
        return resolve_data(opts, config.model.vocab_size)
    finally:
        if ctx.enabled and ctx.local_rank == 0:
            barrier()


def _run_dir(opts: RunOptions, preset_name: str, ctx: DistContext) -> RunDir:
    """Rank 0 names and checks the run directory; every rank gets the same answer (or error)."""
    error = None
    if opts.resume is not None:
        out = Path(opts.resume)
    else:
        out = Path(opts.out) if opts.out else Path("runs") / f"{preset_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        if ctx.is_main and out.exists() and not out.is_dir():
            error = f"--out {out} is a file, not a directory"
        elif ctx.is_main and not RunDir(out).is_empty() and not opts.force:
            error = f"run directory {out} exists and is not empty (pass --force to overwrite, or --resume to continue it)"
    if ctx.enabled:
        out, error = broadcast_object((out, error))
    if error:
        raise ValueError(error)
    return RunDir(out)


def check_val_length(ds: Dataset, seq_len: int) -> None:
    """The final scores need at least one full window of validation tokens."""
    n = sum(read_shard_header(p) for p in ds.val_shards)
    if n < seq_len + 1:
        raise ValueError(
            f"the validation split has {n:,} tokens, fewer than one seq_len={seq_len} window needs ({seq_len + 1}); lower --seq-len or add validation data"
        )


def setup(opts: RunOptions) -> RunSetup:
    """Fix a run's configuration, join the process group under torchrun, open the data and name
    the run directory."""
    config = resumed_config(opts) if opts.resume is not None else build_config(opts)
    if opts.code is None and split_code_form(config.export.code_form)[0] == "minify":
        from loopgolf.codebytes import require_minifier

        require_minifier()  # before training, not after it
    ctx, device = init_distributed(resolve_device(config.train.device))
    data_dir, data_name = _data_location(opts, config, ctx)
    ds = Dataset.open(data_dir, opts.tokenizer, verify=opts.verify_data)
    check_val_length(ds, config.train.seq_len)
    if ds.vocab_size != config.model.vocab_size:
        if "vocab_size" in opts.model_overrides or opts.resume is not None or opts.init_from is not None:
            raise ValueError(
                f"tokenizer {ds.tokenizer_path} has {ds.vocab_size} pieces but the model was asked for vocab_size {config.model.vocab_size}: they must match"
            )
        config = config.with_changes({"model.vocab_size": ds.vocab_size})
    config = config.with_changes({"data": {"name": data_name, "dir": str(data_dir)}})
    rundir = _run_dir(opts, config.preset, ctx)
    resume = None
    if opts.resume is not None:
        resume = rundir.read_checkpoint()
        check_resumable(resume, config.model.to_dict(), asdict(config.train))
    return RunSetup(config, rundir, ds, device, ctx, resume)


def _start(rs: RunSetup) -> None:
    """Rank 0: write the configuration and (fresh runs) the first log record."""
    rundir, fresh = rs.rundir, rs.resume is None
    rundir.clear_stale(fresh=fresh)
    rundir.write_config(rs.config)
    if fresh:
        rundir.start_log(
            {
                "event": "start",
                "time": datetime.now(timezone.utc).isoformat(),
                "argv": sys.argv,
                "env": environment(),
                "world_size": rs.dist.world_size,
                "config": rs.config.to_dict(),
            }
        )


@dataclass
class RunOutcome:
    """What :func:`run` returns: the summary (a :class:`RunSummary` for a finished run, a
    :class:`TrainSummary` for ``train_only`` and for ranks other than 0) and the directory."""

    summary: RunSummary | TrainSummary
    run_dir: Path
    rank: int = 0

    def to_json(self) -> str:
        return json.dumps({**self.summary.to_dict(), "run_dir": str(self.run_dir)}, indent=2)


def run(opts: RunOptions, *, on_lock: Callable[[RunDir], None] | None = None) -> RunOutcome:
    """Execute one run; a finished run's summary is also written to ``summary.json``. With
    ``opts.train_only`` stop after training. Under torchrun every rank calls this; rank 0 holds
    the run directory's lock, writes the files and exports. ``on_lock`` (rank 0) is called with
    the run directory once its lock is held, before anything is written there; what it raises
    ends the run with the directory untouched (a sweep worker checks and records the run there)."""
    t_start = time.perf_counter()
    try:
        rs = setup(opts)  # joins the process group under torchrun
        if not rs.dist.is_main:
            return _execute(opts, rs, t_start)
        with rs.rundir.lock():
            if on_lock is not None:
                on_lock(rs.rundir)
            _start(rs)
            try:
                return _execute(opts, rs, t_start)
            except BaseException as e:
                rs.rundir.log({"event": "error", "time": datetime.now(timezone.utc).isoformat(), "error": f"{type(e).__name__}: {str(e)[:500]}"})
                raise
    finally:
        shutdown_distributed()


def build_qat(model: torch.nn.Module, qat: dict[str, Any], policy: QuantPolicy, *, seed: int) -> QAT | None:
    """The run's QAT (None when off): it fakes the bits the export will store the shared block
    matrices in, and its noise follows the run's seed."""
    if qat["mode"] == "off":
        return None
    role_bits = {r: b for r in ("attn", "mlp") if (b := policy.bits_for(r))}
    cfg = QATConfig(
        mode=qat["mode"], start_frac=qat["start_frac"], bits=policy.bits_for("mlp") or 8, role_bits=role_bits, float_max_numel=policy.float_max_numel, seed=seed
    )
    return QAT(model, cfg)


def _execute(opts: RunOptions, rs: RunSetup, t_start: float) -> RunOutcome:
    config, rundir, device, ds = rs.config, rs.rundir, rs.device, rs.ds
    model_cfg, train_cfg = config.model, config.train
    log_path = rundir.log_path if rs.dist.is_main else None

    torch.manual_seed(train_cfg.seed)
    np.random.seed(train_cfg.seed % 2**32)
    model = GPT(model_cfg).to(device)
    n_unique, n_effective = unique_params(model), effective_params(model)
    say = print if opts.progress and rs.dist.is_main else (lambda *a, **k: None)
    verb = "train" if opts.train_only else "run"
    say(f"loopgolf {verb}: preset {config.preset} | {model.plan.describe()} | {n_unique:,} unique / {n_effective:,} effective params")
    say(f"data: {config.data.name} ({ds.root}) | device {device} x {rs.dist.world_size} | budget {describe_budget(train_cfg)}")
    if rs.resume is not None:
        say(f"resuming {rundir.path} from step {rs.resume['train']['step']} ({rs.resume['train']['elapsed']:.1f} s of training used)")

    loader = TokenLoader(ds.train_shards, train_cfg.seq_len, rank=rs.dist.rank, world_size=rs.dist.world_size, seed=train_cfg.seed, vocab_size=ds.vocab_size)
    val_tokens = ds.val_tokens()
    eval_cfg = config.eval

    def validate(m: torch.nn.Module) -> dict:
        r = evaluate_bpb(m, val_tokens, ds.tables, train_cfg.seq_len, batch_size=eval_cfg.batch_size, max_tokens=train_cfg.val_max_tokens, device=device)
        return {"val_loss": r.val_loss, "val_bpb": r.val_bpb, "tokens": r.num_targets}

    def score(m: torch.nn.Module) -> EvalResult:
        return evaluate_bpb(
            m, val_tokens, ds.tables, train_cfg.seq_len, stride=eval_cfg.stride, batch_size=eval_cfg.batch_size, device=device, progress=opts.progress
        )

    export_cfg = config.export
    policy_q = parse_policy(export_cfg.quant)
    qat_cfg = asdict(export_cfg.qat)
    qat = build_qat(model, qat_cfg, policy_q, seed=train_cfg.seed)
    uptrain = None if config.uptrain is None else asdict(config.uptrain)
    objective = None
    if uptrain is not None:
        objective = build_objective(model, uptrain, fresh=rs.resume is None, device=device, say=say)

    policy = None
    if config.checkpoint_every or opts.train_only:
        policy = CheckpointPolicy(rundir.checkpoint_path, every=config.checkpoint_every, config={"model": model_cfg.to_dict(), "train": asdict(train_cfg)})
    result = train(
        model,
        loader,
        train_cfg,
        device=device,
        tied_embeddings=model_cfg.tie_embeddings,
        log_path=log_path,
        validate=validate,
        on_step=qat,
        forward=qat.forward if qat is not None else objective,
        progress=opts.progress,
        checkpoint=policy,
        resume=rs.resume,
    )
    uptrain_info = None if objective is None else uptrain_summary(objective, uptrain, result)
    if opts.train_only or not rs.dist.is_main:
        summary = _train_summary(result, rs, policy, t_start, uptrain_info)
        if rs.dist.is_main:
            rundir.log({"event": "train_end", "steps": summary.steps, "train_seconds": summary.train_seconds, "tokens_per_second": summary.tokens_per_second})
        return RunOutcome(summary, rundir.path, rs.dist.rank)

    pre = score(model)
    rundir.log({"event": "eval_pre", **pre.to_dict()})

    if opts.code is None:
        from loopgolf.codebytes import code_counts

        counted = code_counts(config)  # the train_gpt.py this configuration generates, in its code form
        n_code, code_id, n_code_scoring = counted.code_bytes, counted.code_id, counted.code_bytes_scoring
    else:
        (n_code, code_id), n_code_scoring = opts.code, None
    calibration = None
    if policy_q.gptq:
        from loopgolf.export.gptq import calibration_tokens

        # Windows straight from the memory-mapped shard: loading it whole would cost ~1 GB.
        calibration = calibration_tokens(model, "train", shards=ds.train_shards[:1], seq_len=train_cfg.seq_len, seed=train_cfg.seed)
    info = export_model(
        model,
        rundir.artifact_path,
        policy=policy_q,
        codec=export_cfg.codec,
        calibration=calibration,
        meta={"preset": config.preset, "seed": train_cfg.seed, "steps": result.steps, "seq_len": train_cfg.seq_len},
    )
    cap = CapReport(model_bytes=info.total_bytes, code_bytes=n_code, cap_bytes=export_cfg.cap_bytes)
    rundir.log({"event": "export", "codec": info.codec, **cap.to_dict()})

    reloaded, _ = load_model(rundir.artifact_path, device=device)
    post = score(reloaded)
    rundir.log({"event": "eval_post", **post.to_dict()})
    eval_compute = None
    if eval_cfg.computes:
        eval_compute = score_with_compute(reloaded, val_tokens, ds.tables, train_cfg.seq_len, eval_cfg, post, device=device, progress=opts.progress)
        rundir.log({"event": "eval_compute", **eval_compute})

    xz = None
    if opts.xz_baseline:
        from loopgolf.data.corpus import baseline_xz_bpb

        xz = baseline_xz_bpb(Path(config.data.dir))
    summary = RunSummary(
        val_bpb_pre=pre.val_bpb,
        val_bpb_post=post.val_bpb,
        val_loss_pre=pre.val_loss,
        val_loss_post=post.val_loss,
        quant_gap_bpb=post.val_bpb - pre.val_bpb,
        baseline_xz_bpb=None if xz is None else xz.bpb,
        baseline_xz_approximate=None if xz is None else xz.approximate,
        baseline_xz_unknown_targets=None if xz is None else xz.unknown_targets,
        artifact_bytes=cap.artifact_bytes,
        model_bytes=cap.model_bytes,
        code_bytes=cap.code_bytes,
        code_id=code_id,
        code_bytes_scoring=n_code_scoring,
        code_form=export_cfg.code_form,
        cap_bytes=cap.cap_bytes,
        headroom_bytes=cap.headroom,
        fits=cap.fits,
        codec=info.codec,
        quant=policy_q.describe(),
        qat=qat_cfg,
        export=info.to_summary(),
        unique_params=n_unique,
        effective_params=n_effective,
        train_tokens=result.train_tokens,
        train_seconds=result.train_seconds,
        tokens_per_second=result.tokens_per_second,
        steps=result.steps,
        stage_steps=result.stage_steps,
        final_train_loss=result.final_train_loss,
        val_targets=post.num_targets,
        val_target_bytes=post.target_bytes,
        eval_seq_len=post.seq_len,
        eval_stride=post.stride,
        device=str(device),
        world_size=rs.dist.world_size,
        resumed_from=result.resumed_from,
        preset=config.preset,
        seed=train_cfg.seed,
        plan=model.plan.to_dict(),
        data=config.data.name,
        artifact=str(rundir.artifact_path),
        total_seconds=time.perf_counter() - t_start,
        loopgolf_version=loopgolf.__version__,
        torch_version=torch.__version__,
        uptrain=uptrain_info,
        eval_compute=eval_compute,
    )
    rundir.write_summary(summary)
    rundir.log({"event": "end", "total_seconds": summary.total_seconds})
    return RunOutcome(summary, rundir.path)


def score_with_compute(
    model: torch.nn.Module,
    tokens: Any,
    tables: Any,
    seq_len: int,
    eval_cfg: EvalConfig,
    plain: EvalResult,
    *,
    device: torch.device,
    progress: bool = False,
) -> dict[str, Any]:
    """The final score with the evaluation compute ``eval_cfg`` asks for (a loop count,
    test-time training), as the summary's ``eval_compute``. ``plain`` is the roundtrip score
    without it (the baseline when the windows and loop count are the same)."""
    model.set_loops(eval_cfg.loops)
    try:
        loops = model.loops or model.plan.num_loops
        t0 = time.perf_counter()
        if eval_cfg.ttt is None:
            r = evaluate_bpb(model, tokens, tables, seq_len, stride=eval_cfg.stride, batch_size=eval_cfg.batch_size, device=device, progress=progress)
            return {
                "loops": loops,
                "ttt": None,
                "val_bpb": r.val_bpb,
                "val_loss": r.val_loss,
                "val_bpb_without_ttt": None,
                "eval_seconds": time.perf_counter() - t0,
            }
        from loopgolf.ttt import TTTSpec, evaluate_ttt

        spec = TTTSpec.parse(eval_cfg.ttt)
        same_windows = spec.reset == "none" and model.loops is None  # then plain evaluation is the baseline
        r = evaluate_ttt(
            model, tokens, tables, seq_len, spec, stride=eval_cfg.stride, batch_size=eval_cfg.batch_size, device=device,
            eval_time=eval_cfg.eval_time, baseline=not same_windows, progress=progress,
        )  # fmt: skip
        return {
            "loops": loops,
            "ttt": str(spec),
            "val_bpb": r.adapted.val_bpb,
            "val_loss": r.adapted.val_loss,
            "val_bpb_without_ttt": plain.val_bpb if same_windows else r.base.val_bpb,
            "eval_seconds": r.seconds,
            "eval_time": eval_cfg.eval_time,
            "tokens_adapted": r.tokens_adapted,
            "updates": r.updates,
            "adapting_stopped_at": r.adapting_stopped_at,
        }
    finally:
        model.set_loops(None)


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
            raise ValueError(
                f"the teacher {uptrain['distill_from']} has vocab {teacher.config.vocab_size}, the student {model.config.vocab_size}: they must match"
            )
        n = unique_params(teacher)
        say(
            f"teacher {uptrain['distill_from']}: {teacher.plan.describe()} | {n:,} params ({4 * n / 2**20:.1f} MiB in float32) | weight {uptrain['distill_weight']}, T {uptrain['distill_temp']}"
        )
    if teacher is None and not uptrain.get("exit_loss_weight"):
        return None
    return TrainingObjective(
        model, teacher=teacher, distill_weight=uptrain["distill_weight"], distill_temp=uptrain["distill_temp"], exit_weight=uptrain["exit_loss_weight"]
    )


def uptrain_summary(objective: Any, uptrain: dict[str, Any], result: TrainResult) -> dict[str, Any]:
    """What uptraining used: the start, the teacher's size and time, the loss weights."""
    info = dict(uptrain)
    if objective is not None and objective.teacher is not None:
        n = unique_params(objective.teacher)
        info.update(
            teacher_params=n,
            teacher_param_bytes=4 * n,
            teacher_seconds=objective.teacher_seconds,
            teacher_time_fraction=objective.teacher_seconds / max(result.train_seconds, 1e-9),
        )
    if objective is not None:
        info["last_loss_parts"] = objective.log_values()
    return info


def _train_summary(result: TrainResult, rs: RunSetup, policy: CheckpointPolicy | None, t_start: float, uptrain: dict[str, Any] | None) -> TrainSummary:
    return TrainSummary(
        rank=rs.dist.rank,
        world_size=rs.dist.world_size,
        preset=rs.config.preset,
        seed=rs.config.train.seed,
        steps=result.steps,
        train_tokens=result.train_tokens,
        train_seconds=result.train_seconds,
        tokens_per_second=result.tokens_per_second,
        final_train_loss=result.final_train_loss,
        stage_steps=result.stage_steps,
        resumed_from=result.resumed_from,
        checkpoint=str(policy.path) if policy is not None else None,
        device=str(rs.device),
        total_seconds=time.perf_counter() - t_start,
        run_dir=str(rs.rundir.path),
        uptrain=uptrain,
    )


def format_train_summary(s: TrainSummary) -> str:
    """The table printed at the end of `loopgolf train`."""
    rows = [
        ("preset", s.preset),
        ("steps / train tokens", f"{s.steps:,} / {s.train_tokens:,}" + (f"  (resumed from step {s.resumed_from:,})" if s.resumed_from is not None else "")),
        ("train time / tokens per s", f"{s.train_seconds:.1f} s / {s.tokens_per_second:,.0f}"),
        ("final train loss", f"{s.final_train_loss:.4f}"),
        ("checkpoint", s.checkpoint),
        ("device / ranks", f"{s.device} x {s.world_size}"),
        ("next", f"loopgolf run --resume {s.run_dir}  (export + roundtrip eval; add --steps/--time to train longer)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def describe_eval_compute(e: dict[str, Any]) -> str:
    """One line for the summary's ``eval_compute``."""
    what = [f"{e['loops']} loops"] + ([f"TTT {e['ttt']}"] if e.get("ttt") else [])
    line = f"{e['val_bpb']:.4f}  ({', '.join(what)}; {e['eval_seconds']:.1f} s"
    if e.get("ttt"):
        line += f"; {e['val_bpb_without_ttt']:.4f} without TTT; {e['tokens_adapted']:,} tokens adapted"
        if e.get("adapting_stopped_at") is not None:
            line += f", adapting stopped at token {e['adapting_stopped_at']:,} (eval_time {e['eval_time']:g} s)"
    return line + ")"


def format_summary(s: RunSummary | dict[str, Any], run_dir: str | Path | None = None) -> str:
    """The table printed at the end of a run."""
    s = s.to_dict() if isinstance(s, RunSummary) else s
    rows = [
        ("preset", s["preset"]),
        ("plan", f"{s['plan']['spec']['kind']} V={s['plan']['virtual_layers']} (attn_of {s['plan']['attn_of']})"),
        ("params unique / effective", f"{s['unique_params']:,} / {s['effective_params']:,}"),
        ("steps / train tokens", f"{s['steps']:,} / {s['train_tokens']:,}"),
        ("train time / tokens per s", f"{s['train_seconds']:.1f} s / {s['tokens_per_second']:,.0f}"),
        ("val_bpb pre-export", f"{s['val_bpb_pre']:.4f}"),
        ("val_bpb post-roundtrip", f"{s['val_bpb_post']:.4f}  (gap {s['quant_gap_bpb']:+.4f})"),
        *([("val_bpb with eval compute", describe_eval_compute(s["eval_compute"]))] if s.get("eval_compute") else []),
        (
            "baseline xz bpb",
            "not measured"
            if s.get("baseline_xz_bpb") is None
            else f"{s['baseline_xz_bpb']:.4f}"
            + (f"  (approximate, {s.get('baseline_xz_unknown_targets', 0):,} unknown-piece targets)" if s.get("baseline_xz_approximate") else ""),
        ),
        (
            "artifact bytes",
            f"{s['model_bytes']:,} model ({s['codec']}) + {s['code_bytes']:,} code"
            + (f" ({s['code_form']})" if s.get("code_form", "plain") != "plain" else "")
            + f" = {s['artifact_bytes']:,}",
        ),
        ("cap", f"{s['cap_bytes']:,}: " + (f"fits, {s['headroom_bytes']:,} to spare" if s["fits"] else f"OVER by {-s['headroom_bytes']:,} bytes")),
        ("device / total time", f"{s['device']} / {s['total_seconds']:.1f} s"),
        ("run dir", str(run_dir if run_dir is not None else s.get("run_dir", ""))),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)

"""`loopgolf run`: data -> train -> export -> roundtrip eval -> summary.

Every run directory holds ``config.json`` (model + run config), ``log.jsonl`` (starting with
versions, config and hardware), the artifact and ``summary.json`` (the contract in DESIGN.md).
"""

from __future__ import annotations

import json
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
from loopgolf.config import Preset, TrainConfig, get_preset
from loopgolf.data.shards import TokenLoader, find_shards, load_tokens
from loopgolf.data.stats import find_tokenizer
from loopgolf.data.tokenizer import ByteTables, build_byte_tables, load_tokenizer
from loopgolf.evaluate import EvalResult, evaluate_bpb
from loopgolf.export.budget import DEFAULT_CAP_BYTES, CapReport, code_bytes
from loopgolf.export.pack import export_model, load_model
from loopgolf.model.gpt import GPT, ModelConfig, effective_params, unique_params
from loopgolf.train.trainer import resolve_device, train
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
    bits: int = 8
    stride: int | None = None  # sliding-window eval stride for the final scores
    device: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    progress: bool = True
    force: bool = False


@dataclass
class Dataset:
    """Shards, tokenizer and byte tables of one prepared dataset directory."""

    root: Path
    train_shards: list[Path]
    val_shards: list[Path]
    tokenizer_path: Path
    vocab_size: int
    tables: ByteTables

    @classmethod
    def open(cls, root: Path, tokenizer: Path | None = None) -> "Dataset":
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"data directory {root} does not exist")
        tok = Path(tokenizer) if tokenizer else find_tokenizer(root)
        if tok is None:
            raise ValueError(f"no tokenizer found for {root}: pass --tokenizer MODEL (a SentencePiece .model file)")
        sp = load_tokenizer(tok)
        vocab = sp.get_piece_size()
        return cls(root, find_shards(root, "train"), find_shards(root, "val"), tok, vocab, build_byte_tables(sp, vocab))

    def val_tokens(self) -> np.ndarray:
        return load_tokens(self.val_shards, vocab_size=self.vocab_size)


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


def build_configs(opts: RunOptions) -> Preset:
    preset = get_preset(opts.preset)
    model_cfg = ModelConfig.from_dict({**preset.model.to_dict(), **opts.model_overrides})
    train_kw = dict(opts.train_overrides)
    if opts.seed is not None:
        train_kw["seed"] = opts.seed
    if opts.time_budget is not None:
        train_kw["time_budget"] = opts.time_budget
    if opts.max_steps is not None:
        train_kw["max_steps"] = opts.max_steps
    if opts.device is not None:
        train_kw["device"] = opts.device
    train_cfg = TrainConfig(**{**asdict(preset.train), **train_kw})
    return Preset(preset.name, preset.description, model_cfg, train_cfg, preset.eval_batch_size)


def score(model: torch.nn.Module, ds: Dataset, tokens: np.ndarray, seq_len: int, device: torch.device, *, stride: int | None, batch_size: int, progress: bool) -> EvalResult:
    return evaluate_bpb(model, tokens, ds.tables, seq_len, stride=stride, batch_size=batch_size, device=device, progress=progress)


def run(opts: RunOptions) -> dict[str, Any]:
    """Execute one run and return its summary (also written to ``summary.json``)."""
    t_start = time.perf_counter()
    preset = build_configs(opts)
    data_dir, data_name = resolve_data(opts, preset.model.vocab_size)
    ds = Dataset.open(data_dir)
    model_cfg = preset.model
    if ds.vocab_size != model_cfg.vocab_size:
        if "vocab_size" in opts.model_overrides:
            raise ValueError(
                f"tokenizer {ds.tokenizer_path} has {ds.vocab_size} pieces but the model was asked for vocab_size "
                f"{model_cfg.vocab_size}: they must match"
            )
        model_cfg = ModelConfig.from_dict({**model_cfg.to_dict(), "vocab_size": ds.vocab_size})
    train_cfg = preset.train
    device = resolve_device(train_cfg.device)

    out = Path(opts.out) if opts.out else Path("runs") / f"{preset.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()) and not opts.force:
        raise ValueError(f"run directory {out} exists and is not empty (pass --force to overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    log_path.unlink(missing_ok=True)
    config = {"preset": preset.name, "data": data_name, "data_dir": str(data_dir), "model": model_cfg.to_dict(), "train": asdict(train_cfg), "cap_bytes": opts.cap_bytes, "codec": opts.codec, "bits": opts.bits, "eval_stride": opts.stride}
    atomic_write_json(out / "config.json", config)
    append_jsonl(log_path, {"event": "start", "time": datetime.now(timezone.utc).isoformat(), "argv": sys.argv, "env": environment(), "config": config})

    torch.manual_seed(train_cfg.seed)
    np.random.seed(train_cfg.seed % 2**32)
    model = GPT(model_cfg).to(device)
    n_unique, n_effective = unique_params(model), effective_params(model)
    say = print if opts.progress else (lambda *a, **k: None)
    say(f"loopgolf run: preset {preset.name} | {model.plan.describe()} | {n_unique:,} unique / {n_effective:,} effective params")
    say(f"data: {data_name} ({ds.root}) | device {device} | budget {train_cfg.time_budget}s / {train_cfg.max_steps} steps")

    loader = TokenLoader(ds.train_shards, train_cfg.seq_len, seed=train_cfg.seed, vocab_size=ds.vocab_size)
    val_tokens = ds.val_tokens()
    eval_bs = preset.eval_batch_size

    def validate(m: torch.nn.Module) -> dict:
        r = evaluate_bpb(m, val_tokens, ds.tables, train_cfg.seq_len, batch_size=eval_bs, max_tokens=train_cfg.val_max_tokens, device=device)
        return {"val_loss": r.val_loss, "val_bpb": r.val_bpb, "tokens": r.num_targets}

    result = train(model, loader, train_cfg, device=device, tied_embeddings=model_cfg.tie_embeddings, log_path=log_path, validate=validate, progress=opts.progress)

    pre = score(model, ds, val_tokens, train_cfg.seq_len, device, stride=opts.stride, batch_size=eval_bs, progress=opts.progress)
    append_jsonl(log_path, {"event": "eval_pre", **pre.to_dict()})

    n_code = code_bytes()
    artifact_path = out / ARTIFACT_NAME
    info = export_model(model, artifact_path, codec=opts.codec, bits=opts.bits, meta={"preset": preset.name, "seed": train_cfg.seed, "steps": result.steps, "seq_len": train_cfg.seq_len})
    cap = CapReport(model_bytes=info.total_bytes, code_bytes=n_code, cap_bytes=opts.cap_bytes)
    append_jsonl(log_path, {"event": "export", "codec": info.codec, **cap.to_dict()})

    reloaded, _ = load_model(artifact_path, device=device)
    post = score(reloaded, ds, val_tokens, train_cfg.seq_len, device, stride=opts.stride, batch_size=eval_bs, progress=opts.progress)
    append_jsonl(log_path, {"event": "eval_post", **post.to_dict()})

    from loopgolf.data.corpus import baseline_xz_bpb

    summary = {
        "val_bpb_pre": pre.val_bpb,
        "val_bpb_post": post.val_bpb,
        "val_loss_pre": pre.val_loss,
        "val_loss_post": post.val_loss,
        "quant_gap_bpb": post.val_bpb - pre.val_bpb,
        "baseline_xz_bpb": baseline_xz_bpb(data_dir),
        "artifact_bytes": cap.artifact_bytes,
        "model_bytes": cap.model_bytes,
        "code_bytes": cap.code_bytes,
        "cap_bytes": cap.cap_bytes,
        "headroom_bytes": cap.headroom,
        "fits": cap.fits,
        "codec": info.codec,
        "bits": opts.bits,
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
        "preset": preset.name,
        "seed": train_cfg.seed,
        "plan": model.plan.to_dict(),
        "data": data_name,
        "artifact": str(artifact_path),
        "total_seconds": time.perf_counter() - t_start,
        "loopgolf_version": loopgolf.__version__,
        "torch_version": torch.__version__,
    }
    atomic_write_json(out / "summary.json", summary)
    append_jsonl(log_path, {"event": "end", "total_seconds": summary["total_seconds"]})
    summary["run_dir"] = str(out)
    return summary


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
        ("baseline xz bpb", f"{s['baseline_xz_bpb']:.4f}"),
        ("artifact bytes", f"{s['model_bytes']:,} model ({s['codec']}) + {s['code_bytes']:,} code = {s['artifact_bytes']:,}"),
        ("cap", f"{s['cap_bytes']:,}: " + (f"fits, {s['headroom_bytes']:,} to spare" if s["fits"] else f"OVER by {-s['headroom_bytes']:,} bytes")),
        ("device / total time", f"{s['device']} / {s['total_seconds']:.1f} s"),
        ("run dir", s.get("run_dir", "")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def summary_json(s: dict[str, Any]) -> str:
    return json.dumps(s, indent=2)

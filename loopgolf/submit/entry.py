"""What a generated ``train_gpt.py`` runs: its baked configuration, changed by the environment
variables the official Parameter Golf script reads, through :func:`loopgolf.run.run`.

This module is embedded in every script (:mod:`loopgolf.codebytes`), so it imports only what
the run itself imports. Rank 0 prints the run's summary and the official closing lines; the run
directory (``OUT_DIR``, default ``runs/RUN_ID``) holds ``log.jsonl``, the artifact and
``summary.json`` as for ``loopgolf run``.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from loopgolf.config import OptimizerConfig, RunConfig, TrainConfig
from loopgolf.model.gpt import ModelConfig
from loopgolf.run import RunOptions, format_summary, run
from loopgolf.rundir import RunSummary

DEFAULT_SEED = 1337  # the official script's default SEED
# The seconds a script's test-time training may adapt for when its configuration sets no
# eval_time (TTT_EVAL_SECONDS changes it): the challenge gives evaluation 600 s of its own, and
# the roundtrip scoring before TTT needs some of them.
DEFAULT_TTT_SECONDS = 480.0
# The official script's variable names, and the loopgolf setting each one sets.
OFFICIAL_ENV: dict[str, tuple[str, str]] = {
    "ITERATIONS": ("train", "max_steps"),
    "MAX_WALLCLOCK_SECONDS": ("train", "time_budget"),  # 0: no time limit, as in the official script
    "TRAIN_BATCH_TOKENS": ("train", "batch_tokens"),
    "TRAIN_SEQ_LEN": ("train", "seq_len"),
    "WARMUP_STEPS": ("train", "warmup_steps"),
    "VAL_LOSS_EVERY": ("train", "val_every"),
    "TRAIN_LOG_EVERY": ("train", "log_every"),
    "GRAD_CLIP_NORM": ("train", "grad_clip"),
    "MATRIX_LR": ("optim", "matrix_lr"),
    "SCALAR_LR": ("optim", "scalar_lr"),
    "TIED_EMBED_LR": ("optim", "embed_lr"),
    "EMBED_LR": ("optim", "untied_embed_lr"),
    "HEAD_LR": ("optim", "head_lr"),
    "BETA1": ("optim", "beta1"),
    "BETA2": ("optim", "beta2"),
    "ADAM_EPS": ("optim", "adam_eps"),
    "MUON_MOMENTUM": ("optim", "muon_momentum"),
    "MUON_MOMENTUM_WARMUP_START": ("optim", "muon_momentum_warmup_start"),
    "MUON_MOMENTUM_WARMUP_STEPS": ("optim", "muon_momentum_warmup_steps"),
    "MUON_BACKEND_STEPS": ("optim", "muon_backend_steps"),
    "VOCAB_SIZE": ("model", "vocab_size"),
    "MODEL_DIM": ("model", "model_dim"),
    "NUM_HEADS": ("model", "num_heads"),
    "NUM_KV_HEADS": ("model", "num_kv_heads"),
    "MLP_MULT": ("model", "mlp_mult"),
    "TIE_EMBEDDINGS": ("model", "tie_embeddings"),
    "ROPE_BASE": ("model", "rope_base"),
    "LOGIT_SOFTCAP": ("model", "logit_softcap"),
    "QK_GAIN_INIT": ("model", "qk_gain_init"),
    "TIED_EMBED_INIT_STD": ("model", "tied_embed_init_std"),
}
_SECTIONS = {"train": TrainConfig, "optim": OptimizerConfig, "model": ModelConfig}


def _parse(var: str, text: str, default: Any) -> Any:
    """An environment value in the type of the setting's default (JSON for anything else)."""
    try:
        if isinstance(default, bool):
            if text.strip().lower() not in ("0", "1", "true", "false"):
                raise ValueError
            return text.strip().lower() in ("1", "true")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        return json.loads(text)
    except ValueError:
        raise ValueError(f"{var}={text!r} is not a valid value for a setting whose default is {default!r}") from None


def _field_default(section: str, name: str) -> Any:
    for f in fields(_SECTIONS[section]):
        if f.name == name:
            return f.default
    raise AssertionError(f"{section}.{name} is not a loopgolf setting")  # OFFICIAL_ENV is checked by the tests


def _overrides(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model, train)`` changes from ``LOOPGOLF_OVERRIDES``: ``{"train": {...}, "model": {...}}``
    (``train.optim`` a dict of optimizer fields)."""
    try:
        extra = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"LOOPGOLF_OVERRIDES is not valid JSON ({type(e).__name__}: {str(e)[:100]})") from None
    shape = 'LOOPGOLF_OVERRIDES must be a JSON object {"train": {...}, "model": {...}}'
    if not isinstance(extra, dict) or set(extra) - {"train", "model"} or not all(isinstance(v, dict) for v in extra.values()):
        raise ValueError(shape)
    train = dict(extra.get("train", {}))
    if "optim" in train and not isinstance(train["optim"], dict):
        raise ValueError(shape + ', with "optim" an object of optimizer fields')
    return dict(extra.get("model", {})), train


def options_from_env(config: dict[str, Any], env: Mapping[str, str]) -> RunOptions:
    """The run a script with baked ``config`` makes under ``env``."""
    seed = _parse("SEED", env["SEED"], 0) if env.get("SEED") else DEFAULT_SEED
    base = RunConfig.from_dict({**config, "train": {**config["train"], "seed": seed, "device": "auto"}})
    current = {"train": base.train, "optim": base.train.optim, "model": base.model}
    model: dict[str, Any] = {}
    train: dict[str, Any] = {}
    targets = {"train": train, "optim": {}, "model": model}
    for var, (section, name) in OFFICIAL_ENV.items():
        if env.get(var):
            now = getattr(current[section], name)
            value = _parse(var, env[var], now if now is not None else _field_default(section, name))
            if var in ("MAX_WALLCLOCK_SECONDS", "ITERATIONS") and value == 0:
                value = None  # 0 turns that limit off
            targets[section][name] = value
    if targets["optim"]:
        train["optim"] = targets["optim"]
    if env.get("LOOPGOLF_OVERRIDES"):
        extra_model, extra_train = _overrides(env["LOOPGOLF_OVERRIDES"])
        optim = {**train.get("optim", {}), **extra_train.pop("optim", {})}
        train.update(extra_train)
        if optim:
            train["optim"] = optim
        model.update(extra_model)
    data = Path(env.get("DATA_PATH") or f"./data/datasets/fineweb10B_sp{model.get('vocab_size', base.model.vocab_size)}")
    out = Path(env.get("OUT_DIR") or Path("runs") / (env.get("RUN_ID") or str(uuid.uuid4())))
    eval_time = None
    if base.eval.ttt is not None and base.eval.eval_time is None:
        # Test-time training must end inside the challenge's separate evaluation budget.
        eval_time = _parse("TTT_EVAL_SECONDS", env["TTT_EVAL_SECONDS"], 0.0) if env.get("TTT_EVAL_SECONDS") else DEFAULT_TTT_SECONDS
    return RunOptions(
        base=base,
        eval_time=eval_time,
        data=data,
        tokenizer=Path(env["TOKENIZER_PATH"]) if env.get("TOKENIZER_PATH") else None,
        out=out,
        device=env.get("DEVICE") or None,
        model_overrides=model,
        train_overrides=train,
        progress=env.get("PROGRESS", "0") not in ("", "0"),
        xz_baseline=False,
    )


def main(config: dict[str, Any], *, code_path: str, code_id: str, env: Mapping[str, str] | None = None) -> int:
    """Train, export and score; the exit status is 0, 2 for bad settings or data, 3 over the cap."""
    env = os.environ if env is None else env
    try:
        opts = options_from_env(config, env)
        opts.code = (os.path.getsize(code_path), code_id)  # this file is the counted code
        outcome = run(opts)
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"train_gpt.py: error: {e}", file=sys.stderr)
        return 2
    s = outcome.summary
    if not isinstance(s, RunSummary):  # ranks other than 0
        return 0
    print(format_summary(s, outcome.run_dir))
    print(f"final_roundtrip_exact val_loss:{s.val_loss_post:.8f} val_bpb:{s.val_bpb_post:.8f}")
    if s.eval_compute is not None:  # the score with the configured evaluation compute: the submission's result
        e = s.eval_compute
        print(f"final_eval_compute_exact loops:{e['loops']} ttt:{e['ttt'] or 'off'} val_loss:{e['val_loss']:.8f} val_bpb:{e['val_bpb']:.8f}")
    print(f"Total submission size: {s.artifact_bytes} bytes (model {s.model_bytes} + code {s.code_bytes})")
    return 0 if s.fits else 3

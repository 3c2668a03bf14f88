"""Training checkpoints for exact resume.

One file, ``checkpoint.pt`` in the run directory, holds everything the next step depends on:
model parameters, optimizer states (Adam moments and step counts, Muon momentum buffers), the
weight averages of a run with ``ema_decay`` (key ``ema``, absent otherwise), the loader's stream
position, the torch/CUDA/numpy/Python RNG states, and the loop's own state (step,
training seconds used, tokens, recurrence-stage starts, the loss history and the length of
``log.jsonl`` at that moment). With the same configuration and data, a resumed CPU run repeats
the uninterrupted run's losses exactly; the wallclock budget continues from the seconds used.

The file is written to a temporary sibling and renamed over the old one, so a reader (or a run
killed mid-write) only ever sees the previous complete checkpoint or the new complete one.

Container (all integers little-endian), a fixed 52-byte header and then the payload:

    magic     8 bytes   b"LGCKPT\r\n" (the CR LF catches a file mangled by newline translation)
    version   u32       FORMAT_VERSION (2; also the payload dict's "format")
    length    u64       payload length in bytes; the file is exactly header + length bytes
    sha256    32 bytes  of the payload
    payload   length bytes: ``torch.save`` of the checkpoint dict

:func:`read_checkpoint` opens only regular files, checks the header and the file size before
reading the payload, and verifies the digest before anything is unpickled; a flipped bit, a
truncated file or trailing bytes are refused as corrupted, never resumed from. Only then is the
payload loaded with ``torch.load(weights_only=True)``: tensors and plain Python data only, no code
runs. Format 1 files (a bare ``torch.save`` zip, no digest) cannot be verified and are refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from loopgolf.checks import added_later_defaults
from loopgolf.config import OptimizerConfig, TrainConfig, may_change_on_resume
from loopgolf.data.shards import TokenLoader
from loopgolf.model.gpt import ModelConfig
from loopgolf.train.ema import WeightEMA
from loopgolf.util import atomic_write_bytes

FORMAT_VERSION = 2
CHECKPOINT_NAME = "checkpoint.pt"  # its name in a run directory (loopgolf.rundir uses this one)
MAGIC = b"LGCKPT\r\n"
_HEADER = struct.Struct("<8sIQ32s")  # magic, version, payload length, sha256 of the payload
HEADER_SIZE = _HEADER.size  # 52
_LEGACY_PREFIX = b"PK\x03\x04"  # format 1: torch.save's zip archive written bare
# Train-config fields a resumed run may change (marked on TrainConfig): the budget (to extend
# training), where it runs, and compilation. Anything else would make the continuation a different run.
RESUMABLE_TRAIN_CHANGES = tuple(f.name for f in fields(TrainConfig) if may_change_on_resume(f))


@dataclass
class TrainState:
    """The training loop's own state between steps."""

    step: int = 0
    elapsed: float = 0.0  # training seconds used (validation and checkpointing excluded)
    tokens: int = 0
    stage_steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    val_history: list[dict] = field(default_factory=list)
    log_bytes: int | None = None  # length of log.jsonl when the checkpoint was taken

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class CheckpointPolicy:
    """When and where ``train`` writes checkpoints."""

    path: Path
    every: int = 0  # steps between checkpoints; 0: only the final one
    final: bool = True  # also write one when the budget ends
    config: dict[str, Any] = field(default_factory=dict)  # the run's model/train config, stored for resume checks

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.every < 0:
            raise ValueError(f"checkpoint interval must be >= 0 steps, got {self.every}")


# ------------------------------------------------------------------ model weights


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and persistent buffers, detached."""
    return {n: t.detach() for n, t in model.state_dict(keep_vars=True).items()}


def check_state_matches(own: dict[str, Tensor], state: dict[str, Tensor], where: str = "checkpoint") -> None:
    """Raise ValueError unless ``state`` has exactly the names and shapes of ``own`` (a model's
    state dict, meta tensors allowed); ``where`` names the file in the message."""
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{where} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in own.items():
        if t.shape != state[name].shape:
            raise ValueError(f"{where} tensor {name} has shape {tuple(state[name].shape)}, the model's is {tuple(t.shape)}")


def load_model_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` into the model's tensors (strict: same names and shapes)."""
    own = model.state_dict(keep_vars=True)
    check_state_matches(own, state)
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(state[name])


# ---------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # resumed on another GPU count: this process's device gets device 0's stream
            torch.cuda.set_rng_state(cuda_states[0])


# --------------------------------------------------------------------- save / load


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    loader: TokenLoader,
    state: TrainState,
    config: dict[str, Any] | None = None,
    hook_state: Any = None,
    ema_state: dict[str, Tensor] | None = None,
) -> int:
    """Write a checkpoint atomically; return its size in bytes. Call on one rank only: the
    optimizer states (and weight averages) are identical on every rank."""
    path = Path(path)
    payload = {
        "format": FORMAT_VERSION,
        "model": model_state(model),
        "optimizers": [opt.state_dict() for opt in optimizers],
        "loader": loader.state_dict(),
        "rng": rng_state(),
        "train": asdict(state),
        "config": config or {},
        "hook": hook_state,
    }
    if ema_state is not None:  # only then: a run without averages writes what it always wrote
        payload["ema"] = ema_state
    return _write_payload(path, payload)


def save_weights(path: str | Path, state: dict[str, Tensor], config: dict[str, Any]) -> int:
    """Write a weights-only checkpoint (step 0, no optimizer or loader state), in the same
    verified format: what `loopgolf convert` leaves for `train --init-from`. It cannot be
    resumed (there is no run to continue), only started from."""
    payload = {
        "format": FORMAT_VERSION,
        "model": {k: v.detach().cpu() for k, v in state.items()},
        "optimizers": [],
        "loader": None,
        "rng": None,
        "train": asdict(TrainState()),
        "config": config,
        "hook": None,
        "weights_only": True,
    }
    return _write_payload(Path(path), payload)


def _write_payload(path: Path, payload: dict[str, Any]) -> int:
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    blob = _HEADER.pack(MAGIC, FORMAT_VERSION, len(data), hashlib.sha256(data).digest()) + data
    # A writer killed between creating its temporary file and the rename leaves that file
    # behind; it is never the checkpoint, so clear such leftovers before writing a new one.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    atomic_write_bytes(path, blob)
    return len(blob)


def _read_verified_payload(path: Path) -> bytes:
    """The payload bytes of the checkpoint at ``path`` once its header, size and digest check out."""
    try:
        st = os.stat(path)  # stat, not open: opening a FIFO would wait for a writer
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"no checkpoint at {path}: train with --checkpoint-every N (or `loopgolf train`) first") from None
    except OSError as e:
        raise ValueError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    not_regular = f"{path} is not a regular file; a checkpoint is the {CHECKPOINT_NAME} file a run writes (or its run directory)"
    if not stat.S_ISREG(st.st_mode):  # a FIFO, socket or device would block or never end
        raise ValueError(not_regular)
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO since the stat, opening it cannot hang.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise ValueError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(not_regular)
        size = st.st_size
        head = f.read(HEADER_SIZE)
        if head.startswith(_LEGACY_PREFIX):
            raise ValueError(
                f"{path} was written by an older loopgolf (checkpoint format 1) without an integrity digest and "
                f"cannot be verified; refusing to resume from it (retrain, or resume it with the loopgolf that wrote it)"
            )
        if not head.startswith(MAGIC):
            raise ValueError(f"{path} is not a loopgolf checkpoint (it does not start with {MAGIC!r}), or its header is corrupted")
        if len(head) < HEADER_SIZE:
            raise ValueError(f"checkpoint {path} is corrupted: truncated inside its {HEADER_SIZE}-byte header ({size} bytes); refusing to resume from it")
        _, version, length, digest = _HEADER.unpack(head)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"checkpoint {path} has format {version}, this loopgolf reads format {FORMAT_VERSION} "
                f"(written by another loopgolf version, or its header is corrupted); refusing to resume from it"
            )
        if size != HEADER_SIZE + length:
            what = "truncated" if size < HEADER_SIZE + length else f"{size - HEADER_SIZE - length} trailing bytes"
            raise ValueError(
                f"checkpoint {path} is corrupted ({what}): its header declares {length} payload bytes, "
                f"the file holds {size - HEADER_SIZE}; refusing to resume from it"
            )
        data = f.read(length + 1)  # one byte more: a file that grew since the fstat is caught too
    if len(data) != length:
        raise ValueError(f"checkpoint {path} is corrupted: it changed size while being read; refusing to resume from it")
    if hashlib.sha256(data).digest() != digest:
        raise ValueError(f"checkpoint {path} is corrupted: the sha256 of its payload does not match the digest in its header; refusing to resume from it")
    return data


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file, or a run directory's ``checkpoint.pt`` (tensors on the CPU).
    Raises ValueError for anything that is not a complete, intact loopgolf checkpoint: the
    digest is verified before anything is unpickled."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    data = _read_verified_payload(path)
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # an intact digest over a payload that is not a torch.save archive
        raise ValueError(f"{path} is not a readable loopgolf checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a loopgolf checkpoint of format {FORMAT_VERSION}")
    return ckpt


def check_resumable(ckpt: dict[str, Any], model_config: dict[str, Any], train_config: dict[str, Any]) -> None:
    """A checkpoint continues only the run that wrote it: same model, same training recipe
    (the budget, device and compilation may change)."""
    if ckpt.get("weights_only"):
        raise ValueError("this checkpoint holds start weights only (from `loopgolf convert`): train from it with --init-from DIR, it has no run to resume")
    saved = ckpt.get("config") or {}
    saved_model = {**added_later_defaults(ModelConfig), **saved["model"]} if isinstance(saved.get("model"), dict) else saved.get("model")
    model_config = {**added_later_defaults(ModelConfig), **model_config}
    if "model" in saved and saved_model != model_config:
        diff = sorted(k for k in set(saved_model) | set(model_config) if saved_model.get(k) != model_config.get(k))
        raise ValueError(f"checkpoint was written for a different model (fields {diff} differ)")
    if "train" in saved:
        saved_train, train_config = _with_added_defaults(saved["train"]), _with_added_defaults(train_config)
        diff = sorted(k for k in set(saved_train) | set(train_config) if k not in RESUMABLE_TRAIN_CHANGES and saved_train.get(k) != train_config.get(k))
        if diff:
            raise ValueError(f"checkpoint was written with different training settings {diff}; only {', '.join(RESUMABLE_TRAIN_CHANGES)} may change on resume")


def _with_added_defaults(train: Any) -> Any:
    """A stored train config (a dict) with the fields added to TrainConfig and OptimizerConfig
    since it was written filled in with their defaults, which mean the behaviour it ran with: a
    checkpoint from before a field existed still resumes."""
    if not isinstance(train, dict):
        return train
    out = {**added_later_defaults(TrainConfig), **train}
    if isinstance(out.get("optim"), dict):
        out["optim"] = {**added_later_defaults(OptimizerConfig), **out["optim"]}
    return out


def restore_checkpoint(
    ckpt: dict[str, Any],
    *,
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    loader: TokenLoader,
    restore_rng: bool = True,
) -> TrainState:
    """Put model, optimizers, loader and RNGs back where the checkpoint left them (the weight
    averages: :func:`restore_ema`)."""
    load_model_state(model, ckpt["model"])
    saved_opts = ckpt["optimizers"]
    if len(saved_opts) != len(optimizers):
        raise ValueError(f"checkpoint has {len(saved_opts)} optimizer state(s), this run builds {len(optimizers)}")
    for opt, sd in zip(optimizers, saved_opts):
        opt.load_state_dict(sd)
    loader.load_state_dict(ckpt["loader"])
    if restore_rng:
        set_rng_state(ckpt["rng"])
    return TrainState.from_dict(ckpt["train"])


def restore_ema(ckpt: dict[str, Any], ema: WeightEMA) -> None:
    """Put the checkpoint's weight averages into ``ema`` (a run with ``ema_decay``)."""
    if ckpt.get("ema") is None:
        raise ValueError("the checkpoint holds no weight averages but this run keeps them (ema_decay is set): it was written by another run")
    ema.load_state_dict(ckpt["ema"])

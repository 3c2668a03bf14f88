"""The run directory: the one module that knows its file names and reads and writes them.

A run directory holds

    config.json     the run's :class:`~loopgolf.config.RunConfig`, written when the run starts
    log.jsonl       one JSON object per line: a ``start`` record (argv, environment, world size,
                    config), training and validation records, ``eval_pre``, ``export``,
                    ``eval_post``, ``end`` (or ``error`` when the run failed)
    checkpoint.pt   when checkpoints were asked for (``--checkpoint-every``, ``loopgolf train``)
    artifact.lgz    the exported model (code bytes are counted, not stored here)
    summary.json    the :class:`RunSummary`, written last: a directory with one is finished
    .lock           held (``flock``) by the process running it, so two never run it at once

A ``loopgolf convert`` directory is the same kind of directory with only ``config.json`` (the
model config and how it was made), ``checkpoint.pt`` (weights only) and ``convert.json``.

Every other module reads and writes these files through :class:`RunDir`, so what a run wrote is
checked where it is read: a summary is a :class:`RunSummary` (every result present, typed and
finite), a config a :class:`RunConfig`, a log a list of JSON objects; anything else is a
``ValueError`` naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loopgolf.checks import ADDED_LATER, check_types, required_fields
from loopgolf.config import RunConfig
from loopgolf.model.gpt import ModelConfig
from loopgolf.util import append_jsonl, atomic_write_json

CONFIG_NAME = "config.json"
SUMMARY_NAME = "summary.json"
LOG_NAME = "log.jsonl"
ARTIFACT_NAME = "artifact.lgz"
CONVERT_REPORT_NAME = "convert.json"
LOCK_NAME = ".lock"
LOCK_TRIES = 5  # 50 ms apart
# Files bigger than this are not a config, summary or log loopgolf wrote (a log of a long run is
# a few MB); refusing them keeps a stray multi-GB file from being read into memory.
MAX_JSON_BYTES = 256 * 2**20


class RunDirError(ValueError):
    """A run directory, or one of its files, is not what loopgolf wrote."""


class RunDirLocked(RunDirError):
    """Another process holds the run directory's lock (it is running it)."""


@dataclass
class RunSummary:
    """What ``summary.json`` holds: the scores, bytes, sizes and timings of a finished run."""

    val_bpb_pre: float
    val_bpb_post: float
    val_loss_pre: float
    val_loss_post: float
    quant_gap_bpb: float
    baseline_xz_bpb: float | None  # lzma -9 on the validation text: a reference, not a model
    baseline_xz_approximate: bool | None  # decoded from the shards: tokenizer-normalized text
    baseline_xz_unknown_targets: int | None
    artifact_bytes: int  # model_bytes + code_bytes: what the cap counts
    model_bytes: int
    code_bytes: int  # the train_gpt.py this configuration generates, in code_form (loopgolf.codebytes)
    code_id: str  # sha256 of that script's embedded sources and configuration
    code_bytes_scoring: int | None  # the scoring path's source alone, for information
    cap_bytes: int
    headroom_bytes: int
    fits: bool
    codec: str
    quant: str
    qat: dict[str, Any]
    export: dict[str, Any]  # per-tensor schemes and bytes (ArtifactInfo.to_summary)
    unique_params: int
    effective_params: int
    train_tokens: int
    train_seconds: float
    tokens_per_second: float
    steps: int
    stage_steps: list[int]
    final_train_loss: float | None
    val_targets: int
    val_target_bytes: int
    eval_seq_len: int
    eval_stride: int | None
    device: str
    world_size: int
    resumed_from: int | None
    preset: str
    seed: int
    plan: dict[str, Any]
    data: str
    artifact: str
    total_seconds: float
    loopgolf_version: str
    torch_version: str
    uptrain: dict[str, Any] | None = field(default=None, metadata=ADDED_LATER)
    eval_compute: dict[str, Any] | None = field(default=None, metadata=ADDED_LATER)  # loops / test-time training on the roundtrip model
    code_form: str = field(default="plain", metadata=ADDED_LATER)  # the form of train_gpt.py code_bytes counts (config.CODE_FORMS)

    def __post_init__(self) -> None:
        check_types(self, "summary")
        for name in (
            "artifact_bytes",
            "model_bytes",
            "code_bytes",
            "cap_bytes",
            "steps",
            "train_tokens",
            "val_targets",
            "val_target_bytes",
            "world_size",
            "unique_params",
        ):
            if getattr(self, name) < 0 or (name in ("cap_bytes", "world_size") and getattr(self, name) < 1):
                raise ValueError(
                    f"summary {name} must be a {'positive' if name in ('cap_bytes', 'world_size') else 'non-negative'} integer, got {getattr(self, name)}"
                )
        if self.artifact_bytes != self.model_bytes + self.code_bytes:
            raise ValueError(f"summary artifact_bytes {self.artifact_bytes:,} is not model_bytes + code_bytes ({self.model_bytes:,} + {self.code_bytes:,})")
        if self.headroom_bytes != self.cap_bytes - self.artifact_bytes or self.fits != (self.headroom_bytes >= 0):
            raise ValueError("summary headroom_bytes and fits do not agree with cap_bytes and artifact_bytes")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "summary") -> RunSummary:
        if not isinstance(d, dict):
            raise ValueError(f"{where} must hold a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in required_fields(cls) if n not in d)
        unknown = sorted(set(d) - names)
        if missing or unknown:
            raise ValueError(f"{where} is not a summary this loopgolf writes: missing {missing}, unknown {unknown} (made by another version? rerun it)")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @property
    def step_avg_ms(self) -> float:
        return 1000.0 * self.train_seconds / max(self.steps, 1)


@dataclass
class TrainSummary:
    """What ``loopgolf train`` (training only, no export) reports; also what ranks other than 0
    return under torchrun."""

    rank: int
    world_size: int
    preset: str
    seed: int
    steps: int
    train_tokens: int
    train_seconds: float
    tokens_per_second: float
    final_train_loss: float | None
    stage_steps: list[int]
    resumed_from: int | None
    checkpoint: str | None
    device: str
    total_seconds: float
    run_dir: str
    uptrain: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunDir:
    """A run (or convert) directory and its files. Only this class opens them."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    # ------------------------------------------------------------------ paths

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_NAME

    @property
    def log_path(self) -> Path:
        return self.path / LOG_NAME

    @property
    def checkpoint_path(self) -> Path:
        from loopgolf.train.checkpoint import CHECKPOINT_NAME  # the checkpoint container owns its name

        return self.path / CHECKPOINT_NAME

    @property
    def artifact_path(self) -> Path:
        return self.path / ARTIFACT_NAME

    @property
    def convert_report_path(self) -> Path:
        return self.path / CONVERT_REPORT_NAME

    # ------------------------------------------------------------------ state

    @property
    def finished(self) -> bool:
        """A summary is written last, so its presence means the run finished."""
        return self.summary_path.is_file()

    def is_empty(self) -> bool:
        return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))

    # ------------------------------------------------------------------ reading

    def _read_json(self, path: Path) -> Any:
        try:
            if not path.is_file():
                raise RunDirError(f"{path} is not a regular file")
            if path.stat().st_size > MAX_JSON_BYTES:
                raise RunDirError(f"{path} is {path.stat().st_size:,} bytes, more than any file loopgolf writes there")
            return json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise RunDirError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None

    def read_config(self) -> RunConfig:
        """The run's configuration (``config.json``)."""
        if not self.config_path.is_file():
            raise RunDirError(f"{self.path} has no {CONFIG_NAME}: not a loopgolf run directory (one written by `loopgolf run` or `loopgolf train`)")
        raw = self._read_json(self.config_path)
        try:
            return RunConfig.from_dict(raw)
        except (ValueError, TypeError) as e:
            raise RunDirError(f"{self.config_path}: {e}") from None

    def read_model_config(self) -> tuple[ModelConfig, str]:
        """``(model config, kind)`` of a run directory (kind ``run``) or a convert directory
        (kind ``convert``): both keep it under ``model`` in ``config.json``."""
        raw = self._read_json(self.config_path) if self.config_path.is_file() else None
        if not isinstance(raw, dict) or "model" not in raw:
            raise RunDirError(f"{self.path} has no loopgolf {CONFIG_NAME} with a model (expected a run or `loopgolf convert` directory)")
        try:
            return ModelConfig.from_dict(raw["model"]), "convert" if "convert" in raw else "run"
        except (ValueError, TypeError, RecursionError) as e:
            raise RunDirError(f"{self.config_path}: {e}") from None

    def read_convert(self) -> dict[str, Any] | None:
        """How a ``loopgolf convert`` directory was made (the ``convert`` part of its
        ``config.json``: source, plan, init, ranks...), or None for any other directory."""
        if not self.config_path.is_file():
            return None
        raw = self._read_json(self.config_path)
        made = raw.get("convert") if isinstance(raw, dict) else None
        return made if isinstance(made, dict) else None

    def read_summary(self) -> RunSummary:
        """The finished run's summary, checked (every result present, typed and finite)."""
        if not self.summary_path.is_file():
            raise RunDirError(f"{self.path} has no {SUMMARY_NAME}: the run has not finished (run `loopgolf run --resume {self.path}` on it)")
        return RunSummary.from_dict(self._read_json(self.summary_path), where=str(self.summary_path))

    def read_log(self) -> list[dict[str, Any]]:
        """Every record of ``log.jsonl`` (a ``ValueError`` naming the line for one that is not a
        JSON object; a last line cut short by a kill is dropped)."""
        if not self.log_path.is_file():
            raise RunDirError(f"{self.path} has no {LOG_NAME}")
        if self.log_path.stat().st_size > MAX_JSON_BYTES:
            raise RunDirError(f"{self.log_path} is larger than any log loopgolf writes")
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").split("\n")
        records = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                if i == len(lines):  # no newline after it: a write cut short
                    break
                raise RunDirError(f"{self.log_path}, line {i}: not valid JSON") from None
            if not isinstance(rec, dict):
                raise RunDirError(f"{self.log_path}, line {i}: a log record must be a JSON object, got {type(rec).__name__}")
            records.append(rec)
        return records

    def environment(self, records: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """The ``env`` of the log's start record (versions and hardware), if there is one; from
        ``records`` when the caller has already read the log."""
        if records is None:
            try:
                records = self.read_log()
            except (RunDirError, OSError):
                return None
        env = records[0].get("env") if records and records[0].get("event") == "start" else None
        return env if isinstance(env, dict) else None

    def read_checkpoint(self) -> dict[str, Any]:
        from loopgolf.train.checkpoint import read_checkpoint

        return read_checkpoint(self.checkpoint_path)

    def load_artifact(self, device: Any = "cpu"):
        """``(GPT, LoadedArtifact)`` from this run's artifact."""
        from loopgolf.export.pack import load_model

        if not self.artifact_path.is_file():
            raise RunDirError(f"{self.path} has no {ARTIFACT_NAME} (is the run finished?)")
        return load_model(self.artifact_path, device=device)

    # ------------------------------------------------------------------ writing

    def write_config(self, config: RunConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.config_path, config.to_dict())

    def write_summary(self, summary: RunSummary) -> None:
        atomic_write_json(self.summary_path, summary.to_dict())

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to ``log.jsonl``."""
        append_jsonl(self.log_path, record)

    def start_log(self, record: dict[str, Any]) -> None:
        """A new log whose first record is ``record`` (a fresh start)."""
        self.log_path.unlink(missing_ok=True)
        self.log(record)

    def write_convert(self, model: ModelConfig, state: dict, made: dict[str, Any], report: dict[str, Any]) -> None:
        """A ``loopgolf convert`` directory: weights-only checkpoint, the report, then the config
        (last: a directory holding it is complete)."""
        from loopgolf.train.checkpoint import save_weights

        self.path.mkdir(parents=True, exist_ok=True)
        for stale in (self.config_path, self.checkpoint_path, self.convert_report_path):
            stale.unlink(missing_ok=True)
        save_weights(self.checkpoint_path, state, {"model": model.to_dict()})
        atomic_write_json(self.convert_report_path, {**made, **report})
        atomic_write_json(self.config_path, {"model": model.to_dict(), "convert": made})

    def clear_stale(self, *, fresh: bool) -> None:
        """Remove what an earlier run here left that this one will replace: its summary and
        artifact (and, for a fresh start over it with --force, its checkpoint), so a run killed
        early never leaves a directory claiming results it does not have; and the ``.*.tmp``
        files of writes that were killed before their rename."""
        for path in (self.summary_path, self.artifact_path) + ((self.checkpoint_path,) if fresh else ()):
            path.unlink(missing_ok=True)
        for tmp in self.path.glob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)

    def copy_log(self, dest: Path) -> None:
        """Copy ``log.jsonl`` to ``dest``; only a regular file inside this directory is copied."""
        src = self.log_path
        if src.is_symlink() or not src.is_file():
            raise RunDirError(f"{src} is not a regular file inside the run directory")
        dest.write_bytes(src.read_bytes())

    # ------------------------------------------------------------------ locking

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold this directory's lock for the block: a second process asking for it gets a
        ``RunDirLocked`` (a ``RunDirError``) at once (where the OS has ``flock``; elsewhere nothing is locked)."""
        try:
            import fcntl
        except ImportError:  # not on POSIX
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # A few tries: locked_elsewhere() holds the lock for an instant when it probes a free one.
            for attempt in range(LOCK_TRIES):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt == LOCK_TRIES - 1:
                        raise RunDirLocked(f"{self.path} is in use by another loopgolf process (it holds {self.path / LOCK_NAME})") from None
                    time.sleep(0.05)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def locked_elsewhere(self) -> bool:
        """Whether another process holds this directory's lock now."""
        try:
            import fcntl
        except ImportError:
            return False
        path = self.path / LOCK_NAME
        if not path.is_file():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

"""Open a model to score or serve it, with the data and tokenizer it belongs to: the one helper
behind ``eval``, ``eval --early-exit``, ``generate``, ``serve`` and ``bench serve``.

A model is any of:

- an artifact file (what a finished run scores: the int roundtrip),
- a run directory: its ``artifact.lgz`` when the run finished, else its ``checkpoint.pt``
  (``loopgolf train``, or a run stopped before export: the float weights),
- a ``loopgolf convert`` directory (the converted weights, before any uptraining: the paper's
  first sanity check),
- a checkpoint file (``checkpoint.pt``; the model config travels inside it).

The data defaults to the one the run trained on (its ``config.json``), and the tokenizer to the
one next to that data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopgolf.data.dataset import Dataset
from loopgolf.data.stats import find_tokenizer
from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.rundir import ARTIFACT_NAME, RunDir

DEFAULT_SEQ_LEN = 1024  # the official evaluation window, for a model that does not say its own


@dataclass
class OpenedModel:
    """A model ready to score, and what is known about where it came from."""

    model: GPT
    path: Path  # the file the weights came from
    origin: str  # artifact | checkpoint | convert
    seq_len: int  # the context it was trained at (the default evaluation window)
    name: str  # what a server calls it
    data_dir: Path | None  # the data its run trained on, when known and present
    file_bytes: int | None = None  # the artifact's size
    codec: str | None = None  # the artifact's codec


def _run_dir_of(path: Path) -> RunDir | None:
    """The run directory a file sits in (an artifact or checkpoint inside a run), if it is one."""
    rundir = RunDir(path.parent)
    return rundir if rundir.config_path.is_file() else None


def _data_dir(rundir: RunDir | None) -> Path | None:
    if rundir is None:
        return None
    try:
        config = rundir.read_config()
    except ValueError:
        return None  # a convert directory, or a config from elsewhere: no data recorded
    if config.data is None or not Path(config.data.dir).is_dir():
        return None
    return Path(config.data.dir)


def _trained_seq_len(rundir: RunDir | None, model_cfg: ModelConfig) -> int:
    if rundir is not None:
        try:
            return rundir.read_config().train.seq_len
        except ValueError:
            pass
    return min(DEFAULT_SEQ_LEN, model_cfg.max_seq_len)


def _from_checkpoint(path: Path, device: Any, origin: str) -> tuple[GPT, int | None]:
    from loopgolf.train.checkpoint import load_model_state, read_checkpoint

    ckpt = read_checkpoint(path)
    model_dict = (ckpt.get("config") or {}).get("model")
    if not isinstance(model_dict, dict):
        raise ValueError(f"{path} does not record its model config")
    cfg = ModelConfig.from_dict(model_dict)
    model = GPT(cfg)
    load_model_state(model, ckpt["model"])
    train = (ckpt.get("config") or {}).get("train")
    seq_len = train.get("seq_len") if isinstance(train, dict) else None
    return model.to(device).eval(), seq_len if isinstance(seq_len, int) else None


def open_model(path: str | Path, device: Any = "cpu") -> OpenedModel:
    """The model at ``path`` (see the module docstring), in eval mode on ``device``."""
    from loopgolf.export.pack import load_model

    path = Path(path)
    if path.is_dir():
        rundir = RunDir(path)
        if rundir.artifact_path.is_file():
            return open_model(rundir.artifact_path, device)
        if rundir.checkpoint_path.is_file():
            origin = "convert" if rundir.convert_report_path.is_file() else "checkpoint"
            model, seq_len = _from_checkpoint(rundir.checkpoint_path, device, origin)
            return OpenedModel(model, rundir.checkpoint_path, origin, seq_len or _trained_seq_len(rundir, model.config), path.name, _data_dir(rundir))
        raise ValueError(
            f"{path} holds neither {ARTIFACT_NAME} nor {rundir.checkpoint_path.name}: give an artifact, a run directory, "
            "a `loopgolf convert` directory or a checkpoint"
        )
    if not path.exists():
        raise ValueError(f"no model at {path}")
    rundir = _run_dir_of(path)
    if path.suffix == ".pt":  # a checkpoint file (a run directory's checkpoint.pt, or any other)
        origin = "convert" if rundir is not None and rundir.convert_report_path.is_file() else "checkpoint"
        model, seq_len = _from_checkpoint(path, device, origin)
        return OpenedModel(model, path, origin, seq_len or _trained_seq_len(rundir, model.config), path.parent.name, _data_dir(rundir))
    model, loaded = load_model(path, device=device)
    model.eval()
    seq_len = loaded.meta.get("seq_len")
    seq_len = seq_len if isinstance(seq_len, int) and seq_len > 0 else _trained_seq_len(rundir, model.config)
    name = path.parent.name if path.name == ARTIFACT_NAME else path.stem
    return OpenedModel(model, path, "artifact", seq_len, name, _data_dir(rundir), loaded.info.total_bytes, loaded.codec)


def resolve_data_dir(opened: OpenedModel, data: str | Path | None) -> Path:
    """``data`` if given, else the data the model's run trained on."""
    if data is not None:
        return Path(data)
    if opened.data_dir is None:
        raise ValueError(f"{opened.path}: no recorded training data to score on; pass --data DIR (a dataset directory)")
    return opened.data_dir


def open_data(
    opened: OpenedModel, data: str | Path | None, tokenizer: str | Path | None = None, *, verify: bool = True, splits: Sequence[str] = ("val",)
) -> Dataset:
    """The dataset to score ``opened`` on, checked against the model's vocabulary."""
    ds = Dataset.open(resolve_data_dir(opened, data), tokenizer=Path(tokenizer) if tokenizer else None, verify=verify, splits=splits)
    if ds.vocab_size > opened.model.config.vocab_size:
        raise ValueError(f"tokenizer has {ds.vocab_size} pieces but the model's vocabulary is {opened.model.config.vocab_size}")
    return ds


def find_model_tokenizer(opened: OpenedModel, tokenizer: str | Path | None) -> Path:
    """``tokenizer`` if given, else the one of the data the model's run trained on."""
    if tokenizer:
        return Path(tokenizer)
    found = find_tokenizer(opened.data_dir) if opened.data_dir is not None else None
    if found is None:
        raise ValueError(f"no tokenizer found for {opened.path}: pass --tokenizer MODEL (the SentencePiece model it was trained with)")
    return found


def load_model_tokenizer(opened: OpenedModel, tokenizer: str | Path | None) -> tuple[Any, Path]:
    """The SentencePiece processor for ``opened`` (see :func:`find_model_tokenizer`), checked
    against its vocabulary."""
    from loopgolf.data.tokenizer import load_tokenizer

    path = find_model_tokenizer(opened, tokenizer)
    sp = load_tokenizer(path)
    if sp.get_piece_size() > opened.model.config.vocab_size:
        raise ValueError(f"tokenizer {path} has {sp.get_piece_size()} pieces but the model's vocabulary is {opened.model.config.vocab_size}")
    return sp, path


@dataclass
class TextModel:
    """A model with its tokenizer: what generation and serving need."""

    opened: OpenedModel
    tokenizer: Any  # a SentencePieceProcessor
    tokenizer_path: Path

    @property
    def model(self) -> GPT:
        return self.opened.model


def open_for_text(path: str | Path, tokenizer: str | Path | None = None, device: Any = "cpu") -> TextModel:
    """The model at ``path`` (see :func:`open_model`) and its tokenizer (see
    :func:`find_model_tokenizer`)."""
    opened = open_model(path, device)
    sp, tok_path = load_model_tokenizer(opened, tokenizer)
    return TextModel(opened, sp, tok_path)

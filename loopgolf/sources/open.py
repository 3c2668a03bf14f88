"""Open a model to score or serve it, with the data and tokenizer it belongs to: the one helper
behind ``eval``, ``eval --early-exit``, ``generate``, ``serve`` and ``bench serve``.

A model is any of:

- an artifact file (what a finished run scores: the int roundtrip),
- a run directory: its ``artifact.lgz`` when the run finished, else its ``checkpoint.pt``
  (``loopgolf train``, or a run stopped before export: the float weights),
- a ``loopgolf convert`` directory (the converted weights, before any uptraining: the paper's
  first sanity check),
- a checkpoint file (``checkpoint.pt``, or any file that starts like one; the model config
  travels inside it).

The data defaults to the one the run trained on (its ``config.json``; for a convert directory,
the run it was converted from), the evaluation window to that run's training ``seq_len``, and
the tokenizer to the one next to that data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopgolf.data.dataset import Dataset
from loopgolf.data.stats import find_tokenizer
from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.rundir import ARTIFACT_NAME, RunDir

if TYPE_CHECKING:
    from loopgolf.config import RunConfig

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
    eval_stride: int | None = None  # the sliding-window stride its run scored with (None: non-overlapping)


def _run_dir_of(path: Path) -> RunDir | None:
    """The run directory a file sits in (an artifact or checkpoint inside a run), if it is one."""
    rundir = RunDir(path.parent)
    return rundir if rundir.config_path.is_file() else None


def _convert_source(rundir: RunDir) -> RunDir | None:
    """The run directory a ``loopgolf convert`` directory was converted from (the source recorded
    in its ``config.json``, as given to ``convert``: a run directory, or an artifact or checkpoint
    inside one), if it is still there."""
    try:
        made = rundir.read_convert()
    except ValueError:
        return None
    source = made.get("source") if made is not None else None
    if not isinstance(source, str) or not source:
        return None
    path = Path(source)
    if path.is_file():
        return _run_dir_of(path)
    return RunDir(path) if path.is_dir() and RunDir(path).config_path.is_file() else None


def _run_config(rundir: RunDir | None) -> RunConfig | None:
    """The training config recorded for a model: its run's ``config.json``, or for a `loopgolf
    convert` directory the config of the run it was converted from (the data and window the
    source was trained on, so that the converted model is scored like its source)."""
    if rundir is None:
        return None
    try:
        return rundir.read_config()
    except ValueError:
        pass  # a convert directory, or a config from elsewhere
    source = _convert_source(rundir) if rundir.convert_report_path.is_file() else None
    if source is None:
        return None
    try:
        return source.read_config()
    except ValueError:
        return None


def _data_dir(config: RunConfig | None) -> Path | None:
    if config is None or config.data is None or not Path(config.data.dir).is_dir():
        return None
    return Path(config.data.dir)


def _trained_seq_len(config: RunConfig | None, model_cfg: ModelConfig) -> int:
    if config is not None:
        return config.train.seq_len
    return min(DEFAULT_SEQ_LEN, model_cfg.max_seq_len)


def _from_checkpoint(path: Path, device: Any) -> tuple[GPT, int | None]:
    from loopgolf.train.checkpoint import load_model_state, read_checkpoint
    from loopgolf.train.ema import exported_state

    try:
        ckpt = read_checkpoint(path)
    except ValueError as e:  # its messages are written for resuming; here the model is only read
        raise ValueError(str(e).replace("; refusing to resume from it", "")) from None
    model_dict = (ckpt.get("config") or {}).get("model")
    if not isinstance(model_dict, dict):
        raise ValueError(f"{path} does not record its model config")
    cfg = ModelConfig.from_dict(model_dict)
    model = GPT(cfg)
    load_model_state(model, exported_state(ckpt))  # a run that averages its weights exports the average
    train = (ckpt.get("config") or {}).get("train")
    seq_len = train.get("seq_len") if isinstance(train, dict) else None
    return model.to(device).eval(), seq_len if isinstance(seq_len, int) and seq_len > 0 else None


def _file_kind(path: Path) -> tuple[str | None, bytes]:
    """(``checkpoint``, ``artifact`` or None, the first bytes): by the file's first bytes, or a
    ``.pt`` name (a checkpoint, so that a damaged one is reported as one). An artifact is told
    apart first: scoring one loads none of the training code, the checkpoint reader included."""
    from loopgolf.export.artifact import MAGIC as ARTIFACT_MAGIC

    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if head.startswith(ARTIFACT_MAGIC):
        return "artifact", head
    from loopgolf.train.checkpoint import MAGIC as CHECKPOINT_MAGIC

    return ("checkpoint" if path.suffix == ".pt" or head.startswith(CHECKPOINT_MAGIC) else None), head


def _open_checkpoint(path: Path, rundir: RunDir | None, device: Any, name: str) -> OpenedModel:
    origin = "convert" if rundir is not None and rundir.convert_report_path.is_file() else "checkpoint"
    model, seq_len = _from_checkpoint(path, device)
    config = _run_config(rundir)
    stride = None if config is None or origin == "convert" else config.eval.stride
    return OpenedModel(model, path, origin, seq_len or _trained_seq_len(config, model.config), name, _data_dir(config), eval_stride=stride)


def open_model(path: str | Path, device: Any = "cpu") -> OpenedModel:
    """The model at ``path`` (see the module docstring), in eval mode on ``device``."""
    from loopgolf.export.pack import load_model

    path = Path(path)
    if path.is_dir():
        rundir = RunDir(path)
        if rundir.artifact_path.is_file():
            return open_model(rundir.artifact_path, device)
        if rundir.checkpoint_path.is_file():
            return _open_checkpoint(rundir.checkpoint_path, rundir, device, path.resolve().name)
        raise ValueError(
            f"{path} holds neither {ARTIFACT_NAME} nor {rundir.checkpoint_path.name}: give an artifact, a run directory, "
            "a `loopgolf convert` directory or a checkpoint"
        )
    if not path.exists():
        raise ValueError(f"no model at {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a file or a directory")
    rundir = _run_dir_of(path)
    kind, head = _file_kind(path)
    if kind == "checkpoint":  # a run directory's checkpoint.pt, or any other
        return _open_checkpoint(path, rundir, device, path.resolve().parent.name)
    if kind is None:
        raise ValueError(
            f"{path} is neither a loopgolf artifact nor a checkpoint (bad magic {head[:8]!r}); MODEL is an artifact, a run directory, "
            "a `loopgolf convert` directory or a checkpoint"
        )
    model, loaded = load_model(path, device=device)
    model.eval()
    config = _run_config(rundir)
    seq_len = loaded.meta.get("seq_len")
    seq_len = seq_len if isinstance(seq_len, int) and seq_len > 0 else _trained_seq_len(config, model.config)
    name = path.resolve().parent.name if path.name == ARTIFACT_NAME else path.stem
    stride = None if config is None else config.eval.stride
    return OpenedModel(model, path, "artifact", seq_len, name, _data_dir(config), loaded.info.total_bytes, loaded.codec, stride)


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

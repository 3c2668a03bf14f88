"""Any model source as a loopgolf model: a Hugging Face directory (config.json with a
``model_type`` + safetensors), a loopgolf run or convert directory (config.json + checkpoint.pt,
from ``loopgolf train`` or ``loopgolf convert``) or a loopgolf artifact (its dequantized weights).
What ``run --init-from``, ``--distill-from`` and ``loopgolf convert`` start from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.rundir import RunDir
from loopgolf.sources.hf import ConversionError, import_hf, is_hf_dir, read_hf_config


@dataclass
class Source:
    """A trained model as loopgolf sees it, with where it came from."""

    config: ModelConfig
    state: dict[str, Tensor]
    origin: str  # "hf:<model_type>", "run", "convert" or "artifact"
    path: Path

    def model(self, device: torch.device | str = "cpu") -> GPT:
        """The source as a GPT in eval mode."""
        m = GPT(self.config)
        m.load_state_dict(self.state, strict=True)
        return m.to(device).eval()


def _read_model_dir(path: Path) -> tuple[ModelConfig, dict[str, Tensor], str]:
    """A loopgolf run or convert directory: its model config and its checkpoint's weights."""
    from loopgolf.train.checkpoint import check_state_matches
    from loopgolf.train.ema import exported_state

    rundir = RunDir(path)
    try:
        model_cfg, kind = rundir.read_model_config()
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if not rundir.checkpoint_path.is_file():
        hint = "train it with `loopgolf train`, or use its artifact" if not rundir.artifact_path.is_file() else f"use its artifact, {rundir.artifact_path}"
        raise ConversionError(f"{path} has no {rundir.checkpoint_path.name}: {hint}")
    ckpt = rundir.read_checkpoint()
    with torch.device("meta"):
        names = GPT(model_cfg).state_dict()
    state = exported_state(ckpt)  # a run that averages its weights exports the average
    try:
        check_state_matches(names, state, where=f"{rundir.checkpoint_path} (against its config.json)")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    state = {k: v.float() for k, v in state.items()}
    check_finite(state, rundir.checkpoint_path)
    return model_cfg, state, kind


def check_finite(state: dict[str, Tensor], where: Path) -> None:
    """ConversionError naming the first tensor of `state` with a NaN or inf: a model with one
    converts into garbage (or fails inside the SVD)."""
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ConversionError(f"{where}: tensor {name!r} has {int((~torch.isfinite(t)).sum()):,} non-finite value(s) (NaN or inf); refusing it as a source")


def load_source(path: str | Path) -> Source:
    """Read a source (see the module docstring). Raises ConversionError (a ValueError) naming the
    file for anything that is not a source loopgolf can read."""
    path = Path(path)
    if path.is_dir():
        if is_hf_dir(path):
            cfg, state = import_hf(path)
            return Source(cfg, state, f"hf:{read_hf_config(path)['model_type']}", path)
        cfg, state, kind = _read_model_dir(path)
        return Source(cfg, state, kind, path)
    if path.is_file():
        from loopgolf.export.pack import load_model

        model, _ = load_model(path)  # refuses non-finite tensors itself
        state = {k: v.detach().float() for k, v in model.state_dict().items()}
        check_finite(state, path)
        return Source(model.config, state, "artifact", path)
    raise ConversionError(f"source {path} does not exist")

"""Any conversion source as a vanilla loopgolf model: a Hugging Face directory (config.json with
a ``model_type`` + safetensors), a loopgolf run directory (config.json + checkpoint.pt, e.g.
from ``loopgolf train`` or ``loopgolf convert``) or a loopgolf artifact (its dequantized weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from loopgolf.sources.hf import ConversionError, import_hf
from loopgolf.model.gpt import GPT, ModelConfig


@dataclass
class Source:
    """A trained model as loopgolf sees it, with where it came from."""

    config: ModelConfig
    state: dict[str, Tensor]
    origin: str  # "hf:<model_type>", "run" or "artifact"
    path: Path

    def model(self, device: torch.device | str = "cpu") -> GPT:
        """The source as a GPT in eval mode."""
        m = GPT(self.config)
        m.load_state_dict(self.state, strict=True)
        return m.to(device).eval()


def _read_run_dir(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    from loopgolf.train.checkpoint import CHECKPOINT_NAME, check_state_matches, read_checkpoint

    cfg_path = path / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        model_cfg = ModelConfig.from_dict(config["model"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{cfg_path}: not a loopgolf run config ({type(e).__name__}: {e})") from None
    if not (path / CHECKPOINT_NAME).is_file():
        raise ConversionError(f"{path} has no {CHECKPOINT_NAME}: train it with `loopgolf train` (or convert from its artifact)")
    ckpt = read_checkpoint(path / CHECKPOINT_NAME)
    with torch.device("meta"):
        names = GPT(model_cfg).state_dict()
    state = ckpt["model"]
    try:
        check_state_matches(names, state, where=f"{path / CHECKPOINT_NAME} (against its config.json)")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    return model_cfg, {k: v.float() for k, v in state.items()}


def load_source(path: str | Path) -> Source:
    """Read a source (see the module docstring). Raises ConversionError (a ValueError) naming the
    file for anything that is not a source loopgolf can read."""
    path = Path(path)
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ConversionError(f"{path} has no config.json: expected a Hugging Face model directory or a loopgolf run directory")
        try:
            head = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{cfg_path}: not a readable JSON config ({e})") from None
        if isinstance(head, dict) and "model_type" in head:
            cfg, state = import_hf(path)
            return Source(cfg, state, f"hf:{head['model_type']}", path)
        if isinstance(head, dict) and "model" in head:
            cfg, state = _read_run_dir(path)
            return Source(cfg, state, "run", path)
        raise ConversionError(f"{cfg_path} is neither a Hugging Face config (model_type) nor a loopgolf run config (model)")
    if path.is_file():
        from loopgolf.export.pack import load_model

        model, _ = load_model(path)
        return Source(model.config, {k: v.detach().float() for k, v in model.state_dict().items()}, "artifact", path)
    raise ConversionError(f"source {path} does not exist")


def as_vanilla(source: Source) -> Source:
    """The source with a vanilla plan and per-virtual-layer controls, the form conversion starts
    from. A vanilla loopgolf model has one control row per layer either way, so this only
    relabels; a source with LoRA adapters or another plan is refused."""
    cfg = source.config
    if cfg.plan.kind != "vanilla" or cfg.plan.share != "block":
        raise ConversionError(
            f"{source.path}: the source has a {cfg.plan.kind} plan ({cfg.depth_plan.describe()}); conversion starts from a vanilla model"
        )
    if cfg.lora_ranks:
        raise ConversionError(f"{source.path}: the source already has LoRA adapters; convert the model they relax instead")
    if cfg.per_layer_controls:
        return source
    vanilla = ModelConfig.from_dict({**cfg.to_dict(), "per_layer_controls": True})
    return Source(vanilla, source.state, source.origin, source.path)

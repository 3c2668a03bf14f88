"""Model <-> artifact: export a trained GPT and rebuild one from an artifact alone.

This module (with what it imports) is the code a scorer needs to rebuild and evaluate a model,
so it stays free of training, data-building and CLI code; ``loopgolf.export.budget`` counts its
source bytes as the artifact's ``code_bytes``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loopgolf.export.artifact import ArtifactInfo, LoadedArtifact, read_artifact, write_artifact
from loopgolf.model.gpt import GPT, ModelConfig


def export_model(
    model: GPT,
    path: str | Path,
    *,
    codec: str = "auto",
    bits: int = 8,
    cap_bytes: int | None = None,
    code_bytes: int = 0,
    meta: dict | None = None,
) -> ArtifactInfo:
    """Quantize and compress ``model`` into ``path``. With ``cap_bytes`` the artifact plus
    ``code_bytes`` must fit or nothing is written (ArtifactError says by how much it is over)."""
    # The state dict goes in as it is: tied tensors must still share storage so the writer can
    # store them once (it moves each tensor to CPU float32 itself).
    return write_artifact(
        path, model.config.to_dict(), model.state_dict(), codec=codec, bits=bits, meta=meta, cap_bytes=cap_bytes, extra_bytes=code_bytes
    )


def load_model(artifact: str | Path | bytes, device: torch.device | str = "cpu") -> tuple[GPT, LoadedArtifact]:
    """Rebuild the model from an artifact: config from its header, dequantized weights loaded strictly."""
    loaded = read_artifact(artifact)
    model = GPT(ModelConfig.from_dict(loaded.model_config))
    model.load_state_dict(loaded.state_dict, strict=True)
    return model.to(device), loaded

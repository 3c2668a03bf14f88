"""Model <-> artifact: export a trained GPT and rebuild one from an artifact alone.

This module (with what it imports) is the code a scorer needs to rebuild and evaluate a model,
so it stays free of training, data-building and CLI code; ``loopgolf.export.budget`` counts its
source bytes as the artifact's ``code_bytes``. The encoders (policy, clip search, GPTQ, outliers,
low-rank correction) and the artifact writer are imported inside :func:`export_model` only, so
reading an artifact never loads them and their source is not counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loopgolf.export.artifact import ArtifactError, ArtifactInfo, LoadedArtifact, read_artifact
from loopgolf.model.gpt import GPT, ModelConfig

if TYPE_CHECKING:
    from loopgolf.export.policy import QuantPolicy


def export_model(
    model: GPT,
    path: str | Path,
    *,
    policy: QuantPolicy | None = None,
    codec: str = "auto",
    bits: int | None = None,
    cap_bytes: int | None = None,
    code_bytes: int = 0,
    meta: dict | None = None,
    calibration: torch.Tensor | None = None,
    hessians: dict[str, torch.Tensor] | None = None,
) -> ArtifactInfo:
    """Quantize ``model`` under ``policy`` and compress it into ``path``.

    ``bits=N`` is shorthand for ``QuantPolicy.uniform(N)``; neither gives the baseline (int8).
    GPTQ (``policy.gptq``) needs the inputs' Hessians: pass ``calibration`` tokens (N, T) (see
    ``export.gptq.calibration_tokens``) or precomputed ``hessians``; with calibration tokens the
    low-rank correction is Hessian-weighted too. With ``cap_bytes`` the artifact plus
    ``code_bytes`` must fit or nothing is written (ArtifactError says by how much it is over).
    The policy is recorded in the artifact's meta under ``"quant"``.
    """
    from loopgolf.export.encode import encode_state
    from loopgolf.export.policy import QuantPolicy
    from loopgolf.export.writer import write_quantized

    if bits is not None and policy is not None:
        raise ArtifactError("pass either bits= (shorthand for a uniform policy) or policy=, not both")
    policy = QuantPolicy.uniform(bits) if bits is not None else (policy or QuantPolicy())
    state = model.state_dict()  # tied tensors still share storage here, so they are stored once
    if any(".parametrizations." in name for name in state):
        raise ArtifactError("the model still carries training-time parametrizations (QAT): call remove_qat(model) first")
    if hessians is None and calibration is not None and (policy.gptq or policy.lowrank_rank):
        from loopgolf.export.gptq import collect_hessians

        hessians = collect_hessians(model, calibration)
    if policy.gptq and hessians is None:
        raise ArtifactError("the policy uses GPTQ, which needs calibration tokens (export.gptq.calibration_tokens) or hessians")
    try:
        qstate, aliases = encode_state(state, policy, hessians=hessians)
    except ValueError as e:
        raise ArtifactError(f"cannot quantize: {e}") from None
    return write_quantized(
        path,
        model.config.to_dict(),
        qstate,
        aliases=aliases,
        names=list(state),
        codec=codec,
        meta={**(meta or {}), "quant": policy.to_dict()},
        cap_bytes=cap_bytes,
        extra_bytes=code_bytes,
    )


def load_model(artifact: str | Path | bytes, device: torch.device | str = "cpu") -> tuple[GPT, LoadedArtifact]:
    """Rebuild the model from an artifact: config from its header, dequantized weights loaded strictly."""
    loaded = read_artifact(artifact)
    model = GPT(ModelConfig.from_dict(loaded.model_config))
    model.load_state_dict(loaded.state_dict, strict=True)
    return model.to(device), loaded

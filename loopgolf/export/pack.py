"""Model <-> artifact: export a trained GPT under the byte cap, and rebuild one from an artifact alone.

This module (with what it imports) is the code a scorer needs to rebuild and evaluate a model, so
it stays free of training, data-building and CLI code. The encoders (policy, clip search, GPTQ,
outliers, low-rank correction) are imported inside :func:`export_model` only, so reading an
artifact never loads them.

Byte accounting: an artifact's file plus the counted code must fit the cap
(:data:`DEFAULT_CAP_BYTES`, the Parameter Golf 16,000,000; :class:`CapReport`). Which code is
counted, and how, is :mod:`loopgolf.codebytes`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loopgolf.export.artifact import (
    CODECS,
    ArtifactError,
    ArtifactInfo,
    LoadedArtifact,
    QuantizedTensor,
    build_payload,
    compress,
    container_overhead,
    payload_version,
    read_artifact,
    seal,
)
from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.util import atomic_write_bytes

if TYPE_CHECKING:
    from loopgolf.export.quantize import QuantPolicy

DEFAULT_CAP_BYTES = 16_000_000


@dataclass
class CapReport:
    model_bytes: int
    code_bytes: int
    cap_bytes: int

    @property
    def artifact_bytes(self) -> int:
        return self.model_bytes + self.code_bytes

    @property
    def headroom(self) -> int:
        """Bytes left under the cap (negative when over)."""
        return self.cap_bytes - self.artifact_bytes

    @property
    def fits(self) -> bool:
        return self.headroom >= 0

    def describe(self) -> str:
        verdict = f"fits with {self.headroom:,} bytes to spare" if self.fits else f"OVER the cap by {-self.headroom:,} bytes"
        return f"{self.model_bytes:,} model + {self.code_bytes:,} code = {self.artifact_bytes:,} bytes of {self.cap_bytes:,}: {verdict}"

    def to_dict(self) -> dict:
        return {**asdict(self), "artifact_bytes": self.artifact_bytes, "headroom_bytes": self.headroom, "fits": self.fits}


# ---------------------------------------------------------------------------------- packing


def tensor_shares(payload: bytes, spans: list[list[tuple[int, int]]], codec: str, compressed_len: int) -> list[int]:
    """Each tensor's share of the compressed payload: its bytes (the segments of ``spans``,
    joined) compressed alone with ``codec``, scaled so that the shares of all tensors plus the
    header's sum to ``compressed_len``.

    One stream holds all tensors, so no tensor has bytes of its own; compressing each alone is an
    honest measure of what it costs, and the scaling removes the (small) difference between the
    sum of the parts and the whole."""
    head_end = min([a for segs in spans for a, b in segs if b > a], default=len(payload))

    def alone(chunk: bytes) -> int:
        return min(len(chunk), len(compress(chunk, codec))) if chunk else 0

    sizes = [alone(b"".join(payload[a:b] for a, b in segs)) for segs in spans]
    total = sum(sizes) + alone(payload[:head_end])
    if total == 0:
        return [0] * len(spans)
    return [round(n * compressed_len / total) for n in sizes]


def pack_quantized(
    model_config: dict,
    qstate: dict[str, QuantizedTensor],
    *,
    aliases: dict[str, str] | None = None,
    names: list[str] | None = None,
    codec: str = "auto",
    meta: dict | None = None,
    layout: str = "plain",
) -> tuple[bytes, ArtifactInfo]:
    """Artifact bytes for tensors that are already quantized, and their accounting (with each
    tensor's share of the compressed bytes).

    `aliases` maps extra names to the stored name they repeat; `names` gives the table order
    (default: qstate's order followed by the aliases); `layout` how the tensor data is ordered
    (see :func:`loopgolf.export.artifact.build_payload`; "grouped" needs format version 3).
    """
    if codec != "auto" and codec not in CODECS:
        raise ArtifactError(f"unknown codec {codec!r}; valid: auto, {', '.join(CODECS)}")
    aliases = dict(aliases or {})
    if names is None:
        names = list(qstate) + [n for n in aliases if n not in qstate]
    missing = [n for n in names if n not in qstate and n not in aliases]
    if missing or len(set(names)) != len(names):
        raise ArtifactError(f"table names must be unique and all known; unknown: {missing}")
    payload, rows, spans = build_payload(model_config, names, qstate, aliases, {} if meta is None else meta, layout=layout)
    used, blob = seal(payload, codec, payload_version({n: qstate[n] for n in names if n not in aliases}, layout))
    comp_len = len(blob) - container_overhead(used)
    shares = {row["name"]: n for row, n in zip(rows, tensor_shares(payload, spans, used, comp_len))}
    return blob, ArtifactInfo(None, len(blob), used, len(payload), rows, shares)


def write_blob(path: str | os.PathLike, blob: bytes, info: ArtifactInfo, *, cap_bytes: int | None = None, extra_bytes: int = 0) -> ArtifactInfo:
    """Atomically write packed artifact bytes. With `cap_bytes`, refuse (writing nothing) when the
    artifact plus `extra_bytes` (e.g. the code's bytes, which count against the same cap) is over."""
    if cap_bytes is not None:
        total = info.total_bytes + extra_bytes
        if total > cap_bytes:
            raise ArtifactError(
                f"artifact is {info.total_bytes} bytes + {extra_bytes} extra = {total} bytes, "
                f"over the {cap_bytes}-byte cap by {total - cap_bytes} bytes; nothing was written"
            )
    atomic_write_bytes(path, blob)
    info.path = Path(path)
    return info


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
    """Quantize ``model`` under ``policy`` (default: the Parameter Golf baseline) and compress it
    into ``path``.

    ``bits=N`` is shorthand for ``QuantPolicy.uniform(N)``. GPTQ (``policy.gptq``) needs the
    inputs' Hessians: pass ``calibration`` tokens (N, T) (see ``export.gptq.calibration_tokens``)
    or precomputed ``hessians``; with calibration tokens the low-rank correction is
    Hessian-weighted too. With ``cap_bytes`` the artifact plus ``code_bytes`` must fit or nothing
    is written (ArtifactError says by how much it is over). The policy is recorded in the
    artifact's meta under ``"quant"``.
    """
    from loopgolf.export.quantize import QuantPolicy, encode_state

    if bits is not None and policy is not None:
        raise ArtifactError("pass either bits= (shorthand for a uniform policy) or policy=, not both")
    policy = QuantPolicy.uniform(bits) if bits is not None else (policy or QuantPolicy())
    state = model.state_dict()  # tied tensors still share storage here, so they are stored once
    bad = [n for n, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ArtifactError(
            f"cannot export: {len(bad)} tensor(s) hold NaN or inf values ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
            "the model diverged or was damaged; nothing was written"
        )
    if hessians is None and calibration is not None and (policy.gptq or policy.lowrank_rank):
        from loopgolf.export.gptq import collect_hessians

        hessians = collect_hessians(model, calibration, include_embedding=policy.uses_gptq("embed"))
    if policy.gptq and hessians is None:
        raise ArtifactError("the policy uses GPTQ, which needs calibration tokens (export.gptq.calibration_tokens) or hessians")
    try:
        qstate, aliases = encode_state(state, policy, hessians=hessians)
    except ValueError as e:
        raise ArtifactError(f"cannot quantize: {e}") from None
    blob, info = pack_quantized(
        model.config.to_dict(),
        qstate,
        aliases=aliases,
        names=list(state),
        codec=codec,
        meta={**(meta or {}), "quant": policy.to_dict()},
        layout=policy.layout,
    )
    return write_blob(path, blob, info, cap_bytes=cap_bytes, extra_bytes=code_bytes)


def _config_from_header(model_config: dict) -> ModelConfig:
    try:
        return ModelConfig.from_dict(model_config)
    except ValueError as e:
        raise ArtifactError(f"artifact model_config is invalid: {e}") from None


def check_model_shapes(model_config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """ArtifactError unless the model that ``model_config`` describes has exactly the tensors
    ``shapes`` lists. The model is built on the meta device (no memory, no init), so a header
    that asks for a huge model costs nothing before it is refused."""
    cfg = _config_from_header(model_config)
    with torch.device("meta"):
        expected = {n: tuple(t.shape) for n, t in GPT(cfg).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    wrong = sorted(n for n in set(expected) & set(shapes) if expected[n] != tuple(shapes[n]))
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what} {names[:3]}{' ...' if len(names) > 3 else ''}"
            for what, names in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", [f"{n} {list(shapes[n])} != {list(expected[n])}" for n in wrong]),
            )
            if names
        )
        raise ArtifactError(f"the artifact's tensors do not match its model_config: {detail}")


PROBE_TOKENS = 16


def check_finite_outputs(model: GPT) -> None:
    """ArtifactError unless one forward pass over a fixed probe sequence gives finite logits:
    finite weights can still overflow (a scale of 1e38), and a NaN score must not come out of
    an artifact that loaded cleanly."""
    n = min(PROBE_TOKENS, model.config.max_seq_len)
    pos = torch.arange(n, device=next(model.parameters()).device)
    tokens = torch.stack([pos % model.config.vocab_size, (pos * 7919 + 17) % model.config.vocab_size])
    with torch.no_grad():
        logits = model(tokens)
    if not bool(torch.isfinite(logits).all()):
        raise ArtifactError("the artifact's weights give non-finite logits (NaN or inf) on a probe sequence")


def load_model(artifact: str | Path | bytes, device: torch.device | str = "cpu") -> tuple[GPT, LoadedArtifact]:
    """Rebuild the model from an artifact: its header's config is checked against its tensor
    table before any tensor is inflated, the dequantized weights are loaded strictly, and a probe
    forward pass must give finite logits. Every failure is an ArtifactError."""
    loaded = read_artifact(artifact, check_header=check_model_shapes)
    model = GPT(_config_from_header(loaded.model_config))
    model.load_state_dict(loaded.state_dict, strict=True)
    model = model.to(device)
    check_finite_outputs(model)
    return model, loaded

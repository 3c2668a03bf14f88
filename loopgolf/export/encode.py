"""Turn float tensors into stored tensors under a :class:`~loopgolf.export.policy.QuantPolicy`.

Per tensor: control tensors stay float32 (or float16); small, non-2-D or ``fp16``-role tensors stay
float16; every other matrix becomes per-row symmetric intN with its role's bits:

1. optional outliers: the ``outlier_topk`` largest |w| are kept exactly in fp16 and left out of
   the row scales (so one huge weight no longer coarsens its whole row's grid);
2. row scales by the policy's clip search (percentile or MSE);
3. codes by round-to-nearest, or by GPTQ with the layer's calibration Hessian;
4. optional low-rank correction: the top singular directions of the remaining error (weighted by
   the Hessian when there is one), stored as two fp16 factors.

A tensor that appears under two names (tied embeddings) is encoded once. Shared blocks are one
tensor by construction, and LoRA factors are separate tensors that are never merged into them.
"""

from __future__ import annotations

import math

import torch

from loopgolf.export.clip import choose_scales
from loopgolf.export.policy import FLOAT16_BITS, QuantPolicy, tensor_role
from loopgolf.export.quant import (
    QuantError,
    QuantizedTensor,
    as_cpu_float32,
    dequantize_tensor,
    int_row_scheme,
    qmax_for_bits,
    round_codes,
    to_fp16_checked,
)
from loopgolf.export.writer import find_aliases


class EncodeError(QuantError):
    """A tensor cannot be encoded under the policy (e.g. GPTQ without a Hessian)."""


def _outliers(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(sorted flat int64 indices, bool mask) of the k largest |w|, or None for k = 0."""
    k = min(k, w.numel())
    if k == 0:
        return None
    idx = torch.topk(w.abs().reshape(-1), k).indices.sort().values
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[idx] = True
    return idx, mask.reshape(w.shape)


def lowrank_correction(
    residual: torch.Tensor, rank: int, hessian: torch.Tensor | None = None, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (u, v) with ``u @ v`` the best rank-``rank`` approximation of ``residual``: in the
    Frobenius norm, or, given the inputs' Hessian H, in the output error ``||(R - uv) H^1/2||``."""
    r = min(rank, *residual.shape)
    if hessian is None:
        U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
        u, v = U[:, :r] * S[:r], Vh[:r]
    else:
        n = hessian.shape[0]
        H = hessian.to(torch.float32) + torch.eye(n) * damp * max(float(torch.diag(hessian).mean()), 1e-12)
        L = torch.linalg.cholesky(H)  # H = L L^T, so ||M H^1/2|| = ||M L||
        U, S, Vh = torch.linalg.svd(residual @ L, full_matrices=False)
        u = U[:, :r] * S[:r]
        v = torch.linalg.solve_triangular(L.T, Vh[:r].T, upper=True).T  # v L = Vh_r
    # Split the singular values evenly so both fp16 factors have moderate magnitudes.
    g = (u.norm(dim=0) / v.norm(dim=1).clamp_min(1e-30)).clamp_min(1e-30).sqrt()
    return to_fp16_checked("lowrank_u", u / g), to_fp16_checked("lowrank_v", v * g[:, None])


def stored_scheme(name: str, shape: tuple[int, ...], policy: QuantPolicy) -> str:
    """The scheme a tensor of this name and shape gets under ``policy`` ("float32", "float16" or
    "intN_row"); the byte planner asks this without having the tensor."""
    role = tensor_role(name)
    if role == "control":
        return "float32" if policy.control_fp32 else "float16"
    bits = policy.bits_for(role)
    if bits == FLOAT16_BITS or math.prod(shape) <= policy.float_max_numel or len(shape) != 2:
        return "float16"
    return int_row_scheme(bits)


def encode_tensor(name: str, t: torch.Tensor, policy: QuantPolicy, *, hessian: torch.Tensor | None = None) -> QuantizedTensor:
    """One state-dict tensor as stored under ``policy`` (see the module docstring)."""
    w = as_cpu_float32(name, t)
    shape = tuple(int(s) for s in w.shape)
    role = tensor_role(name)
    scheme = stored_scheme(name, shape, policy)
    if scheme == "float32":
        return QuantizedTensor("float32", shape, w.contiguous(), None, None)
    if scheme == "float16":
        return QuantizedTensor("float16", shape, to_fp16_checked(name, w).contiguous(), None, None)
    bits = policy.bits_for(role)

    qmax = qmax_for_bits(bits)
    picked = _outliers(w, policy.outlier_topk)
    keep = None if picked is None else picked[1]
    w_coded = w if keep is None else w.masked_fill(keep, 0.0)
    try:
        scale = choose_scales(w_coded, bits, policy.clip, policy.clip_percentile)
        if policy.uses_gptq(role):
            if hessian is None:
                raise EncodeError(
                    f"{name}: the policy asks for GPTQ but there is no calibration Hessian for it "
                    "(pass calibration tokens to export_model)"
                )
            from loopgolf.export.gptq import gptq_quantize

            codes, scale = gptq_quantize(w, hessian, bits, scale16=scale, block_size=policy.gptq_block, damp=policy.gptq_damp, keep=keep)
        else:
            codes = round_codes(w_coded, scale, qmax)
    except QuantError as e:
        raise EncodeError(f"{name}: {e}") from None
    q = QuantizedTensor(int_row_scheme(bits), shape, codes, scale, bits)
    if picked is not None:
        q.outlier_idx = picked[0].to(torch.int32).contiguous()
        q.outlier_val = to_fp16_checked(name, w.reshape(-1)[picked[0]]).contiguous()
    if policy.uses_lowrank(role):
        residual = w - dequantize_tensor(q, name)  # zero at outliers: they are exact already
        q.lowrank_u, q.lowrank_v = lowrank_correction(residual, policy.lowrank_rank, hessian, policy.gptq_damp)
    return q


def encode_state(
    state: dict[str, torch.Tensor], policy: QuantPolicy, *, hessians: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, QuantizedTensor], dict[str, str]]:
    """(stored tensors by name, aliases {name: the earlier name it repeats}) for a state dict."""
    aliases = find_aliases(state)
    hessians = hessians or {}
    qstate = {name: encode_tensor(name, t, policy, hessian=hessians.get(name)) for name, t in state.items() if name not in aliases}
    return qstate, aliases

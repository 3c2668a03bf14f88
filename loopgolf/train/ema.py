"""An exponential moving average of the weights, exported in place of the last weights.

With ``TrainConfig.ema_decay = d`` the trainer keeps, for every trained parameter ``p``, a
float32 copy ``ema`` that starts at the weights training starts from and after each optimizer
step becomes ``d * ema + (1 - d) * p``. When training ends the averages replace the live
weights, so the scores and the artifact are the averaged model's (the Parameter Golf record
trains this way with d = 0.9965).

It is per stored parameter: a block that a recursive plan runs several times has one average,
and recurrence stages or sampled depths change nothing here. Under torchrun every rank holds the
same weights, so every rank keeps its own (identical) average and nothing is communicated.
Memory: one float32 copy of the trained parameters. The averages travel in checkpoints, so a
resumed run continues the same average.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class WeightEMA:
    """The moving average of ``model``'s trainable parameters, starting at their current values."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay = decay
        # Frozen parameters never change, so their average would only collect rounding error.
        self.params: dict[str, nn.Parameter] = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.averages: dict[str, Tensor] = {n: p.detach().to(torch.float32, copy=True) for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """Fold the parameters' current values into the averages (after an optimizer step)."""
        averages = list(self.averages.values())
        if not averages:
            return
        live = [p.detach().float() for p in self.params.values()]
        # One fused kernel per operation over all tensors on CUDA instead of two per tensor.
        torch._foreach_mul_(averages, self.decay)
        torch._foreach_add_(averages, live, alpha=1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Put the averages into ``model``'s parameters (each in its own dtype)."""
        params = dict(model.named_parameters())
        for name, avg in self.averages.items():
            params[name].copy_(avg)

    def state_dict(self) -> dict[str, Tensor]:
        return {n: t.detach().clone() for n, t in self.averages.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore averages saved by :meth:`state_dict` (strict: the same names and shapes)."""
        missing, unexpected = sorted(set(self.averages) - set(state)), sorted(set(state) - set(self.averages))
        if missing or unexpected:
            raise ValueError(f"the checkpoint's weight averages do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, avg in self.averages.items():
            if state[name].shape != avg.shape:
                raise ValueError(f"the checkpoint's weight average {name} has shape {tuple(state[name].shape)}, the model's is {tuple(avg.shape)}")
            avg.copy_(state[name])


def exported_state(ckpt: dict) -> dict[str, Tensor]:
    """The weights a checkpoint's run exports if it ends there: the model's tensors with the
    weight averages in place of the live parameters when the run keeps them (``ckpt["ema"]``),
    each in the stored tensor's dtype."""
    state = dict(ckpt["model"])
    for name, avg in (ckpt.get("ema") or {}).items():
        # A name the model lacks stays in, for the caller's match against the model to report.
        state[name] = avg.to(state[name].dtype) if name in state else avg
    return state

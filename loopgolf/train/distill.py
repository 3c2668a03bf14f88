"""Uptraining losses: distillation from a teacher and early-exit (intermediate-loop) losses.

``TrainingObjective(model, ...)`` is a training forward for :func:`loopgolf.train.trainer.train`
(``forward=objective``): it maps (inputs, targets) to the loss

    loss = (1 - w_kd) * CE(final) + w_kd * T^2 * KL(teacher_T || student_T)
           + w_exit * mean over earlier loops b of [CE(loop b) + KL(sg(final) || loop b)]

- distillation: forward KL from the teacher's temperature-``T`` distribution to the student's,
  computed online from a teacher in eval mode without gradients (Relaxed Recursive Transformers,
  arXiv:2410.20672, uptrains with distillation from the full-size model; docs/background.md).
  ``T^2`` keeps the gradient scale independent of T.
- early exit: after every pass but the last (``GPT.loop_exits``) the shared final norm and head
  predict; each such prediction gets the cross-entropy and a self-distillation term towards the
  *detached* final-loop distribution, so the exits learn from the full depth without pulling
  the final loop towards them (the recipe the paper uses to prepare early exit).

With no teacher and ``exit_weight`` 0 the loss is exactly the model's own cross-entropy (the
same operations in the same order), so a plain run is unchanged bit for bit.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def kl_to(target_logits: Tensor, logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over positions of KL(p_target || p) at ``temperature`` (both from logits), in nats."""
    t = target_logits.float().reshape(-1, target_logits.size(-1)) / temperature
    s = logits.float().reshape(-1, logits.size(-1)) / temperature
    return F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")


def _ce(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


class TrainingObjective:
    """The uptraining loss (module docstring). ``log_values()`` gives the parts of the last
    step's loss for the training log (read only when the trainer logs)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        teacher: nn.Module | None = None,
        distill_weight: float = 0.0,
        distill_temp: float = 1.0,
        exit_weight: float = 0.0,
    ) -> None:
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"distill weight must be in [0, 1], got {distill_weight}")
        if not distill_temp > 0 or distill_temp != distill_temp or distill_temp == float("inf"):
            raise ValueError(f"distill temperature must be a positive finite number, got {distill_temp}")
        if not 0.0 <= exit_weight < float("inf"):
            raise ValueError(f"exit loss weight must be a finite number >= 0, got {exit_weight}")
        if distill_weight > 0 and teacher is None:
            raise ValueError("a distill weight needs a teacher (--distill-from)")
        if exit_weight > 0 and not model.loop_exits():
            raise ValueError(f"exit losses need a plan with more than one pass; this one has one ({model.plan.describe()})")
        self.model, self.teacher = model, teacher
        self.distill_weight, self.distill_temp, self.exit_weight = distill_weight, distill_temp, exit_weight
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.teacher_seconds = 0.0
        self._last: dict[str, Tensor | list[Tensor]] = {}

    def teacher_logits(self, idx: Tensor) -> Tensor:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.teacher.logits(idx)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        self.teacher_seconds += time.perf_counter() - t0
        return out

    def __call__(self, idx: Tensor, targets: Tensor) -> Tensor:
        model = self.model
        if self.exit_weight > 0:
            all_logits = model.loop_logits(idx)
            logits = all_logits[-1]
        else:
            all_logits, logits = [], model.logits(idx)
        ce = _ce(logits, targets)
        loss = ce
        last: dict[str, Tensor | list[Tensor]] = {"ce": ce.detach()}
        if self.teacher is not None and self.distill_weight > 0:
            kd = kl_to(self.teacher_logits(idx), logits, self.distill_temp) * self.distill_temp**2
            loss = (1.0 - self.distill_weight) * ce + self.distill_weight * kd
            last["kd"] = kd.detach()
        if all_logits:
            final = logits.detach()
            loop_ce = [_ce(z, targets) for z in all_logits[:-1]]
            exit_terms = [c + kl_to(final, z) for c, z in zip(loop_ce, all_logits[:-1])]
            loss = loss + self.exit_weight * torch.stack(exit_terms).mean()
            last["loop_ce"] = [c.detach() for c in loop_ce] + [ce.detach()]
        self._last = last
        return loss

    def log_values(self) -> dict[str, float | list[float]]:
        """The parts of the last step's loss: ce, kd, and loop_ce (one per pass, the final last)."""
        out: dict[str, float | list[float]] = {}
        for k, v in self._last.items():
            out[k] = [float(x) for x in v] if isinstance(v, list) else float(v)
        return out

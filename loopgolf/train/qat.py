"""Loop-aware quantization-aware training for the shared block weights.

In a looped model one stored matrix runs at every pass, so its quantization error is applied again
and again and compounds: in openai/parameter-golf PR #363 a looped model's roundtrip gap was 0.37
bpb until noise of one quantization step on the looped blocks (``noise`` below) cut it to 0.002
(docs/background.md). Over the last part of training this module makes the shared attention and
MLP matrices (role ``attn`` / ``mlp`` in ``loopgolf.model.roles``) see that error:

- ``ste``: the forward pass uses the weight as the exporter will store it (per-row symmetric intN,
  scale from the row's absolute max rounded to fp16), and gradients pass straight through the
  rounding to the float weight.
- ``noise``: the forward pass adds uniform noise of one quantization step (``U(-s/2, s/2)`` per
  element, ``s`` the row's step), drawn once per optimizer step so that every loop over a shared
  block sees the same perturbation, as it would see the same rounding error after export.

:class:`QAT` is the training forward with that transform: it computes each stored matrix's
transformed weight once per forward and runs the model on those (``torch.func.functional_call``),
so a matrix that 3 loops reuse is quantized once, not 3 times, and the model and its parameters
stay plain (the optimizer, checkpoints and export see the same tensors as without QAT). The
transform is in the graph from step 0, gated by a 0/1 tensor that the step hook flips in place
when QAT starts: a compiled forward compiles once, before the clock, and never again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from loopgolf.model.roles import parameter_roles

QAT_MODES = ("off", "ste", "noise")
_FP16_TINY = float(torch.finfo(torch.float16).tiny)


class QATError(ValueError):
    """A QAT configuration that cannot work."""


@dataclass
class QATConfig:
    mode: str = "off"  # off | ste | noise
    start_frac: float = 0.85  # fraction of the training budget after which QAT is on
    bits: int = 6  # bits of the shared block weights (should match the export policy)
    role_bits: dict[str, int] = field(default_factory=dict)  # per role override: {"attn": 6, "mlp": 5}
    float_max_numel: int = 65536  # tensors this small are exported as floats: not fake-quantized
    noise_scale: float = 1.0  # noise mode: multiple of one quantization step
    seed: int = 0  # noise mode: generator seed (noise is drawn on the weight's device)

    def __post_init__(self) -> None:
        if self.mode not in QAT_MODES:
            raise QATError(f"unknown QAT mode {self.mode!r}; valid: {', '.join(QAT_MODES)}")
        if not 0.0 <= self.start_frac <= 1.0:
            raise QATError(f"QAT start_frac must be in [0, 1], got {self.start_frac}")
        self.role_bits = {str(k): v for k, v in dict(self.role_bits).items()}
        for role, b in [("all", self.bits), *self.role_bits.items()]:
            if role not in ("all", "attn", "mlp"):
                raise QATError(f"QAT role_bits keys must be 'attn' or 'mlp', got {role!r}")
            if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8:
                raise QATError(f"QAT bits must be an integer in [2, 8], got {b!r} for {role}")
        if self.noise_scale <= 0:
            raise QATError(f"QAT noise_scale must be positive, got {self.noise_scale}")

    def bits_for(self, role: str) -> int:
        """Bits of a shared matrix of ``role`` ("attn" or "mlp")."""
        return self.role_bits.get(role, self.bits)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QATConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise QATError(f"unknown QAT field(s) {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


def row_step(w: Tensor, qmax: int) -> Tensor:
    """Per-row quantization step (rows, 1) as the exporter stores it: |w| row max / qmax, rounded
    through fp16, and 1 for all-zero rows. Computed without gradient."""
    with torch.no_grad():
        s = (w.detach().abs().amax(dim=1, keepdim=True).float() / qmax).clamp_min(_FP16_TINY)
        s = s.to(torch.float16).float()
        return torch.where(s == 0, torch.ones_like(s), s).to(w.dtype)


def fake_quantize(w: Tensor, qmax: int) -> Tensor:
    """The per-row intN reconstruction of ``w`` (no gradient)."""
    with torch.no_grad():
        s = row_step(w, qmax)
        return torch.clamp(torch.round(w.detach() / s), -qmax, qmax) * s


def qat_targets(model: nn.Module, float_max_numel: int = 65536) -> list[tuple[str, nn.Parameter, str]]:
    """(parameter name, parameter, role) of every shared attention/MLP matrix that the export
    stores as intN: tensors at or below ``float_max_numel`` elements stay floats, so QAT leaves
    them alone, as it leaves the per-virtual-layer LoRA factors and control tensors."""
    params = dict(model.named_parameters())
    return [(name, params[name], role) for name, role in parameter_roles(model).items() if role in ("attn", "mlp") and params[name].numel() > float_max_numel]


class QAT:
    """QAT for one model: the training forward (:meth:`forward`, a drop-in for ``model(x, y)``)
    and the step hook (calling the object: ``on_step(step, progress, model)`` for ``train``)
    that switches it on once progress reaches ``start_frac`` and, in noise mode, draws fresh
    noise before every optimizer step.

    Its :meth:`state_dict` goes into training checkpoints: the step QAT started at and the state
    of every noise generator, so a resumed run draws the noise the uninterrupted run drew."""

    def __init__(self, model: nn.Module, cfg: QATConfig) -> None:
        if cfg.mode == "off":
            raise QATError("QAT mode is 'off': train without a QAT forward")
        targets = qat_targets(model, cfg.float_max_numel)
        if not targets:
            raise QATError(
                f"no shared block weight is larger than float_max_numel={cfg.float_max_numel}: QAT would do nothing "
                "(those weights are exported as floats); lower float_max_numel or use mode 'off'"
            )
        self.model, self.cfg = model, cfg
        self.names = [name for name, _, _ in targets]
        self.params = [p for _, p, _ in targets]
        self.qmax = [2 ** (cfg.bits_for(role) - 1) - 1 for _, _, role in targets]
        device = self.params[0].device
        # 0 before QAT starts, 1 after: a tensor, flipped in place, so the graph never changes.
        self.enabled = torch.zeros((), device=device)
        self.start_step: int | None = None
        self.units: list[Tensor] = []
        self.generators: list[torch.Generator] = []
        if cfg.mode == "noise":
            for i, p in enumerate(self.params):
                self.generators.append(torch.Generator(device=p.device).manual_seed(cfg.seed * 100_003 + i))
                self.units.append(torch.zeros_like(p, requires_grad=False))

    @property
    def weights(self) -> int:
        """How many stored matrices QAT transforms."""
        return len(self.params)

    def transformed_weights(self) -> dict[str, Tensor]:
        """{name: the weight the forward uses}, each computed once."""
        gate = self.enabled
        if self.cfg.mode == "ste":
            # w + gate * (q - w) with the difference detached: the value is q once QAT is on, the
            # gradient reaches w unchanged (straight through) either way.
            return {n: w + gate * (fake_quantize(w, qmax) - w.detach()) for n, w, qmax in zip(self.names, self.params, self.qmax)}
        return {
            n: w + gate * (u.to(w.dtype) * self.cfg.noise_scale) * row_step(w, qmax) for n, w, qmax, u in zip(self.names, self.params, self.qmax, self.units)
        }

    def forward(self, idx: Tensor, targets: Tensor | None = None, reduction: str = "mean") -> Tensor:
        """``model(idx, targets, reduction)`` with the shared matrices transformed."""
        return functional_call(self.model, self.transformed_weights(), (idx, targets), {"reduction": reduction})

    def __call__(self, step: int, progress: float, model: nn.Module) -> None:
        if self.start_step is None:
            if progress < self.cfg.start_frac:
                return
            self.start_step = step
        self.enabled.fill_(1.0)
        if self.cfg.mode == "noise":
            for u, g in zip(self.units, self.generators):
                u.copy_(torch.rand(u.shape, generator=g, device=g.device, dtype=u.dtype) - 0.5)

    def state_dict(self) -> dict:
        return {"start_step": self.start_step, "weights": self.weights, "noise_rng": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict) -> None:
        if state["weights"] != self.weights or len(state["noise_rng"]) != len(self.generators):
            raise QATError(
                f"the checkpoint's QAT state covers {state['weights']} weights and {len(state['noise_rng'])} noise generators; "
                f"this model and QAT setting have {self.weights} and {len(self.generators)}: it was written for another model or QAT setting"
            )
        self.start_step = state["start_step"]
        for g, rng in zip(self.generators, state["noise_rng"]):
            g.set_state(rng)
        self.enabled.fill_(0.0 if self.start_step is None else 1.0)

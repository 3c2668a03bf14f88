"""Loop-aware quantization-aware training for the shared block weights.

In a looped model one stored matrix runs at every pass, so its quantization error is applied again
and again and compounds (REFERENCE.md section 2). Over the last part of training this module makes
the shared attention and MLP weights (``attn.*`` / ``mlps.*`` 2-D weights) see that error:

- ``ste``: the forward pass uses the weight as the exporter will store it (per-row symmetric intN,
  scale from the row's absolute max rounded to fp16, as ``export.quant`` does), and gradients pass
  straight through the rounding to the float weight.
- ``noise``: the forward pass adds uniform noise of one quantization step (``U(-s/2, s/2)`` per
  element, ``s`` the row's step), drawn once per optimizer step so that every loop over a shared
  block sees the same perturbation, as it would see the same rounding error after export.

Both are attached with ``torch.nn.utils.parametrize`` so the model code never mentions
quantization: the optimizer keeps updating the same Parameter objects, and :func:`remove_qat`
restores plain weights (and plain state-dict names) before export.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

QAT_MODES = ("off", "ste", "noise")
# Stored sublayers whose weights every loop reuses; LoRA factors and control tensors are per
# virtual layer and are left alone.
_TARGET_RE = re.compile(r"^(attn|mlps)\.\d+\.")
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

    def bits_for(self, module_name: str) -> int:
        role = "attn" if module_name.startswith("attn.") else "mlp"
        return self.role_bits.get(role, self.bits)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QATConfig":
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


class FakeQuantSTE(nn.Module):
    """weight -> its intN per-row reconstruction, with a straight-through gradient."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.qmax = 2 ** (bits - 1) - 1

    def forward(self, w: Tensor) -> Tensor:
        s = row_step(w, self.qmax)
        q = torch.clamp(torch.round(w.detach() / s), -self.qmax, self.qmax) * s
        return w + (q - w.detach())


class QuantNoise(nn.Module):
    """weight -> weight + one step of uniform noise, the noise fixed between :meth:`resample` calls."""

    def __init__(self, bits: int, scale: float, shape: torch.Size, generator: torch.Generator) -> None:
        super().__init__()
        self.qmax = 2 ** (bits - 1) - 1
        self.scale = scale
        self.generator = generator
        self.register_buffer("unit", torch.zeros(shape), persistent=False)

    def resample(self) -> None:
        u = torch.rand(self.unit.shape, generator=self.generator, device=self.generator.device)
        self.unit.copy_(u - 0.5)

    def forward(self, w: Tensor) -> Tensor:
        return w + (self.unit.to(w.dtype) * self.scale) * row_step(w, self.qmax)


def qat_targets(model: nn.Module, float_max_numel: int = 65536) -> list[tuple[str, nn.Module]]:
    """(module name, module) of every shared block linear whose weight is exported as intN."""
    out = []
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not _TARGET_RE.match(name) or not isinstance(w, Tensor) or w.dim() != 2:
            continue
        if w.numel() > float_max_numel:
            out.append((name, mod))
    return out


def _attached(mod: nn.Module) -> bool:
    return parametrize.is_parametrized(mod, "weight") and any(
        isinstance(p, (FakeQuantSTE, QuantNoise)) for p in mod.parametrizations["weight"]
    )


def attach_qat(model: nn.Module, cfg: QATConfig) -> int:
    """Put fake quantization (or noise) on the shared block weights; returns how many weights.
    Attaching twice is a no-op for weights that already carry it."""
    if cfg.mode == "off":
        return 0
    targets = qat_targets(model, cfg.float_max_numel)
    if not targets:
        raise QATError(
            f"no shared block weight is larger than float_max_numel={cfg.float_max_numel}: QAT would do nothing "
            "(those weights are exported as floats); lower float_max_numel or use mode 'off'"
        )
    n = 0
    for i, (name, mod) in enumerate(targets):
        if _attached(mod):
            continue
        bits = cfg.bits_for(name)
        if cfg.mode == "ste":
            p: nn.Module = FakeQuantSTE(bits)
        else:
            w = mod.weight
            gen = torch.Generator(device=w.device).manual_seed(cfg.seed * 100_003 + i)
            p = QuantNoise(bits, cfg.noise_scale, w.shape, gen).to(w.device)
            p.resample()
        parametrize.register_parametrization(mod, "weight", p)
        n += 1
    return n


def remove_qat(model: nn.Module) -> int:
    """Restore plain weights (the same Parameter objects, values untouched); returns how many."""
    n = 0
    for _, mod in list(model.named_modules()):
        if _attached(mod):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)
            n += 1
    return n


def resample_noise(model: nn.Module) -> None:
    for mod in model.modules():
        if isinstance(mod, QuantNoise):
            mod.resample()


class QATCallback:
    """``on_step(step, progress, model)`` for ``train``: attaches QAT once progress reaches
    ``start_frac`` and, in noise mode, draws fresh noise before every optimizer step.

    Its :meth:`state_dict` goes into training checkpoints: the step QAT started at and, in noise
    mode, the state of every noise generator, so a resumed run draws the noise the uninterrupted
    run would have drawn."""

    def __init__(self, cfg: QATConfig) -> None:
        self.cfg = cfg
        self.start_step: int | None = None
        self.weights = 0
        self._model: nn.Module | None = None  # the model QAT is attached to in this process
        self._saved_noise_rng: list[Tensor] | None = None  # from a checkpoint, until re-attached

    def __call__(self, step: int, progress: float, model: nn.Module) -> None:
        if self.cfg.mode == "off":
            return
        if self.start_step is None:
            if progress < self.cfg.start_frac:
                return
            self.start_step = step
        if self._model is None:  # QAT's first step in this process: a fresh start or a resume
            self.weights = attach_qat(model, self.cfg)
            self._model = model
            if self._saved_noise_rng is not None:
                self._restore_noise_rng(self._saved_noise_rng)
                self._saved_noise_rng = None
        if self.cfg.mode == "noise":
            resample_noise(model)

    def _noise_modules(self) -> list[QuantNoise]:
        return [] if self._model is None else [m for m in self._model.modules() if isinstance(m, QuantNoise)]

    def _restore_noise_rng(self, states: list[Tensor]) -> None:
        mods = self._noise_modules()
        if len(states) != len(mods):
            raise QATError(
                f"the checkpoint holds {len(states)} noise generators, this model has {len(mods)} noise-QAT weights: "
                "it was written for another model or QAT setting"
            )
        for mod, state in zip(mods, states):
            mod.generator.set_state(state)

    def state_dict(self) -> dict:
        if self._saved_noise_rng is not None:  # resumed but not yet re-attached: keep what was loaded
            noise_rng = self._saved_noise_rng
        else:
            noise_rng = [m.generator.get_state() for m in self._noise_modules()]
        return {"start_step": self.start_step, "weights": self.weights, "noise_rng": noise_rng}

    def load_state_dict(self, state: dict) -> None:
        self.start_step = state["start_step"]
        self.weights = state["weights"]
        self._saved_noise_rng = list(state["noise_rng"]) if self.cfg.mode == "noise" and self.start_step is not None else None


def make_qat_callback(cfg: QATConfig) -> Callable[[int, float, nn.Module], None]:
    """The ``on_step`` callback implementing ``cfg`` (call :func:`remove_qat` before export)."""
    return QATCallback(cfg)

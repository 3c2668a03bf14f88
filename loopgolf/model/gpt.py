"""The baseline Parameter Golf GPT, built from a depth plan.

Architecture (REFERENCE.md, "Model details"): weightless RMSNorm; the normalized embedding is kept
as x0; each virtual layer mixes ``x = a*x + b*x0`` then adds ``attn_scale * Attn(norm x)`` and
``mlp_scale * MLP(norm x)``; QK-norm, RoPE, per-head q gain; relu^2 MLP; zero-initialised output
projections; U-Net skips from the first half of the virtual layers into the second half; tied
embeddings; logits soft-capped at ``c * tanh(z / c)``.

Sharing lives entirely in the plan: the model stores ``plan.num_attn`` attention sublayers and
``plan.num_mlp`` MLP sublayers and virtual layer v runs ``attn[attn_of[v]]`` and ``mlps[mlp_of[v]]``.
Control tensors (attn/mlp scales, residual mixes, q gains) are tied to the stored sublayer they
belong to (strict sharing) or kept per virtual layer (``per_layer_controls``).

This module knows nothing about training, quantization or files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loopgolf.model.plan import DepthPlan, PlanSpec, build_plan


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 2
    plan: PlanSpec = field(default_factory=PlanSpec)
    tie_embeddings: bool = True
    per_layer_controls: bool = False
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    tied_embed_init_std: float = 0.005

    def __post_init__(self) -> None:
        if isinstance(self.plan, dict):
            self.plan = PlanSpec.from_dict(self.plan)
        for name in ("vocab_size", "model_dim", "num_heads", "num_kv_heads", "mlp_mult"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model {name} must be a positive integer, got {value!r}")
        if self.model_dim % self.num_heads:
            raise ValueError(f"model_dim {self.model_dim} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if (self.model_dim // self.num_heads) % 2:
            raise ValueError(f"head dim {self.model_dim // self.num_heads} must be even for rotary embeddings")
        if self.vocab_size > 65536:
            raise ValueError(f"vocab_size {self.vocab_size} does not fit the uint16 shard format (max 65536)")
        build_plan(self.plan)  # validate early

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def depth_plan(self) -> DepthPlan:
        return build_plan(self.plan)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["plan"] = self.plan.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config field(s) {sorted(unknown)}")
        return cls(**d)


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """A bias-free linear layer whose weight stays fp32 and is cast to the input dtype (autocast)."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False) -> None:
        super().__init__(in_features, out_features, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.device, Tensor, Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._cache is None or self._cache[0] != seq_len or self._cache[1] != device:
            t = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))
            self._cache = (seq_len, device, freqs.cos()[None, None], freqs.sin()[None, None])
        return self._cache[2], self._cache[3]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class Attention(nn.Module):
    """Causal GQA self-attention with QK-norm and RoPE. The q gain is applied by the caller
    because it may belong to the virtual layer rather than to this stored sublayer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, kv = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.c_q = Linear(d, d)
        self.c_k = Linear(d, kv)
        self.c_v = Linear(d, kv)
        self.proj = Linear(d, d, zero_init=True)

    def forward(self, x: Tensor, q_gain: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.c_q(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(rms_norm(q), cos, sin) * q_gain.to(q.dtype)[None, :, None, None]
        k = apply_rotary(rms_norm(k), cos, sin)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.mlp_mult * cfg.model_dim
        self.fc = Linear(cfg.model_dim, hidden)
        self.proj = Linear(hidden, cfg.model_dim, zero_init=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.plan = plan = cfg.depth_plan
        d, v_layers = cfg.model_dim, plan.num_virtual
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.attn = nn.ModuleList(Attention(cfg) for _ in range(plan.num_attn))
        self.mlps = nn.ModuleList(MLP(cfg) for _ in range(plan.num_mlp))
        # Control tensors: one row per stored sublayer (strict sharing) or per virtual layer.
        n_attn_ctrl = v_layers if cfg.per_layer_controls else plan.num_attn
        n_mlp_ctrl = v_layers if cfg.per_layer_controls else plan.num_mlp
        self.attn_scale = nn.Parameter(torch.ones(n_attn_ctrl, d))
        self.mlp_scale = nn.Parameter(torch.ones(n_mlp_ctrl, d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(n_attn_ctrl, d), torch.zeros(n_attn_ctrl, d)], dim=1))
        self.q_gain = nn.Parameter(torch.full((n_attn_ctrl, cfg.num_heads), cfg.qk_gain_init))
        self.num_encoder = v_layers // 2
        self.num_decoder = v_layers - self.num_encoder
        self.skip_weight = nn.Parameter(torch.ones(min(self.num_encoder, self.num_decoder), d))
        self.lm_head = None if cfg.tie_embeddings else Linear(d, cfg.vocab_size, zero_init=True)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)
        if cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=cfg.tied_embed_init_std)

    def _ctrl_index(self, v: int) -> tuple[int, int]:
        if self.config.per_layer_controls:
            return v, v
        return self.plan.attn_of[v], self.plan.mlp_of[v]

    def layer(self, v: int, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Run virtual layer ``v``."""
        a, m = self._ctrl_index(v)
        mix = self.resid_mix[a].to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale[a].to(x.dtype) * self.attn[self.plan.attn_of[v]](rms_norm(x), self.q_gain[a], cos, sin)
        x = x + self.mlp_scale[m].to(x.dtype) * self.mlps[self.plan.mlp_of[v]](rms_norm(x))
        return x

    def hidden(self, idx: Tensor) -> Tensor:
        """Final normalized hidden states (B, T, D)."""
        cos, sin = self.rotary(idx.size(1), idx.device)
        x = rms_norm(self.tok_emb(idx))
        x0, skips = x, []
        for v in range(self.num_encoder):
            x = self.layer(v, x, x0, cos, sin)
            skips.append(x)
        for i in range(self.num_decoder):
            if i < self.skip_weight.size(0):
                x = x + self.skip_weight[i].to(x.dtype) * skips.pop()
            x = self.layer(self.num_encoder + i, x, x0, cos, sin)
        return rms_norm(x)

    def logits(self, idx: Tensor) -> Tensor:
        h = self.hidden(idx)
        z = F.linear(h, self.tok_emb.weight.to(h.dtype)) if self.lm_head is None else self.lm_head(h)
        c = self.config.logit_softcap
        return c * torch.tanh(z.float() / c)

    def forward(self, idx: Tensor, targets: Tensor | None = None, reduction: str = "mean") -> Tensor:
        """Logits when ``targets`` is None, else the cross-entropy in nats (``reduction`` as in
        ``F.cross_entropy``)."""
        logits = self.logits(idx)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)


# ---------------------------------------------------------------- accounting


def unique_params(model: nn.Module) -> int:
    """Stored parameters: each tensor once, however many virtual layers use it."""
    return sum(p.numel() for p in model.parameters())


def effective_params(model: GPT) -> int:
    """Executed parameters: what an unrolled copy with one private set of weights per virtual
    layer would hold (the count a vanilla model of the same virtual depth would have)."""
    plan = model.plan
    per_attn = sum(p.numel() for p in model.attn[0].parameters())
    per_mlp = sum(p.numel() for p in model.mlps[0].parameters())
    d, v_layers = model.config.model_dim, plan.num_virtual
    controls = v_layers * (3 * d + d + model.config.num_heads)  # attn/mlp scale, 2-row mix, q gain
    total = model.tok_emb.weight.numel() + v_layers * (per_attn + per_mlp) + controls
    total += model.skip_weight.numel()
    if model.lm_head is not None:
        total += model.lm_head.weight.numel()
    return total


def unique_params_formula(cfg: ModelConfig) -> int:
    """Closed form of :func:`unique_params`, used by tests and the byte planner."""
    plan = cfg.depth_plan
    d, kv = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim
    attn = 2 * d * d + 2 * d * kv
    mlp = 2 * d * cfg.mlp_mult * d
    n_a = plan.num_virtual if cfg.per_layer_controls else plan.num_attn
    n_m = plan.num_virtual if cfg.per_layer_controls else plan.num_mlp
    controls = n_a * (3 * d + cfg.num_heads) + n_m * d
    skips = min(plan.num_virtual // 2, plan.num_virtual - plan.num_virtual // 2) * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return cfg.vocab_size * d + plan.num_attn * attn + plan.num_mlp * mlp + controls + skips + head


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token from the plan: 2 per multiply-add of every executed matrix, plus
    causal attention scores and values (average context (seq_len + 1) / 2)."""
    plan = cfg.depth_plan
    d, kv = cfg.model_dim, cfg.num_kv_heads * cfg.head_dim
    matmul = plan.num_virtual * (2 * d * d + 2 * d * kv + 2 * d * cfg.mlp_mult * d) + d * cfg.vocab_size
    attention = plan.num_virtual * 2 * d * (seq_len + 1) / 2
    return int(2 * matmul + 2 * attention)


def model_summary(model: GPT) -> dict[str, Any]:
    return {
        "unique_params": unique_params(model),
        "effective_params": effective_params(model),
        "plan": model.plan.to_dict(),
    }


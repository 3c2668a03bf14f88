"""What each parameter of a :class:`~loopgolf.model.gpt.GPT` is for: the one place that says so.

The optimizer (which update rule and learning rate), QAT (which weights see fake quantization),
GPTQ (which layers get Hessians) and the export policy (how many bits) all ask
:func:`parameter_role`, so a new parameter needs one line here and nowhere else.

Roles:

- ``embed``: the token embedding (also the output layer when embeddings are tied);
- ``head``: an untied output layer;
- ``attn`` / ``mlp``: the weights of the stored attention and MLP sublayers (the matrices that
  virtual layers share);
- ``lora``: per-virtual-layer LoRA factors;
- ``pos``: a learned position table;
- ``control``: per-sublayer or per-virtual-layer vectors (attn/mlp scales, residual mixes, q gains,
  norm gains and biases, projection biases, the record recipe's attention gates), the U-Net skip
  weights and gates, the smear gate, and the two-lane decoder's lane weights and mix;
- ``depth``: per-virtual-layer depth embeddings.
"""

from __future__ import annotations

import re

from torch import nn

ROLES: tuple[str, ...] = ("embed", "head", "pos", "attn", "mlp", "lora", "control", "depth")
SHARED_MATRIX_ROLES: tuple[str, ...] = ("attn", "mlp")

_CONTROL_NAMES = (
    "attn_scale",
    "mlp_scale",
    "resid_mix",
    "q_gain",
    "skip_weight",
    "attn_norm",
    "mlp_norm",
    "final_norm",
    "attn_norm_bias",
    "mlp_norm_bias",
    "final_norm_bias",
    "skip_gate",
    "attn_gate",
    "smear_gate",
    "smear_lambda",
    "lane_resid",
    "lane_post",
    "lane_merge",
)
_ROLE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("embed", re.compile(r"^tok_emb\.weight$")),
    ("head", re.compile(r"^lm_head\.weight$")),
    ("pos", re.compile(r"^pos_emb\.weight$")),
    ("attn", re.compile(r"^attn\.\d+\.(c_q|c_k|c_v|proj)\.weight$")),
    ("mlp", re.compile(r"^mlps\.\d+\.(fc|gate|proj)\.weight$")),
    ("lora", re.compile(r"^lora\.[a-z_]+\.(A|B)\.\d+$")),
    ("control", re.compile(rf"^({'|'.join(_CONTROL_NAMES)}|bias\.[a-z_]+)$")),
    ("depth", re.compile(r"^depth_emb$")),
)


class UnknownParameterError(ValueError):
    """A tensor name that is not a parameter of the model."""


def parameter_role(name: str) -> str:
    """The role (one of :data:`ROLES`) of the parameter or state-dict tensor called ``name``."""
    for role, pattern in _ROLE_PATTERNS:
        if pattern.match(name):
            return role
    raise UnknownParameterError(f"{name!r} is not a parameter of loopgolf's GPT; known roles: {', '.join(ROLES)}")


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """{parameter name: role} for every parameter of ``model``."""
    return {name: parameter_role(name) for name, _ in model.named_parameters()}


def shared_matrices(model: nn.Module) -> dict[str, nn.Module]:
    """{weight name: linear module} of the stored attention and MLP matrices, the weights that
    several virtual layers may run."""
    return {
        f"{name}.weight": mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and parameter_role(f"{name}.weight") in SHARED_MATRIX_ROLES
    }

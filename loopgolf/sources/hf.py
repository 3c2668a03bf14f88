"""Hugging Face checkpoints on disk as exact vanilla loopgolf models.

A source is a directory with ``config.json`` and ``*.safetensors`` (read with the safetensors
library, tensor by tensor; a pickle checkpoint is refused, never unpickled). Supported families:

- the Llama family (``model_type`` llama: Llama, SmolLM, TinyLlama): RMSNorm with a gain, RoPE,
  SwiGLU, untied or tied head, optional projection biases;
- Gemma: RMSNorm with a (1 + w) gain, embeddings scaled by sqrt(hidden), GeGLU (tanh GELU), tied;
- GPT-2: LayerNorm with bias, learned positions, tanh-GELU MLP, Conv1D weights (stored (in, out),
  transposed here), fused qkv, tied head.

The result is a loopgolf ``ModelConfig`` with a vanilla plan and per-virtual-layer controls (each
layer keeps its own norm gains and biases) plus a state dict that loads into ``GPT`` strictly and
reproduces the source's logits (tests compare with the transformers model's own forward).

RoPE convention: transformers rotates pairs (x_i, x_{i+h/2}) by +theta, loopgolf's
``apply_rotary`` by -theta. Negating the second half of every query and key head (the rows of
W_q and W_k) turns one into the other exactly: rotation by -theta is rotation by +theta
conjugated by diag(1, -1), and the attention score is unchanged because the sign flips of q
and k cancel in q . k. Values and outputs are untouched.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from loopgolf.model.gpt import GPT, MAX_SEQ_LEN, ModelConfig
from loopgolf.model.plan import PlanSpec


class ConversionError(ValueError):
    """A source that cannot be converted: unsupported, malformed or inconsistent."""


SUPPORTED = ("llama", "gemma", "gpt2")
_PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
_MAX_CONFIG_BYTES = 16 * 2**20  # a Hugging Face config.json is a few KB
_REQUIRED = object()
_KINDS = {  # what config.json values must be, by the kind a field is read as
    int: (lambda v: type(v) is int and v >= 1, "a positive integer"),
    float: (lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0, "a positive finite number"),
    bool: (lambda v: type(v) is bool, "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
    dict: (lambda v: isinstance(v, dict), "an object"),
}


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        if not path.is_file() or path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ConversionError(f"{path}: not a config file (a regular file of at most {_MAX_CONFIG_BYTES:,} bytes)")
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConversionError(f"{path}: not a readable JSON config ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path} must hold a JSON object")
    return cfg


def _field(cfg: dict[str, Any], key: str, path: Path, kind: type, default: Any = _REQUIRED) -> Any:
    """``cfg[key]`` checked to be of `kind` (int: a positive integer; float: a positive finite
    number; bool, str, dict); `default` when it is absent or null (required without one)."""
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConversionError(f"{path / 'config.json'} has no {key!r}")
        return default
    ok, what = _KINDS[kind]
    if not ok(value):
        raise ConversionError(f"{path / 'config.json'}: {key!r} must be {what}, got {value!r:.80}")
    return float(value) if kind is float else value


def is_hf_dir(directory: Path) -> bool:
    """Whether ``directory`` holds a Hugging Face model (a ``config.json`` with a ``model_type``),
    not a loopgolf run directory (whose ``config.json`` has a ``model``)."""
    if not (directory / "config.json").is_file():
        return False
    try:
        cfg = read_hf_config(directory)
    except ConversionError:
        return False
    return "model_type" in cfg and "model" not in cfg


class SafetensorsReader:
    """Every tensor of a directory's ``*.safetensors`` files, by name, read on demand."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self.directory = directory
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            pickles = [n for n in _PICKLE_NAMES if (directory / n).exists()]
            if pickles:
                raise ConversionError(
                    f"{directory} holds only a pickle checkpoint ({', '.join(pickles)}); loopgolf never unpickles a source: "
                    "save it as safetensors (model.save_pretrained(dir, safe_serialization=True)) and convert that"
                )
            raise ConversionError(f"{directory} has no *.safetensors file")
        self.where: dict[str, Path] = {}
        self._handles = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types for a corrupt header
                raise ConversionError(f"{f}: not a readable safetensors file ({e})") from None
            self._handles[f] = handle
            for key in handle.keys():
                if key in self.where:
                    raise ConversionError(f"tensor {key!r} is in both {self.where[key].name} and {f.name}")
                self.where[key] = f

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """The tensor ``name`` as float32, which must have ``shape``."""
        if name not in self.where:
            raise ConversionError(
                f"{self.directory}: tensor {name!r} is missing from {', '.join(sorted({p.name for p in self.where.values()})) or 'the safetensors files'}"
            )
        t = self._handles[self.where[name]].get_tensor(name)
        if tuple(t.shape) != tuple(shape):
            raise ConversionError(f"{self.where[name]}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)} from config.json")
        if not t.is_floating_point():
            raise ConversionError(f"{self.where[name]}: tensor {name!r} has dtype {t.dtype}, expected a float tensor")
        t = t.float()
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ConversionError(f"{self.where[name]}: tensor {name!r} has {bad:,} non-finite value(s) (NaN or inf); a model with them cannot be converted")
        return t


def _rope_base(cfg: dict[str, Any], path: Path) -> float:
    params = _field(cfg, "rope_parameters", path, dict, {})
    scaling = cfg.get("rope_scaling")
    kind = params.get("rope_type", "default")
    if scaling or kind != "default":
        raise ConversionError(f"{path}: RoPE scaling {scaling or kind!r:.80} is not supported (only the default rotary embedding)")
    if params.get("rope_theta") is not None:
        return _field(params, "rope_theta", path, float)  # named as rope_parameters' own
    return _field(cfg, "rope_theta", path, float, 10000.0)


def _flip_second_half(w: Tensor, head_dim: int) -> Tensor:
    """Negate the second half of each head's rows (the RoPE convention change in the module doc)."""
    w = w.clone().view(-1, head_dim, *w.shape[1:])
    w[:, head_dim // 2 :] *= -1
    return w.view(-1, *w.shape[2:])


def _llama_like(cfg: dict[str, Any], path: Path, gemma: bool) -> tuple[ModelConfig, Callable[[SafetensorsReader, dict[str, Tensor]], None]]:
    d = _field(cfg, "hidden_size", path, int)
    n_layers = _field(cfg, "num_hidden_layers", path, int)
    heads = _field(cfg, "num_attention_heads", path, int)
    kv_heads = _field(cfg, "num_key_value_heads", path, int, heads)
    head_dim = _field(cfg, "head_dim", path, int, d // heads)
    if head_dim * heads != d:
        raise ConversionError(f"{path}: head_dim {head_dim} x {heads} heads != hidden_size {d}; loopgolf models need head_dim = hidden_size / heads")
    act_key = "hidden_activation" if cfg.get("hidden_activation") is not None else "hidden_act"
    act = _field(cfg, act_key, path, str, "gelu_pytorch_tanh" if gemma else "silu")
    if gemma and act == "gelu":  # transformers reads Gemma's legacy "gelu" as the tanh approximation
        act = "gelu_pytorch_tanh"
    acts = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}
    if act not in acts:
        raise ConversionError(f"{path}: activation {act!r} is not supported (silu or tanh-approximated gelu)")
    for flag in ("attention_softcapping", "final_logit_softcapping", "sliding_window"):
        if cfg.get(flag):
            raise ConversionError(f"{path}: {flag} is not supported")
    attn_bias, mlp_bias = _field(cfg, "attention_bias", path, bool, False), _field(cfg, "mlp_bias", path, bool, False)
    tied = _field(cfg, "tie_word_embeddings", path, bool, gemma)
    mc = ModelConfig(
        vocab_size=_field(cfg, "vocab_size", path, int),
        model_dim=d,
        num_heads=heads,
        num_kv_heads=kv_heads,
        mlp_hidden=_field(cfg, "intermediate_size", path, int),
        plan=PlanSpec(kind="vanilla", layers=n_layers),
        tie_embeddings=tied,
        per_layer_controls=True,
        rope_base=_rope_base(cfg, path),
        max_seq_len=min(_field(cfg, "max_position_embeddings", path, int, 4096), MAX_SEQ_LEN),
        logit_softcap=None,
        norm="rms_offset" if gemma else "rms_scaled",
        norm_eps=_field(cfg, "rms_norm_eps", path, float, 1e-6),
        qk_norm=False,
        embed_norm=False,
        embed_scale=math.sqrt(d) if gemma else 1.0,
        unet_skips=False,
        mlp_act=acts[act],
        bias=attn_bias or mlp_bias,
        qk_gain_init=1.0,
    )

    def fill(src: SafetensorsReader, sd: dict[str, Tensor]) -> None:
        kv, hidden = kv_heads * head_dim, mc.hidden_dim
        sd["tok_emb.weight"] = src.get("model.embed_tokens.weight", (mc.vocab_size, d))
        if not tied:
            sd["lm_head.weight"] = src.get("lm_head.weight", (mc.vocab_size, d))
        sd["final_norm"] = src.get("model.norm.weight", (d,))[None]
        for i in range(n_layers):
            p = f"model.layers.{i}."
            sd[f"attn.{i}.c_q.weight"] = _flip_second_half(src.get(p + "self_attn.q_proj.weight", (d, d)), head_dim)
            sd[f"attn.{i}.c_k.weight"] = _flip_second_half(src.get(p + "self_attn.k_proj.weight", (kv, d)), head_dim)
            sd[f"attn.{i}.c_v.weight"] = src.get(p + "self_attn.v_proj.weight", (kv, d))
            sd[f"attn.{i}.proj.weight"] = src.get(p + "self_attn.o_proj.weight", (d, d))
            sd[f"mlps.{i}.fc.weight"] = src.get(p + "mlp.up_proj.weight", (hidden, d))
            sd[f"mlps.{i}.gate.weight"] = src.get(p + "mlp.gate_proj.weight", (hidden, d))
            sd[f"mlps.{i}.proj.weight"] = src.get(p + "mlp.down_proj.weight", (d, hidden))
            sd["attn_norm"][i] = src.get(p + "input_layernorm.weight", (d,))
            sd["mlp_norm"][i] = src.get(p + "post_attention_layernorm.weight", (d,))
            if attn_bias:
                for t, name, n in (("q", "q_proj", d), ("k", "k_proj", kv), ("v", "v_proj", kv), ("o", "o_proj", d)):
                    b = src.get(p + f"self_attn.{name}.bias", (n,))
                    sd[f"bias.{t}"][i] = _flip_second_half(b[:, None], head_dim)[:, 0] if t in ("q", "k") else b
            if mlp_bias:
                for t, name, n in (("mlp_in", "up_proj", hidden), ("mlp_gate", "gate_proj", hidden), ("mlp_out", "down_proj", d)):
                    sd[f"bias.{t}"][i] = src.get(p + f"mlp.{name}.bias", (n,))

    return mc, fill


def _gpt2(cfg: dict[str, Any], path: Path, keys: Callable[[], set[str]]) -> tuple[ModelConfig, Callable[[SafetensorsReader, dict[str, Tensor]], None]]:
    d, n_layers, heads = (_field(cfg, k, path, int) for k in ("n_embd", "n_layer", "n_head"))
    act = _field(cfg, "activation_function", path, str, "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConversionError(f"{path}: GPT-2 activation {act!r} is not supported (gelu_new, gelu_pytorch_tanh)")
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("add_cross_attention"):
        raise ConversionError(f"{path}: scale_attn_by_inverse_layer_idx / cross attention are not supported")
    if d % heads:
        raise ConversionError(f"{path}: n_embd {d} is not divisible by n_head {heads}")
    head_dim = d // heads
    hidden = _field(cfg, "n_inner", path, int, 4 * d)
    n_pos = _field(cfg, "n_positions", path, int)
    # Without scale_attn_weights GPT-2 does not divide scores by sqrt(head_dim); SDPA always does,
    # so the q gain multiplies it back.
    q_gain = 1.0 if _field(cfg, "scale_attn_weights", path, bool, True) else math.sqrt(head_dim)
    mc = ModelConfig(
        vocab_size=_field(cfg, "vocab_size", path, int),
        model_dim=d,
        num_heads=heads,
        num_kv_heads=heads,
        mlp_hidden=hidden,
        plan=PlanSpec(kind="vanilla", layers=n_layers),
        tie_embeddings=_field(cfg, "tie_word_embeddings", path, bool, True),
        per_layer_controls=True,
        max_seq_len=n_pos,
        logit_softcap=None,
        norm="layer",
        norm_eps=_field(cfg, "layer_norm_epsilon", path, float, 1e-5),
        qk_norm=False,
        embed_norm=False,
        pos_emb="learned",
        unet_skips=False,
        mlp_act="gelu",
        bias=True,
        qk_gain_init=q_gain,
    )
    # The hub's original checkpoints name tensors without the "transformer." prefix.
    prefix = "transformer." if any(k.startswith("transformer.") for k in keys()) else ""

    def fill(src: SafetensorsReader, sd: dict[str, Tensor]) -> None:
        g = prefix
        sd["tok_emb.weight"] = src.get(g + "wte.weight", (mc.vocab_size, d))
        sd["pos_emb.weight"] = src.get(g + "wpe.weight", (n_pos, d))
        if not mc.tie_embeddings:
            sd["lm_head.weight"] = src.get("lm_head.weight", (mc.vocab_size, d))
        sd["final_norm"] = src.get(g + "ln_f.weight", (d,))[None]
        sd["final_norm_bias"] = src.get(g + "ln_f.bias", (d,))[None]
        for i in range(n_layers):
            p = f"{g}h.{i}."
            qkv = src.get(p + "attn.c_attn.weight", (d, 3 * d)).t()  # Conv1D stores (in, out)
            qkv_b = src.get(p + "attn.c_attn.bias", (3 * d,))
            for j, t in enumerate(("q", "k", "v")):
                sd[f"attn.{i}.c_{t}.weight"] = qkv[j * d : (j + 1) * d].contiguous()
                sd[f"bias.{t}"][i] = qkv_b[j * d : (j + 1) * d]
            sd[f"attn.{i}.proj.weight"] = src.get(p + "attn.c_proj.weight", (d, d)).t().contiguous()
            sd["bias.o"][i] = src.get(p + "attn.c_proj.bias", (d,))
            sd[f"mlps.{i}.fc.weight"] = src.get(p + "mlp.c_fc.weight", (d, hidden)).t().contiguous()
            sd["bias.mlp_in"][i] = src.get(p + "mlp.c_fc.bias", (hidden,))
            sd[f"mlps.{i}.proj.weight"] = src.get(p + "mlp.c_proj.weight", (hidden, d)).t().contiguous()
            sd["bias.mlp_out"][i] = src.get(p + "mlp.c_proj.bias", (d,))
            sd["attn_norm"][i] = src.get(p + "ln_1.weight", (d,))
            sd["attn_norm_bias"][i] = src.get(p + "ln_1.bias", (d,))
            sd["mlp_norm"][i] = src.get(p + "ln_2.weight", (d,))
            sd["mlp_norm_bias"][i] = src.get(p + "ln_2.bias", (d,))

    return mc, fill


def import_hf(directory: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(config, state dict) of the vanilla loopgolf model equal to the Hugging Face checkpoint
    in ``directory``. Raises ConversionError naming the file and tensor for anything missing,
    misshapen or unsupported."""
    directory = Path(directory)
    cfg = read_hf_config(directory)
    kind = cfg.get("model_type")
    if not isinstance(kind, str) or kind not in SUPPORTED:
        archs = cfg.get("architectures")
        arch = ", ".join(archs) if isinstance(archs, list) and all(isinstance(a, str) for a in archs) else ""
        raise ConversionError(f"{directory / 'config.json'}: model_type {kind!r:.80} ({arch or 'unknown'}) is not supported; supported: {', '.join(SUPPORTED)}")
    src = SafetensorsReader(directory)
    try:
        if kind == "gpt2":
            mc, fill = _gpt2(cfg, directory, lambda: set(src.where))
        else:
            mc, fill = _llama_like(cfg, directory, gemma=kind == "gemma")
    except (TypeError, ValueError, ArithmeticError) as e:
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"{directory / 'config.json'}: {e}") from None
    with torch.device("meta"):
        template = GPT(mc).state_dict()
    # Controls keep the vanilla identity values (scales 1, mixes (1, 0), q gains as configured);
    # everything the source defines is filled in from its tensors.
    sd = {name: _identity_value(name, t, mc) for name, t in template.items()}
    fill(src, sd)
    for name, t in template.items():
        if tuple(sd[name].shape) != tuple(t.shape):  # pragma: no cover - a bug in a mapping
            raise ConversionError(f"internal: {name} has shape {tuple(sd[name].shape)}, the model's is {tuple(t.shape)}")
    return mc, sd


def _identity_value(name: str, t: Tensor, cfg: ModelConfig) -> Tensor:
    """The value a control tensor has in a fresh model (it makes the layer the plain
    transformer block); matrices get zeros until the source fills them."""
    if name in ("attn_scale", "mlp_scale"):
        return torch.ones(t.shape)
    if name == "resid_mix":
        out = torch.zeros(t.shape)
        out[:, 0] = 1.0
        return out
    if name == "q_gain":
        return torch.full(t.shape, cfg.qk_gain_init)
    return torch.zeros(t.shape)

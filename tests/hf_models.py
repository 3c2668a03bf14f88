"""Tiny random Hugging Face models built locally from transformers configs (no hub access), with
every norm gain and bias randomised so that a conversion that drops or mixes them up shows."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers  # in the test extra: a missing one fails loudly rather than skipping

VOCAB = 96


def _configs() -> dict:
    T = transformers
    return {
        "llama": (
            T.LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=56,
                num_hidden_layers=6,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                rms_norm_eps=1e-5,
            ),
            T.LlamaForCausalLM,
        ),
        "smollm": (
            T.LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=6,
                num_attention_heads=4,
                num_key_value_heads=1,
                max_position_embeddings=64,
                tie_word_embeddings=True,
                attention_bias=True,
                mlp_bias=True,
            ),
            T.LlamaForCausalLM,
        ),
        "gemma": (
            T.GemmaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=6,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=64,
            ),
            T.GemmaForCausalLM,
        ),
        "gpt2": (T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=6, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0), T.GPT2LMHeadModel),
    }


FAMILIES = tuple(_configs())


def build_hf(family: str, directory: Path, seed: int = 0) -> torch.nn.Module:
    """Save a tiny random ``family`` model (eval mode) to ``directory`` and return it."""
    cfg, cls = _configs()[family]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm gains and biases: random, so that each layer's own matters
                p.copy_((1.0 if "norm" in name or "ln_" in name else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def hf_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()

"""`loopgolf params` (parameter counts, FLOPs and the virtual-layer map of a configuration, no
training) and `loopgolf presets` (the named presets)."""

from __future__ import annotations

import argparse
import json

from loopgolf.commands.args import add_model_overrides, model_overrides, positive_int

DESCRIPTION: dict[str, str] = {}


def cmd_params(args: argparse.Namespace) -> int:
    import torch

    from loopgolf.config import get_preset
    from loopgolf.model.gpt import GPT, ModelConfig, effective_params, forward_flops_per_token, unique_params

    preset = get_preset(args.preset)
    cfg = ModelConfig.from_dict({**preset.model.to_dict(), **model_overrides(args)})
    with torch.device("meta"):
        model = GPT(cfg)
    seq_len = args.seq_len or preset.train.seq_len
    tensors = [{"name": n, "shape": list(p.shape), "numel": p.numel()} for n, p in model.named_parameters()]
    out = {
        "preset": preset.name,
        "unique_params": unique_params(model),
        "effective_params": effective_params(model),
        "forward_flops_per_token": forward_flops_per_token(cfg, seq_len),
        "seq_len": seq_len,
        "plan": model.plan.to_dict(),
        "tensors": tensors,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"preset {preset.name}: {model.plan.describe()}")
    print(
        f"unique params {out['unique_params']:,} | effective params {out['effective_params']:,} | forward FLOPs/token {out['forward_flops_per_token']:,} (seq {seq_len})"
    )
    print("virtual layer -> (attn, mlp): " + " ".join(f"{v}:({a},{m})" for v, (a, m) in enumerate(zip(model.plan.attn_of, model.plan.mlp_of))))
    width = max(len(t["name"]) for t in tensors)
    for t in tensors:
        print(f"  {t['name']:<{width}}  {str(tuple(t['shape'])):<16} {t['numel']:>12,}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from loopgolf.config import PRESETS

    if args.json:
        from dataclasses import asdict

        out = {
            n: {"description": p.description, "model": p.model.to_dict(), "train": asdict(p.train), "eval_batch_size": p.eval_batch_size}
            for n, p in PRESETS.items()
        }
        print(json.dumps(out, indent=2))
    else:
        width = max(len(n) for n in PRESETS)
        for n, p in PRESETS.items():
            print(f"{n:<{width}}  {p.description}")
    return 0


def register(name: str, p: argparse.ArgumentParser) -> None:
    from loopgolf.config import DEFAULT_PRESET, PRESETS

    if name == "presets":
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_presets)
        return
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    p.add_argument("--seq-len", type=positive_int, help="sequence length for the attention FLOPs")
    add_model_overrides(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_params)

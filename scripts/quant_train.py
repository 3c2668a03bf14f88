"""Train the models the quantization benchmarks score, with or without loop-aware QAT, and keep
their float weights (``loopgolf run`` keeps only the exported artifact).

    python scripts/quant_train.py --preset cpu-shared --steps 200 --qat off   --out /tmp/lgq/off
    python scripts/quant_train.py --preset cpu-shared --steps 200 --qat ste   --out /tmp/lgq/ste
    python scripts/quant_train.py --preset cpu-shared --steps 200 --qat noise --out /tmp/lgq/noise

Each run directory gets ``model.pt`` (float state dict), ``config.json`` and ``train.json``
(steps, seconds, final loss, the float model's val_bpb). Step budgets, not time budgets: the two
CPU cores are shared, so a time budget would make runs incomparable.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from loopgolf.config import get_preset
from loopgolf.data.dataset import Dataset
from loopgolf.data.default_corpus import ensure_default_dataset
from loopgolf.data.shards import TokenLoader
from loopgolf.evaluate import evaluate_bpb
from loopgolf.model.gpt import GPT, ModelConfig
from loopgolf.train.qat import QAT, QATConfig
from loopgolf.train.trainer import train


def open_default_dataset() -> Dataset:
    return Dataset.open(ensure_default_dataset(vocab_size=1024, progress=False))


def load_trained(run_dir: Path) -> tuple[GPT, dict]:
    """The float model a training run left behind, and its train.json record."""
    cfg = json.loads((run_dir / "config.json").read_text())
    model = GPT(ModelConfig.from_dict(cfg["model"]))
    model.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu"), strict=True)
    model.eval()
    return model, json.loads((run_dir / "train.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-shared")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--qat", default="off", choices=("off", "ste", "noise"))
    ap.add_argument("--qat-start", type=float, default=0.85)
    ap.add_argument("--qat-bits", type=int, default=6)
    ap.add_argument("--float-max-numel", type=int, default=16384, help="must match the export policy's fp16max")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    preset = get_preset(args.preset)
    tcfg = replace(preset.train, max_steps=args.steps, time_budget=None, seed=args.seed, device="cpu", val_every=0)
    ds = open_default_dataset()
    torch.manual_seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    model = GPT(preset.model)
    loader = TokenLoader(ds.train_shards, tcfg.seq_len, seed=tcfg.seed, vocab_size=ds.vocab_size)
    qat = QATConfig(mode=args.qat, start_frac=args.qat_start, bits=args.qat_bits, float_max_numel=args.float_max_numel, seed=args.seed)
    t0 = time.time()
    hook = None if qat.mode == "off" else QAT(model, qat)
    result = train(
        model,
        loader,
        tcfg,
        device=torch.device("cpu"),
        on_step=hook,
        forward=None if hook is None else hook.forward,
        log_path=out / "log.jsonl",
        progress=False,
    )
    seconds = time.time() - t0
    removed = 0 if hook is None else hook.weights
    model.eval()
    with torch.no_grad():
        pre = evaluate_bpb(model, ds.val_tokens(), ds.tables, tcfg.seq_len, batch_size=16)
    torch.save(model.state_dict(), out / "model.pt")
    (out / "config.json").write_text(
        json.dumps({"preset": args.preset, "model": preset.model.to_dict(), "train": asdict(tcfg), "qat": qat.to_dict()}, indent=2)
    )
    record = {
        "preset": args.preset,
        "steps": result.steps,
        "seconds": seconds,
        "final_train_loss": result.final_train_loss,
        "qat": qat.to_dict(),
        "qat_weights": removed,
        "val_bpb_float": pre.val_bpb,
        "val_loss_float": pre.val_loss,
    }
    (out / "train.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


if __name__ == "__main__":
    main()

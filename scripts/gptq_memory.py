"""Peak memory of a GPTQ export whose calibration windows come from an official-size shard.

A FineWeb training shard holds 1e8 tokens. Taking the calibration windows straight from the
memory-mapped file (what `loopgolf run` does) reads only the chosen windows; loading the whole
shard and converting it to int64 (what it did before 2026-12-04) costs about 1 GB. Each mode runs
in its own process (ru_maxrss is a per-process high-water mark):

    python scripts/gptq_memory.py --dir /tmp/lg-gptq-mem make      # writes a 1e8-token shard (200 MB)
    python scripts/gptq_memory.py --dir /tmp/lg-gptq-mem shards    # windows from the memmap
    python scripts/gptq_memory.py --dir /tmp/lg-gptq-mem int64     # the whole shard as int64, for comparison

The model is the `cpu` preset, freshly initialised (memory does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

import numpy as np
import torch

from loopgolf.config import get_preset
from loopgolf.data.shards import load_tokens, write_shard
from loopgolf.export.gptq import calibration_tokens
from loopgolf.export.pack import export_model
from loopgolf.export.quantize import parse_policy
from loopgolf.model.gpt import GPT

SHARD_TOKENS = 100_000_000


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("make", "shards", "int64"))
    ap.add_argument("--dir", type=Path, required=True, help="where the shard and the artifact go")
    args = ap.parse_args()
    shard = args.dir / "fineweb_train_000000.bin"
    if args.mode == "make":
        args.dir.mkdir(parents=True, exist_ok=True)
        write_shard(shard, np.random.default_rng(0).integers(1, 1024, size=SHARD_TOKENS, dtype=np.uint16))
        print(f"wrote {shard} ({shard.stat().st_size:,} bytes)")
        return
    torch.manual_seed(0)
    model = GPT(get_preset("cpu").model)
    before = peak_mib()
    if args.mode == "shards":
        calib = calibration_tokens(model, "train", shards=[shard], seq_len=128, seed=0)
    else:
        whole = torch.from_numpy(load_tokens([shard]).astype(np.int64))
        calib = calibration_tokens(model, "train", tokens=whole, seq_len=128, seed=0)
    export_model(model, args.dir / "artifact.lgz", policy=parse_policy("int6,gptq"), codec="zlib", calibration=calib)
    print(f"{args.mode}: peak RSS {peak_mib():.0f} MiB (after building the model: {before:.0f} MiB)")


if __name__ == "__main__":
    main()

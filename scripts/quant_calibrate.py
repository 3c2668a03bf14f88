"""Measure the compression ratios the byte planner predicts with, and (with --write) regenerate
``loopgolf/budget_calibration.json``:

    python scripts/quant_calibrate.py --write

For every codec it compresses, laid out exactly as the artifact stores them (codes as int8, fp16
scales and float values as byte planes):

- coded matrices: Gaussian rows coded as intN (N = 2..8) with percentile and MSE clips, for row
  lengths 16..8192 (bytes per element, row scales included: the entropy of the codes depends on
  how far the row max lies from the bulk, which grows with the row length);
- float16 pass-through values (Gaussian), float32 control values (1 + 5% noise) and int32 outlier
  indices (sorted, random), per element.

Then it exports whole models (presets of the cpu family, randomly initialised then perturbed by
Gaussian noise, under a few policies) with every codec and stores, per codec, the mean ratio of
the real artifact's tensor bytes to the sum of the per-tensor rates (``export_factor``): one
stream of mixed tensors compresses a little differently from each tensor alone (zstd notably).

Gaussian rows are what a freshly initialised model codes like. Trained matrices have heavier
tails: the row max lies further from the bulk, the codes concentrate near zero and compress 3-6%
better. ``--trained RUN...`` (float models saved by ``scripts/quant_train.py``) measures that:
per codec, clip and bit width, the ratio of the trained models' real coded bytes to what the
Gaussian rates predict for them (``trained_factor``, which the planner applies by default).

    python scripts/quant_calibrate.py --write                 # everything (about 10 min on 2 cores)
    python scripts/quant_calibrate.py --write --factors-only  # keep the rates, redo the exports
    python scripts/quant_calibrate.py --write --trained-only --trained /tmp/lgq/off /tmp/lgq/ste
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from loopgolf.export.artifact import CODECS, compress, stored_part_bytes
from loopgolf.export.quantize import CLIP_METHODS, QuantPolicy, encode_tensor

COLS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BITS = (2, 3, 4, 5, 6, 7, 8)
ELEMENTS = 1 << 18  # per measurement: large enough that codec start-up costs vanish
TABLE_PATH = Path(__file__).resolve().parents[1] / "loopgolf" / "budget_calibration.json"


def compressed_per_element(raw: bytes, numel: int) -> dict[str, float]:
    return {c: round(len(compress(raw, c)) / numel, 5) for c in CODECS}


def coded_rates(gen: torch.Generator) -> dict:
    out: dict = {clip: {str(b): {c: [] for c in CODECS} for b in BITS} for clip in CLIP_METHODS}
    for cols in COLS:
        rows = max(16, ELEMENTS // cols)
        w = torch.randn(rows, cols, generator=gen)
        for clip in CLIP_METHODS:
            for bits in BITS:
                q = encode_tensor("mlps.0.fc.weight", w, QuantPolicy.uniform(bits, clip=clip, float_max_numel=0))
                raw = b"".join(stored_part_bytes(t) for t in q.parts().values())
                for c, rate in compressed_per_element(raw, w.numel()).items():
                    out[clip][str(bits)][c].append([cols, rate])
        print(f"  cols {cols}: done", flush=True)
    return out


def measure() -> dict:
    gen = torch.Generator().manual_seed(0)
    n = ELEMENTS
    fp16 = (torch.randn(n, generator=gen) * 0.02).to(torch.float16)
    fp32 = 1.0 + 0.05 * torch.randn(n // 4, generator=gen)
    idx = torch.randperm(1 << 24, generator=gen)[: n // 16].sort().values.to(torch.int32)
    return {
        "coded": coded_rates(gen),
        "float16": compressed_per_element(stored_part_bytes(fp16), fp16.numel()),
        "float32": compressed_per_element(stored_part_bytes(fp32), fp32.numel()),
        "int32_index": compressed_per_element(stored_part_bytes(idx), idx.numel()),
    }


FACTOR_PRESETS = ("cpu-shared", "cpu-vanilla", "cpu-shared-lora4", "cpu-mini-loop", "cpu-k1", "cpu-shared-depth")
FACTOR_POLICIES = ("int8", "int6,fp16max=16384", "int5,clip=mse,outliers=8")


def export_payload(model, policy) -> bytes:
    """The uncompressed artifact payload ``export_model`` would write for ``model`` under ``policy``."""
    from loopgolf.export.artifact import build_payload
    from loopgolf.export.quantize import encode_state

    state = model.state_dict()
    q, aliases = encode_state(state, policy)
    payload, _, _ = build_payload(model.config.to_dict(), list(state), q, aliases, {"quant": policy.to_dict()})
    return payload


def export_factors(rates: dict, noise: float = 0.05) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Per codec: mean of (real artifact bytes - header - container) / (sum of tensor rates) over
    FACTOR_PRESETS x FACTOR_POLICIES, and the individual ratios."""
    from loopgolf.budget import predict_bytes
    from loopgolf.config import get_preset
    from loopgolf.export.artifact import container_overhead
    from loopgolf.export.quantize import parse_policy
    from loopgolf.model.gpt import GPT

    raw_table = {k: v for k, v in rates.items() if k != "export_factor"}
    ratios: dict[str, list[float]] = {c: [] for c in CODECS}
    for preset in FACTOR_PRESETS:
        torch.manual_seed(0)
        model = GPT(get_preset(preset).model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * noise)
        for text in FACTOR_POLICIES:
            policy = parse_policy(text)
            payload = export_payload(model, policy)
            for c in CODECS:
                pred = predict_bytes(model.config, policy, c, calibration=raw_table, weights="init")
                fixed = pred["header_bytes"] + container_overhead(c)
                actual = len(compress(payload, c)) + container_overhead(c)
                ratios[c].append((actual - fixed) / (pred["model_bytes"] - fixed))
        print(f"  exports of {preset}: done", flush=True)
    return {c: round(sum(r) / len(r), 5) for c, r in ratios.items()}, ratios


TRAINED_BITS = (3, 4, 5, 6, 7, 8)


def trained_factors(table: dict, runs: list[str]) -> tuple[dict, dict]:
    """codec -> clip -> bits -> mean over ``runs`` of (real coded bytes) / (Gaussian-rate prediction
    of those bytes); the coded bytes are the whole export minus the predicted non-coded part
    (float tensors, header, container), every tensor of 2-D size > 16,384 coded."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quant_train import load_trained

    from loopgolf.budget import predict_bytes
    from loopgolf.export.artifact import FLOAT_SCHEMES, container_overhead
    from loopgolf.export.quantize import parse_policy

    base = {k: v for k, v in table.items() if k != "trained_factor"}
    ratios: dict = {c: {clip: {str(b): [] for b in TRAINED_BITS} for clip in CLIP_METHODS} for c in CODECS}
    for run in runs:
        model, _ = load_trained(Path(run))
        for clip in CLIP_METHODS:
            for bits in TRAINED_BITS:
                policy = parse_policy(f"all={bits},fp16max=16384,clip={clip}")
                payload = export_payload(model, policy)
                for c in CODECS:
                    pred = predict_bytes(model.config, policy, c, calibration=base, weights="init")
                    coded = sum(r["predicted_bytes"] for r in pred["tensors"] if r["scheme"] not in FLOAT_SCHEMES)
                    actual = len(compress(payload, c)) + container_overhead(c)
                    ratios[c][clip][str(bits)].append((actual - (pred["model_bytes"] - coded)) / coded)
        print(f"  trained factors of {run}: done", flush=True)
    factors = {c: {clip: {b: round(sum(r) / len(r), 5) for b, r in by_bits.items()} for clip, by_bits in by_clip.items()} for c, by_clip in ratios.items()}
    return factors, ratios


ABOUT = (
    "Compression rates the byte planner predicts with (bytes per stored element, per codec). Generated by "
    "python scripts/quant_calibrate.py --write: do not edit by hand. See that script for what was measured; "
    "coded maps clip -> bits -> codec -> [[row length, bytes per element]]."
)


def format_table(table: dict) -> str:
    """The table as JSON, nested objects expanded and each innermost object or curve on one line
    (so a regenerated table diffs line by line)."""

    def dump(obj, indent: int) -> str:
        flat = json.dumps(obj)
        if not isinstance(obj, dict) or (all(not isinstance(v, dict) for v in obj.values()) and len(flat) < 200):
            return flat
        pad = " " * (indent + 2)
        items = [f"{pad}{json.dumps(k)}: {dump(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"

    return dump({"about": ABOUT, **{k: v for k, v in table.items() if k != "about"}}, 0) + "\n"


def write_table(table: dict) -> None:
    TABLE_PATH.write_text(format_table(table), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"rewrite {TABLE_PATH.name}")
    ap.add_argument("--factors-only", action="store_true", help="keep the stored per-tensor rates, measure only the export factors")
    ap.add_argument("--trained", nargs="+", metavar="RUN", help="trained float models (scripts/quant_train.py run dirs) to measure trained_factor on")
    ap.add_argument("--trained-only", action="store_true", help="keep everything else, measure only trained_factor (needs --trained)")
    args = ap.parse_args()
    if args.trained_only and not args.trained:
        ap.error("--trained-only needs --trained RUN...")
    t0 = time.time()
    if args.factors_only or args.trained_only:
        from loopgolf.budget import calibration_table

        table = {k: v for k, v in calibration_table().items() if k != "about"}
    else:
        table = {"codecs": list(CODECS), **measure()}
    if not args.trained_only:
        table["export_factor"], ratios = export_factors(table)
        for c, r in ratios.items():
            print(f"  {c}: export factor {table['export_factor'][c]:.4f} (min {min(r):.4f}, max {max(r):.4f})")
    if args.trained:
        table["trained_factor"], tratios = trained_factors(table, args.trained)
        for c, by_clip in tratios.items():
            for clip, by_bits in by_clip.items():
                print(f"  {c} {clip}: " + "  ".join(f"{b}b {table['trained_factor'][c][clip][b]:.4f} [{min(r):.4f}-{max(r):.4f}]" for b, r in by_bits.items()))
    print(f"measured in {time.time() - t0:.0f} s")
    print("int6 percentile, 512-long rows:", {c: r for c, rows in table["coded"]["percentile"]["6"].items() for x, r in rows if x == 512})
    if args.write:
        write_table(table)
        print(f"wrote {TABLE_PATH}")


if __name__ == "__main__":
    main()

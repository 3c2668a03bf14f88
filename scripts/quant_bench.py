"""Quantization benchmarks on trained CPU-scale models (numbers go to docs/LOG.md).

First train the models (step budgets; see bench/quant_train.py):

    python scripts/quant_train.py --steps 200 --qat off   --out /tmp/lgq/off
    python scripts/quant_train.py --steps 200 --qat ste   --out /tmp/lgq/ste
    python scripts/quant_train.py --steps 200 --qat noise --out /tmp/lgq/noise

then

    python scripts/quant_bench.py bytes   --run /tmp/lgq/off     # bytes per matrix parameter, codecs, code packing
    python scripts/quant_bench.py gap     --runs /tmp/lgq/off /tmp/lgq/ste /tmp/lgq/noise   # int6 roundtrip gaps
    python scripts/quant_bench.py gptq    --run /tmp/lgq/off     # RTN vs GPTQ (train / self calibration) at int6, int5
    python scripts/quant_bench.py planner --run /tmp/lgq/off     # predicted vs exported bytes on the trained model

Every subcommand prints a table and, with --json FILE, writes its numbers. Scores are val_bpb on
the whole validation split of the embedded default corpus, non-overlapping windows of the
training sequence length.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_train import load_trained, open_default_dataset

from loopgolf.budget import predict_bytes
from loopgolf.data.shards import load_tokens
from loopgolf.evaluate import evaluate_bpb
from loopgolf.export.artifact import CODECS, compress
from loopgolf.export.gptq import calibration_tokens, collect_hessians
from loopgolf.export.pack import export_model, load_model
from loopgolf.export.quantize import encode_state, parse_policy

# c_k / c_v of the 256-wide CPU models hold 32,768 weights: below this threshold they would stay
# fp16, so every shared matrix is coded (QAT in quant_train.py uses the same threshold).
FP16MAX = "fp16max=16384"


def score(model: torch.nn.Module, ds, seq_len: int) -> float:
    model.eval()
    with torch.no_grad():
        return evaluate_bpb(model, ds.val_tokens(), ds.tables, seq_len, batch_size=16).val_bpb


def roundtrip(model, policy_text: str, ds, seq_len: int, *, calibration=None, hessians=None, codec: str = "auto") -> dict:
    """Export under a policy, reload from the file alone, score."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.lgz"
        t0 = time.time()
        info = export_model(model, path, policy=parse_policy(policy_text), codec=codec, calibration=calibration, hessians=hessians)
        export_s = time.time() - t0
        reloaded, _ = load_model(path)
    s = info.to_summary()
    return {
        "policy": policy_text,
        "codec": info.codec,
        "model_bytes": info.total_bytes,
        "bytes_per_matrix_param": s["bytes_per_matrix_param"],
        "val_bpb_post": score(reloaded, ds, seq_len),
        "export_seconds": export_s,
    }


def cmd_bytes(args) -> dict:
    model, _ = load_trained(Path(args.run))
    out: dict = {"policies": [], "packing": {}}
    for text in (f"int6,{FP16MAX}", f"all=6,{FP16MAX}", f"int5,{FP16MAX}", f"int8,{FP16MAX}"):
        for codec in CODECS:
            info = export_model(model, Path(tempfile.gettempdir()) / "lg_bytes.lgz", policy=parse_policy(text), codec=codec)
            s = info.to_summary()
            row = {"policy": text, "codec": codec, "model_bytes": info.total_bytes, "bytes_per_matrix_param": s["bytes_per_matrix_param"]}
            out["policies"].append(row)
            print(f"{text:22s} {codec:7s} {info.total_bytes:>10,} B  {s['bytes_per_matrix_param']:.4f} B/matrix param")
    # Code storage: one code per byte (what the artifact does) against bit-packed codes.
    for bits in (4, 5, 6, 7):
        q, _ = encode_state(model.state_dict(), parse_policy(f"all={bits},{FP16MAX}"))
        coded = [t for t in q.values() if t.bits is not None]
        n = sum(t.numel for t in coded)
        one = b"".join(t.data.numpy().tobytes() for t in coded)
        offset = np.concatenate([(t.data.numpy().astype(np.int16).ravel() + 2 ** (bits - 1) - 1).astype(np.uint8) for t in coded])
        packed = np.packbits(np.unpackbits(offset[:, None], axis=1)[:, 8 - bits :].ravel()).tobytes()
        res = {codec: {"int8": len(compress(one, codec)) / n, "packed": len(compress(packed, codec)) / n} for codec in CODECS}
        out["packing"][bits] = res
        print(f"codes only, {bits} bits: " + "  ".join(f"{c} int8 {r['int8']:.4f} packed {r['packed']:.4f}" for c, r in res.items()))
    return out


def cmd_gap(args) -> dict:
    ds = open_default_dataset()
    rows = []
    for run in args.runs:
        model, rec = load_trained(Path(run))
        seq_len = json.loads((Path(run) / "config.json").read_text())["train"]["seq_len"]
        pre = score(model, ds, seq_len)
        for text in args.policies:
            r = roundtrip(model, text, ds, seq_len)
            r.update(run=run, qat=rec["qat"]["mode"], steps=rec["steps"], val_bpb_pre=pre, gap=r["val_bpb_post"] - pre)
            rows.append(r)
            print(
                f"{run:22s} qat={r['qat']:6s} {text:22s} pre {pre:.4f} post {r['val_bpb_post']:.4f} gap {r['gap']:+.4f}  {r['model_bytes']:,} B ({r['codec']})"
            )
    return {"rows": rows}


def cmd_gptq(args) -> dict:
    ds = open_default_dataset()
    model, rec = load_trained(Path(args.run))
    seq_len = json.loads((Path(args.run) / "config.json").read_text())["train"]["seq_len"]
    pre = score(model, ds, seq_len)
    train_stream = load_tokens(ds.train_shards, vocab_size=ds.vocab_size)
    t0 = time.time()
    calib = {}
    if "train" in args.sources:
        calib["train"] = calibration_tokens(model, "train", tokens=train_stream, num_seqs=args.calib_seqs, seq_len=seq_len, seed=0)
    if "self" in args.sources:
        calib["self"] = calibration_tokens(model, "self", num_seqs=args.calib_seqs, seq_len=seq_len, seed=0, temperature=1.0)
    print(f"calibration tokens in {time.time() - t0:.0f} s")
    hessians = {k: collect_hessians(model, v) for k, v in calib.items()}
    rows = []
    for bits in args.bits:
        variants = [
            ("rtn", f"int{bits},{FP16MAX}", None),
            ("rtn+mse", f"int{bits},{FP16MAX},clip=mse", None),
            ("gptq/train", f"int{bits},{FP16MAX},gptq", "train"),
            ("gptq/self", f"int{bits},{FP16MAX},gptq", "self"),
            ("gptq/train+mse", f"int{bits},{FP16MAX},gptq,clip=mse", "train"),
            ("rtn+outliers64", f"int{bits},{FP16MAX},outliers=64", None),
            ("gptq/train+lowrank4", f"int{bits},{FP16MAX},gptq,lowrank=4", "train"),
        ]
        for label, text, source in variants:
            if source is not None and source not in calib:
                continue
            r = roundtrip(model, text, ds, seq_len, hessians=hessians[source] if source else None)
            r.update(label=label, bits=bits, val_bpb_pre=pre, gap=r["val_bpb_post"] - pre)
            rows.append(r)
            print(f"int{bits} {label:20s} post {r['val_bpb_post']:.4f} gap {r['gap']:+.4f}  {r['model_bytes']:,} B  export {r['export_seconds']:.1f} s")
    return {"run": args.run, "val_bpb_pre": pre, "rows": rows}


def cmd_planner(args) -> dict:
    model, _ = load_trained(Path(args.run))
    rows = []
    for text in (f"int6,{FP16MAX}", "int6", "int8", f"int5,{FP16MAX},clip=mse", f"all=6,{FP16MAX},outliers=32,lowrank=2"):
        for codec in ("brotli", "lzma", "zlib", "zstd"):
            if codec not in CODECS:
                continue
            info = export_model(model, Path(tempfile.gettempdir()) / "lg_plan.lgz", policy=parse_policy(text), codec=codec)
            pred = predict_bytes(model.config, parse_policy(text), codec)["model_bytes"]
            err = pred / info.total_bytes - 1
            rows.append({"policy": text, "codec": codec, "actual": info.total_bytes, "predicted": pred, "error": err})
            print(f"{text:40s} {codec:7s} actual {info.total_bytes:>10,} predicted {pred:>10,} {100 * err:+.2f}%")
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bytes")
    b.add_argument("--run", required=True)
    g = sub.add_parser("gap")
    g.add_argument("--runs", nargs="+", required=True)
    g.add_argument("--policies", nargs="+", default=[f"int6,{FP16MAX}"])
    q = sub.add_parser("gptq")
    q.add_argument("--run", required=True)
    q.add_argument("--bits", type=int, nargs="+", default=[6, 5])
    q.add_argument("--calib-seqs", type=int, default=64)
    q.add_argument("--sources", nargs="+", default=["train", "self"], choices=["train", "self"], help="calibration sources")
    p = sub.add_parser("planner")
    p.add_argument("--run", required=True)
    for s in (b, g, q, p):
        s.add_argument("--json", help="write the numbers to this file")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    t0 = time.time()
    out = {"bytes": cmd_bytes, "gap": cmd_gap, "gptq": cmd_gptq, "planner": cmd_planner}[args.cmd](args)
    out["seconds"] = time.time() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

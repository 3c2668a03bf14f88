"""The generated ``train_gpt.py``: its code bytes per form, and its speed against ``loopgolf run``.

Bytes: for each preset, the script in every form (plain, minified, each optionally wrapped in an
lzma or brotli self-extracting stub), beside the official baseline's 47,642 bytes and the
1.0611 record's 158,429 (their records folders in openai/parameter-golf; docs/background.md). The plain form's size is what ``loopgolf run`` reports as
``code_bytes``.

Speed (``--time-steps N``): train the ``cpu`` preset for N steps on the same data and seed, once
through ``loopgolf run`` and once through the generated script (in a fresh directory, with only
DATA_PATH, TOKENIZER_PATH and SEED set), alternating ``--repeats`` times, and compare the mean
step time (train seconds / steps) from each run's summary. Both are subprocesses so neither
inherits the other's warm state. Run it on a quiet machine.

    python scripts/submission_script.py [--presets cpu,baseline] [--time-steps 60 --data DIR --repeats 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from loopgolf.codebytes import COMPRESSORS, FORMS, Bundle
from loopgolf.config import RunConfig, get_preset
from loopgolf.rundir import RunDir

OFFICIAL_BASELINE_CODE = 47_642
OFFICIAL_RECORD_CODE = 158_429


def code_bytes_table(presets: list[str]) -> dict[str, dict[str, int]]:
    table = {}
    for preset in presets:
        bundle = Bundle.of(RunConfig.from_preset(get_preset(preset)))
        row = {}
        for form in FORMS:
            for codec in (None, *COMPRESSORS):
                row[form if codec is None else f"{form}+{codec}"] = len(bundle.render(form, codec).encode("utf-8"))
        table[preset] = row
    return table


def _summary(run_dir: Path) -> dict:
    return RunDir(run_dir).read_summary().to_dict()


def time_once(kind: str, data: Path, tokenizer: Path, steps: int, seed: int, work: Path) -> dict:
    out = work / f"{kind}-{len(list(work.iterdir()))}"
    if kind == "loopgolf":
        cmd = [
            sys.executable,
            "-m",
            "loopgolf",
            "run",
            "--preset",
            "cpu",
            "--data",
            str(data),
            "--steps",
            str(steps),
            "--seed",
            str(seed),
            "--out",
            str(out),
            "--quiet",
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        summary = _summary(out)
    else:
        out.mkdir()
        script = out / "train_gpt.py"
        cfg = RunConfig.from_preset(get_preset("cpu")).with_changes({"train.max_steps": steps})
        script.write_text(Bundle.of(cfg).render())
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        env.update(DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer), SEED=str(seed))
        subprocess.run([sys.executable, script.name], cwd=out, env=env, check=True, stdout=subprocess.DEVNULL)
        summary = _summary(next(p.parent for p in out.rglob("summary.json")))
    return {
        "kind": kind,
        "steps": summary["steps"],
        "train_seconds": summary["train_seconds"],
        "step_ms": 1000 * summary["train_seconds"] / summary["steps"],
        "final_loss": summary.get("final_train_loss"),
        "val_bpb_post": summary["val_bpb_post"],
        "code_id": summary["code_id"],
        "code_bytes": summary["code_bytes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="cpu,baseline")
    ap.add_argument("--time-steps", type=int, default=0, help="0 = bytes only")
    ap.add_argument("--data", type=Path, help="dataset directory (official layout or loopgolf data output)")
    ap.add_argument("--tokenizer", type=Path, help="defaults to the dataset's tokenizer.model")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    result: dict = {
        "code_bytes": code_bytes_table(args.presets.split(",")),
        "official_baseline": OFFICIAL_BASELINE_CODE,
        "official_record": OFFICIAL_RECORD_CODE,
    }
    if not args.json:
        forms = list(next(iter(result["code_bytes"].values())))
        print("| preset | " + " | ".join(forms) + " |")
        print("|---|" + "---:|" * len(forms))
        for preset, row in result["code_bytes"].items():
            print(f"| {preset} | " + " | ".join(f"{row[f]:,}" for f in forms) + " |")
        print(f"official baseline {OFFICIAL_BASELINE_CODE:,}, record {OFFICIAL_RECORD_CODE:,}")
    if args.time_steps:
        if args.data is None:
            ap.error("--time-steps needs --data")
        tokenizer = args.tokenizer or args.data / "tokenizer.model"
        with tempfile.TemporaryDirectory() as tmp:
            runs = [
                time_once(kind, args.data, tokenizer, args.time_steps, args.seed, Path(tmp)) for _ in range(args.repeats) for kind in ("loopgolf", "script")
            ]
        result["timing"] = runs
        means = {k: statistics.mean(r["step_ms"] for r in runs if r["kind"] == k) for k in ("loopgolf", "script")}
        result["step_ms"] = means
        result["script_over_loopgolf"] = means["script"] / means["loopgolf"]
        if not args.json:
            for r in runs:
                print(
                    f"{r['kind']:9s} {r['steps']} steps {r['train_seconds']:.2f} s  {r['step_ms']:.1f} ms/step  "
                    f"final loss {r['final_loss']:.6f}  val_bpb {r['val_bpb_post']:.6f}  code {r['code_bytes']:,} B id {r['code_id'][:12]}"
                )
            print(f"mean ms/step: loopgolf {means['loopgolf']:.1f}, script {means['script']:.1f}, ratio {result['script_over_loopgolf']:.3f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()

"""`loopgolf submission`: finished runs (seeds of one config) -> a Parameter Golf records folder."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = {
    "submission": "Write a records folder: train_gpt.py generated from the loopgolf modules that train, export and score "
    "the runs' configuration (its size is the code_bytes the runs reported), README.md, submission.json and "
    "train_seed<N>.log per run. Refuses runs of different configurations (naming the field), unfinished or "
    "uptraining runs, repeated seeds, any seed over the cap, and runs whose files disagree (summary, artifact, log)."
}


def cmd_submission(args: argparse.Namespace) -> int:
    import sys

    from loopgolf.submit.records import SCRIPT_NAME, SubmissionInfo, write_records

    info = SubmissionInfo(name=args.name, author=args.author or "", github_id=args.github_id or "", blurb=args.blurb or "", date=args.date)
    sub = write_records(
        args.runs,
        args.out,
        info=info,
        form=("minify" if args.minify else "plain") if args.minify or args.compress else None,
        compress=args.compress,
        force=args.force,
        allow_code_change=args.allow_code_change,
    )
    for w in sub["record_warnings"]:
        print(f"loopgolf submission: warning: not a valid record attempt: {w} (written as track {sub['track']})", file=sys.stderr)
    if args.json:
        print(json.dumps(sub, indent=2))
        return 0
    print(
        f"loopgolf submission: {args.out}: {SCRIPT_NAME} {sub['bytes_code']:,} bytes, {len(sub['seeds'])} seed(s), "
        f"val_bpb {sub['val_bpb']:.8f} (std {sub['val_bpb_std']:.8f}), at most {sub['bytes_total']:,} of {sub['cap_bytes']:,} bytes"
    )
    for seed, r in sub["seed_results"].items():
        print(f"  seed {seed}: val_bpb {r['val_bpb']:.8f}  {r['steps']} steps  {r['artifact_bytes']:,} bytes")
    if not info.author or not info.github_id:
        print("  fill in author and github_id in submission.json (or pass --author/--github-id) before opening the pull request")
    return 0


def register(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run directories, one per seed")
    p.add_argument("--out", required=True, help="records folder to write (e.g. records/track_10min_16mb/2026-12-05_MyModel)")
    p.add_argument("--name", help="submission name (default: loopgolf PRESET)")
    p.add_argument("--author", help="author for submission.json")
    p.add_argument("--github-id", help="GitHub id for submission.json")
    p.add_argument("--blurb", help="one-paragraph description (default: the model's technique summary)")
    p.add_argument("--date", help="submission date, ISO (default: today, UTC)")
    p.add_argument(
        "--minify",
        action="store_true",
        help="minify the embedded modules (python-minifier; docstrings dropped, names kept). Without --minify or --compress "
        "the script takes the form the runs counted (their `run --code-form`)",
    )
    p.add_argument("--compress", nargs="?", const="lzma", choices=("lzma", "brotli"), help="wrap the script in a self-extracting stub (default lzma)")
    p.add_argument("--allow-code-change", action="store_true", help="accept runs made by other loopgolf code than this installation's (their code id differs)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--json", action="store_true", help="print submission.json")
    p.set_defaults(func=cmd_submission)

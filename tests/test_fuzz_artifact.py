"""Fuzz load_model with mutated, resealed artifacts (loopgolf/bench/fuzz_artifact.py): every case must be
refused with an ArtifactError or load with a finite forward pass: no other exception, no NaN,
no hang."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fuzzed_artifacts_fail_cleanly_or_load_finite():
    cmd = [sys.executable, "-m", "loopgolf.bench.fuzz_artifact", "--cases", "300", "--seed", "1", "--json", "--max-memory-gb", "6"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip(), f"no output (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    summary = json.loads(proc.stdout)
    counts = summary["counts"]
    findings = json.dumps(summary["first_findings"], indent=1)[:8000]
    assert counts["traceback"] == 0, f"{counts}\n{findings}"
    assert counts["nan"] == 0, f"{counts}\n{findings}"
    assert counts["hang"] == 0, f"{counts}\n{findings}"
    assert counts["clean_error"] > 0 and counts["loaded_finite"] > 0, counts
    assert sum(counts.values()) == 300
    assert proc.returncode == 0, proc.stderr[-4000:]

"""A short round of the HTTP fuzzer (loopgolf/bench/fuzz_server.py) against a real `loopgolf
serve`: every malformed or extreme request answers cleanly (2xx keeping the API's contract, a 4xx
with a JSON error, or a closed connection where a request was only half sent), with no 5xx, no
traceback in the server's log, no hang, and the victim streams running meanwhile all finish whole
and equal to their known text."""

import json
import subprocess
import sys
from pathlib import Path

from loopgolf.bench.fuzz_server import BAD, CLASSES

ROOT = Path(__file__).resolve().parents[1]


def test_fuzzed_requests_are_answered_cleanly_while_victims_stream():
    cmd = [sys.executable, "-m", "loopgolf.bench.fuzz_server", "--cases", "300", "--seed", "1", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip(), f"no output (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    summary = json.loads(proc.stdout)
    findings = json.dumps(summary["first_findings"], indent=1)[:8000]
    totals = summary["totals"]
    for outcome in BAD:
        assert totals[outcome] == 0, f"{totals}\n{findings}"
    assert summary["cases"] == 300 and sum(sum(c.values()) for c in summary["counts"].values()) == 300
    for name in CLASSES:  # every class ran and was answered
        c = summary["counts"][name]
        assert c["ok"] + c["clean_4xx"] + c["closed"] >= 15, (name, c)
    assert totals["ok"] > 0 and totals["clean_4xx"] > 0
    assert summary["victims"]["completed"] > 0
    assert summary["server_exit_code"] == 0
    assert proc.returncode == 0, proc.stderr[-4000:]

"""Sweeps that share a directory, and sweeps that are stopped (issue 27): a run belongs to the
process that holds its run directory's lock, and a sweep's workers die with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_lab import TINY, _fake_run

from loopgolf.lab.ledger import parse_ledger
from loopgolf.lab.store import Store
from loopgolf.rundir import LOCK_NAME, RunDir

LINUX = sys.platform.startswith("linux")
# Three runs (a: seeds 1 and 2, b: seed 1) of two steps each.
SHORT = TINY.replace("steps = 3", "steps = 2").replace('name = "a"\npreset = "debug"', 'name = "a"\npreset = "debug"\nseeds = [1, 2]')
LONG = TINY.replace("steps = 3", "seconds = 120")  # a run that outlives the test unless stopped


def _sweep(ledger: Path, out: Path, store: Path, data: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "loopgolf", "sweep", str(ledger), "--out", str(out), "--store", str(store), "--data", str(data), "--jobs", "1", "--quiet"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(store: Path) -> list:
    with Store(store, readonly=True) as s:
        return s.rows()


def _events(run_dir: Path) -> list[str]:
    return [e.get("event") for e in RunDir(run_dir).read_log()]


def test_two_sweeps_over_one_out_run_each_run_once(tmp_path, text_dataset):
    ledger, out, store = tmp_path / "short.toml", tmp_path / "sweep", tmp_path / "s.sqlite"
    ledger.write_text(SHORT)
    procs = [_sweep(ledger, out, store, text_dataset) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert "failed" not in err and "Traceback" not in err, err
    run_dirs = sorted(out.glob("*/seed*"))
    assert [d.relative_to(out).as_posix() for d in run_dirs] == ["a/seed1", "a/seed2", "b/seed1"]
    for d in run_dirs:  # each run ran once: one start, its two steps, one end; none interleaved
        events = _events(d)
        assert events.count("start") == 1 and events.count("train") == 2 and events.count("end") == 1, (d, events)
        assert RunDir(d).read_summary().steps == 2 and not RunDir(d).locked_elsewhere()
    with Store(store) as s:
        assert sorted((r.variant, r.seed, r.status) for r in s.rows("tiny")) == [("a", 1, "done"), ("a", 2, "done"), ("b", 1, "done")]
    # What one sweep left to the other, it reported (and did not call a failure).
    reported = [line for _, err in results for line in err.splitlines() if "elsewhere:" in line]
    assert len(reported) <= 3 and all(line.split(": ")[1].split(" ")[0] in {str(d) for d in run_dirs} for line in reported), reported


def test_sweep_leaves_a_run_held_elsewhere_to_its_holder(tmp_path, text_dataset):
    from loopgolf.lab.sweep import IN_PROGRESS_ELSEWHERE, run_sweep

    ledger = parse_ledger(TINY.replace("steps = 3", "steps = 2"))
    out, store = tmp_path / "sweep", tmp_path / "s.sqlite"
    held = out / "a" / "seed1"
    with RunDir(held).lock():  # as a `loopgolf run` (or another sweep's worker) would
        res = run_sweep(ledger, out, store, jobs=1, threads=1, data=str(text_dataset), progress=False)
    assert res.failed == [] and res.done == [str(out / "b" / "seed1")]
    assert res.elsewhere == [(str(held), IN_PROGRESS_ELSEWHERE)]
    with Store(store) as s:
        assert [(r.variant, r.status) for r in s.rows("tiny")] == [("b", "done")]  # nothing filed for the held run
    assert sorted(p.name for p in held.iterdir()) == [LOCK_NAME]  # no sweep.log, no log: untouched


def test_worker_writes_nothing_for_a_run_it_does_not_hold(tmp_path, text_dataset):
    """The race a sweep's own check cannot close: the run is taken (or finished) by another
    process after the sweep looked and before its worker started."""
    from loopgolf.lab.sweep import _worker_command, plan_runs
    from loopgolf.lab.worker import EXIT_BUSY, EXIT_FINISHED

    ledger = parse_ledger(TINY.replace("steps = 3", "steps = 2"))
    out, store = tmp_path / "sweep", tmp_path / "s.sqlite"
    a1 = plan_runs(ledger, out, data=str(text_dataset), variants=["a"])[0]
    cmd, env = _worker_command(a1, ledger="tiny", store=store, cpus=None, threads=1)
    cmd[-1] = json.dumps({**json.loads(cmd[-1]), "parent": None})  # run here, not under a sweep
    a1.out.mkdir(parents=True)
    with RunDir(a1.out).lock():
        busy = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert busy.returncode == EXIT_BUSY, busy.stdout + busy.stderr
    assert "in use by another loopgolf process" in busy.stdout
    assert sorted(p.name for p in a1.out.iterdir()) == [LOCK_NAME]
    assert not store.exists() or _rows(store) == []
    # Finished by another process in the meantime: left exactly as it is (the sweep runs with --force).
    finished = _fake_run(out / "a", "seed2", bpb=2.0, seed=2)
    before = {p.name: p.read_bytes() for p in finished.iterdir()}
    a2 = plan_runs(ledger, out, data=str(text_dataset), variants=["a"], seeds=[2])[0]
    cmd, env = _worker_command(a2, ledger="tiny", store=store, cpus=None, threads=1)
    cmd[-1] = json.dumps({**json.loads(cmd[-1]), "parent": None})
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == EXIT_FINISHED, again.stdout + again.stderr
    assert {p.name: p.read_bytes() for p in finished.iterdir() if p.name != LOCK_NAME} == before
    assert not store.exists() or _rows(store) == []


def _state(pid: int) -> str | None:
    """The process's state letter (None once it is gone; ``Z``: dead, not yet reaped)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1]
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _start_long_sweep(tmp_path: Path, data: Path) -> tuple[subprocess.Popen, int, Path, Path]:
    """A sweep of one long run, once its worker holds the run directory: (sweep, worker pid, run dir, store)."""
    ledger, out, store = tmp_path / "long.toml", tmp_path / "sweep", tmp_path / "s.sqlite"
    ledger.write_text(LONG)
    cmd = [sys.executable, "-m", "loopgolf", "sweep", str(ledger), "--out", str(out), "--store", str(store), "--data", str(data)]
    sweep = subprocess.Popen([*cmd, "--jobs", "1", "--quiet", "--variants", "a"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = out / "a" / "seed1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lock = run_dir / LOCK_NAME
        text = lock.read_text().strip() if lock.is_file() else ""
        if text and int(text) != sweep.pid and RunDir(run_dir).locked_elsewhere() and (run_dir / "log.jsonl").is_file():
            return sweep, int(text), run_dir, store
        assert sweep.poll() is None, sweep.communicate()[1]
        time.sleep(0.2)
    sweep.kill()
    raise AssertionError("the sweep's worker never took its run directory")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _state(pid) in (None, "Z"):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not LINUX, reason="the kernel's parent-death signal is Linux's")
def test_a_killed_sweep_takes_its_worker_along(tmp_path, text_dataset):
    sweep, worker, run_dir, store = _start_long_sweep(tmp_path, text_dataset)
    try:
        os.kill(sweep.pid, signal.SIGKILL)
        sweep.wait(30)
        assert _gone_within(worker, 15), f"worker {worker} outlived the sweep (state {_state(worker)})"
    finally:
        if _state(worker) not in (None, "Z"):
            os.kill(worker, signal.SIGKILL)
    assert not RunDir(run_dir).locked_elsewhere()
    with Store(store) as s:  # the worker recorded why it stopped; the run is redone next time
        (row,) = s.rows("tiny")
    assert row.status == "failed" and "Terminated" in row.error, row
    assert _events(run_dir)[-1] == "error"


def test_a_terminated_sweep_stops_its_worker(tmp_path, text_dataset):
    sweep, worker, run_dir, store = _start_long_sweep(tmp_path, text_dataset)
    try:
        sweep.send_signal(signal.SIGTERM)
        _, err = sweep.communicate(timeout=60)
        assert sweep.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
        assert _gone_within(worker, 5), f"worker {worker} outlived the sweep (state {_state(worker)})"
    finally:
        if _state(worker) not in (None, "Z"):
            os.kill(worker, signal.SIGKILL)
    with Store(store) as s:
        (row,) = s.rows("tiny")
    assert row.status == "failed" and "Terminated" in row.error, row

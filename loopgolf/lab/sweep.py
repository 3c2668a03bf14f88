"""``loopgolf sweep``: every (variant, seed) of a ledger as a normal run directory.

Runs go to ``OUT/<variant>/seed<N>``. A sweep is resumable: a run whose directory holds a
``summary.json`` is finished and skipped; one that failed or was killed (no summary) is redone
from the start. Runs execute in separate worker processes (:mod:`loopgolf.lab.worker`), at most
``jobs`` at once, each pinned to its own ``threads`` cores (``sched_setaffinity`` where the OS has
it, and torch's and OpenMP's thread counts), so ``jobs * threads`` never exceeds the cores. Each
worker writes its own start and end rows to the results store.

Two sweeps (or a sweep and a ``loopgolf run``) may share a directory: a run is run by the process
that holds its run directory's lock (``loopgolf run`` holds it for the whole run); the others
report it as in progress (or finished) elsewhere and write nothing about it. The workers die with
the sweep: it terminates them when it is interrupted, and on Linux the kernel does when it is
killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopgolf.lab.ledger import Ledger, LedgerError, resolve
from loopgolf.rundir import RunDir
from loopgolf.util import atomic_write_json


@dataclass(frozen=True)
class PlannedRun:
    variant: str
    seed: int
    out: Path
    options: dict[str, Any]  # RunOptions fields, JSON-ready

    @property
    def finished(self) -> bool:
        return RunDir(self.out).finished


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (empty where the OS does not say)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return []


def usable_cores() -> int:
    return len(allowed_cpus()) or os.cpu_count() or 1


def plan_runs(
    ledger: Ledger, out: Path, *, data: str | None = None, variants: list[str] | None = None, seeds: list[int] | None = None, device: str | None = None
) -> list[PlannedRun]:
    """The runs of ``ledger`` (optionally only ``variants``, with ``seeds`` instead of theirs)."""
    chosen = [ledger.variant(v) for v in variants] if variants else list(ledger.variants)
    data = data if data is not None else ledger.data
    runs = []
    for v in chosen:
        rv = resolve(ledger, v)
        train = dict(v.train)
        # The ledger's budget replaces the preset's whole stop rule: every variant stops the same way.
        train["max_steps"], train["time_budget"] = rv.max_steps, rv.time_budget
        for seed in seeds or v.seeds:
            run_dir = out / v.name / f"seed{seed}"
            runs.append(
                PlannedRun(
                    v.name,
                    seed,
                    run_dir,
                    {
                        "preset": v.preset,
                        "data": None if data == "default" else str(Path(data).resolve()),
                        "out": str(run_dir.resolve()),
                        "cap_bytes": ledger.cap_bytes,
                        "seed": seed,
                        "model_overrides": v.model,
                        "quant": v.quant,
                        "train_overrides": train,
                        "device": device,
                        "progress": False,
                        "force": True,
                    },
                )
            )
    return runs


def _worker_command(run: PlannedRun, *, ledger: str, store: Path, cpus: list[int] | None, threads: int) -> tuple[list[str], dict[str, str]]:
    job = {
        "options": run.options,
        "ledger": ledger,
        "variant": run.variant,
        "seed": run.seed,
        "store": str(store),
        "cpus": cpus,
        "threads": threads,
        "parent": os.getpid(),
    }
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return [sys.executable, "-m", "loopgolf.lab.worker", json.dumps(job)], env


IN_PROGRESS_ELSEWHERE = "in progress elsewhere"
FINISHED_ELSEWHERE = "finished elsewhere"


@dataclass
class SweepResult:
    planned: int
    skipped: int  # finished before the sweep started
    done: list[str]
    failed: list[tuple[str, str]]  # (run dir, last lines of its output)
    elsewhere: list[tuple[str, str]] = field(default_factory=list)  # (run dir, IN_PROGRESS_ELSEWHERE or FINISHED_ELSEWHERE)


class _Children:
    """The sweep's worker processes: started only while the sweep is not stopping, and all
    terminated (SIGTERM, then SIGKILL after ``grace`` seconds) when it stops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self.stopping = False

    def start(self, cmd: list[str], **kw: Any) -> subprocess.Popen | None:
        with self._lock:
            if self.stopping:
                return None
            proc = subprocess.Popen(cmd, **kw)
            self._procs.add(proc)
            return proc

    def wait(self, proc: subprocess.Popen) -> int:
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._procs.discard(proc)

    def stop(self, grace: float = 10.0) -> None:
        with self._lock:
            self.stopping = True
            procs = list(self._procs)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_sweep(
    ledger: Ledger,
    out: Path,
    store: Path,
    *,
    jobs: int | None = None,
    threads: int = 1,
    data: str | None = None,
    variants: list[str] | None = None,
    seeds: list[int] | None = None,
    device: str | None = None,
    progress: bool = True,
) -> SweepResult:
    """Run the unfinished runs of ``ledger``. A run another process holds (its run directory's
    lock) is left to it and reported in ``elsewhere``, as is one that another process finished
    after this sweep planned it; neither is a failure, and neither is recorded in the store by
    this sweep. SIGTERM or SIGINT (and any error) stops the sweep's workers with it."""
    from loopgolf.lab.store import Store
    from loopgolf.lab.worker import EXIT_BUSY, EXIT_FAILED, EXIT_FINISHED, LOG_NAME

    cores = usable_cores()
    if threads < 1:
        raise LedgerError(f"--threads must be at least 1, got {threads}")
    if device and device.startswith("cuda"):
        jobs = 1 if jobs is None else jobs  # one GPU: one run at a time unless told otherwise
    jobs = max(1, cores // threads) if jobs is None else jobs
    if jobs < 1 or jobs * threads > cores:
        raise LedgerError(f"{jobs} job(s) x {threads} thread(s) would oversubscribe the {cores} usable core(s)")
    runs = plan_runs(ledger, out, data=data, variants=variants, seeds=seeds, device=device)
    todo = [r for r in runs if not r.finished]
    Store(store).close()  # a store the workers cannot write fails here, before anything runs
    if any(r.options["data"] is None for r in todo):
        from loopgolf.data.default_corpus import ensure_default_dataset

        ensure_default_dataset(progress=progress)  # once, here, not raced by the workers
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "ledger.json", {"ledger": ledger.name, "source": ledger.source, "budget": {ledger.budget_kind: ledger.budget}})

    from tqdm.auto import tqdm

    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=f"sweep {ledger.name}", unit="run", disable=not progress, dynamic_ncols=True)
    allowed = allowed_cpus()
    free_slots = list(range(jobs))
    lock = threading.Lock()
    children = _Children()
    done: list[str] = []
    failed: list[tuple[str, str]] = []
    elsewhere: list[tuple[str, str]] = []

    def settle(run: PlannedRun, bucket: list, item: Any) -> None:
        with lock:
            bucket.append(item)
            bar.set_postfix(failed=len(failed), elsewhere=len(elsewhere), refresh=False)
            bar.update(1)

    def execute(run: PlannedRun) -> None:
        if children.stopping:
            return
        rundir = RunDir(run.out)
        if rundir.finished:  # finished by another process since this sweep planned it
            return settle(run, elsewhere, (str(run.out), FINISHED_ELSEWHERE))
        if rundir.locked_elsewhere():  # another process is running it: leave it be (no worker needed)
            return settle(run, elsewhere, (str(run.out), IN_PROGRESS_ELSEWHERE))
        with lock:
            slot = free_slots.pop()
        cpus = allowed[slot * threads : (slot + 1) * threads] if allowed else None
        cmd, env = _worker_command(run, ledger=ledger.name, store=store, cpus=cpus, threads=threads)
        run.out.mkdir(parents=True, exist_ok=True)
        try:
            # The worker's output goes here until it holds the run directory's lock; then to
            # sweep.log (which this process never touches: another sweep's worker may own it).
            with tempfile.TemporaryFile() as early:
                proc = children.start(cmd, env=env, stdin=subprocess.DEVNULL, stdout=early, stderr=subprocess.STDOUT)
                if proc is None:
                    return
                rc = children.wait(proc)
                early.seek(0)
                early_text = early.read().decode("utf-8", errors="replace")
        finally:
            with lock:
                free_slots.append(slot)
        if rc == EXIT_BUSY:
            settle(run, elsewhere, (str(run.out), IN_PROGRESS_ELSEWHERE))
        elif rc == EXIT_FINISHED:
            settle(run, elsewhere, (str(run.out), FINISHED_ELSEWHERE))
        elif rc == 0 and run.finished:
            settle(run, done, str(run.out))
        else:
            lines = early_text.splitlines()
            log = run.out / LOG_NAME
            if rc == EXIT_FAILED and log.is_file():
                lines += log.read_text(encoding="utf-8", errors="replace").splitlines()
            if rc < 0:
                lines.append(f"(worker killed by signal {-rc})")
            settle(run, failed, (str(run.out), "\n".join(lines[-5:])))

    t0 = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() else None
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        for future in [pool.submit(execute, r) for r in todo]:
            future.result()
    except BaseException:
        children.stop()  # SIGTERM, SIGINT or an error: the workers go with the sweep
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        bar.close()
    if progress:
        print(
            f"sweep {ledger.name}: {len(done)} run(s) done, {len(failed)} failed, {len(runs) - len(todo)} skipped (finished before), "
            f"{len(elsewhere)} left to other processes, in {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )
    return SweepResult(len(runs), len(runs) - len(todo), done, failed, elsewhere)

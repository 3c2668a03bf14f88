"""``loopgolf sweep``: every (variant, seed) of a ledger as a normal run directory.

Runs go to ``OUT/<variant>/seed<N>``. A sweep is resumable: a run whose directory holds a
``summary.json`` is finished and skipped; one that failed or was killed (no summary) is redone
from the start. Runs execute in separate worker processes (:mod:`loopgolf.lab.worker`), at most
``jobs`` at once, each pinned to its own ``threads`` cores (``sched_setaffinity`` where the OS has
it, and torch's and OpenMP's thread counts), so ``jobs * threads`` never exceeds the cores. Each
worker writes its own start and end rows to the results store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopgolf.lab.ledger import Ledger, LedgerError, resolve
from loopgolf.rundir import RunDir


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
                        "train_overrides": train,
                        "device": device,
                        "progress": False,
                        "force": True,
                    },
                )
            )
    return runs


def _worker_command(run: PlannedRun, *, ledger: str, store: Path, cpus: list[int] | None, threads: int) -> tuple[list[str], dict[str, str]]:
    job = {"options": run.options, "ledger": ledger, "variant": run.variant, "seed": run.seed, "store": str(store), "cpus": cpus, "threads": threads}
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return [sys.executable, "-m", "loopgolf.lab.worker", json.dumps(job)], env


@dataclass
class SweepResult:
    planned: int
    skipped: int
    done: list[str]
    failed: list[tuple[str, str]]  # (run dir, last lines of its output)


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
    if any(r.options["data"] is None for r in todo):
        from loopgolf.data.default_corpus import ensure_default_dataset

        ensure_default_dataset(progress=progress)  # once, here, not raced by the workers
    out.mkdir(parents=True, exist_ok=True)
    (out / "ledger.json").write_text(
        json.dumps({"ledger": ledger.name, "source": ledger.source, "budget": {ledger.budget_kind: ledger.budget}}, indent=2) + "\n"
    )

    from tqdm.auto import tqdm

    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=f"sweep {ledger.name}", unit="run", disable=not progress, dynamic_ncols=True)
    allowed = allowed_cpus()
    free_slots = list(range(jobs))
    lock = threading.Lock()
    done: list[str] = []
    failed: list[tuple[str, str]] = []

    def execute(run: PlannedRun) -> None:
        with lock:
            slot = free_slots.pop()
        cpus = allowed[slot * threads : (slot + 1) * threads] if allowed else None
        cmd, env = _worker_command(run, ledger=ledger.name, store=store, cpus=cpus, threads=threads)
        run.out.mkdir(parents=True, exist_ok=True)
        log = run.out / "sweep.log"
        try:
            with log.open("w", encoding="utf-8") as f:
                rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        finally:
            with lock:
                free_slots.append(slot)
        with lock:
            if rc == 0 and run.finished:
                done.append(str(run.out))
            else:
                tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-5:])
                failed.append((str(run.out), tail))
            bar.set_postfix(failed=len(failed), refresh=False)
            bar.update(1)

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(execute, todo))
    finally:
        bar.close()
    if progress:
        print(
            f"sweep {ledger.name}: {len(done)} run(s) done, {len(failed)} failed, {len(runs) - len(todo)} skipped (finished before) in {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )
    return SweepResult(len(runs), len(runs) - len(todo), done, failed)

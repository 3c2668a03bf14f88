"""One sweep run in its own process: ``python -m loopgolf.lab.worker JOB_JSON``.

The worker dies with the sweep that started it (``PR_SET_PDEATHSIG`` on Linux: the kernel sends
it SIGTERM when the sweep goes, even on ``kill -9``), and SIGTERM ends its run as a failure. It
pins itself to its cores and threads and runs :func:`loopgolf.run.run`, which holds the run
directory's lock for the whole run. Everything the worker writes about the run (``sweep.log``
and the results store) it writes while the run directory's lock is held:

- once :func:`~loopgolf.run.run` holds the lock, and before anything is written, the worker
  checks that the run is still unfinished (another sweep may have finished it since this one
  planned it), sends its output to ``sweep.log`` and records the start in the store;
- a failure is recorded (``failed`` with the error) only under the lock: a run another process
  holds is that process's, and this worker writes nothing about it.

Exit status: 0 done, 1 failed (recorded, the traceback in ``sweep.log``), 3 in progress
elsewhere (another process holds the lock; nothing written), 4 finished elsewhere (nothing
written).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

EXIT_DONE, EXIT_FAILED, EXIT_BUSY, EXIT_FINISHED = 0, 1, 3, 4
LOG_NAME = "sweep.log"  # the worker's output, beside the run's own files
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Terminated(BaseException):
    """SIGTERM: the sweep stopped (or died), so this run stops and is recorded as failed."""


class _FinishedElsewhere(Exception):
    pass


def _on_sigterm(signum: int, frame: Any) -> None:
    # Once: the run stops and the failure is recorded. The kernel may send the parent-death
    # signal again (once per thread of the dying sweep), and a second one must not cut short the
    # recording; a sweep that gives up waiting sends SIGKILL.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(f"terminated by signal {signum} (the sweep stopped)")


def die_with_parent(parent: int | None) -> None:
    """Ask the kernel for SIGTERM when the parent (the sweep) dies (Linux), and stop now if it
    died already."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the sweep's own handlers still stop its workers
            pass
    if parent is not None and os.getppid() != parent:
        raise Terminated(f"the sweep (pid {parent}) that started this worker is gone")


def _redirect_output(path: Path) -> None:
    """From now on, stdout and stderr go to ``path`` (replaced)."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    job = json.loads(argv[0])
    try:
        die_with_parent(job.get("parent"))
        return _work(job)
    except Terminated as e:  # before the run started: nothing of it to record
        print(f"worker: {e}", file=sys.stderr)
        return EXIT_FAILED


def _work(job: dict[str, Any]) -> int:
    if job.get("cpus") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, job["cpus"])
    import torch

    torch.set_num_threads(int(job["threads"]))
    from loopgolf.lab.store import Store
    from loopgolf.run import RunOptions, run
    from loopgolf.rundir import RunDir, RunDirLocked

    opts = dict(job["options"])
    for key in ("data", "out"):
        if opts.get(key) is not None:
            opts[key] = Path(opts[key])
    out = Path(opts["out"])
    log = out / LOG_NAME
    where = {"ledger": job["ledger"], "variant": job["variant"], "seed": job["seed"]}
    held = False  # whether run() got the lock and this worker took the run over

    def on_lock(rundir: RunDir) -> None:
        nonlocal held
        if rundir.finished:
            raise _FinishedElsewhere
        held = True
        _redirect_output(log)
        with Store(job["store"]) as store:
            store.start(out, **where)

    try:
        run(RunOptions(**opts), on_lock=on_lock)
    except _FinishedElsewhere:
        print(f"worker: {out} was finished by another process; nothing to do")
        return EXIT_FINISHED
    except RunDirLocked as e:
        if not held:  # run() could not take the lock: another process is running it
            print(f"worker: {e}; left to it")
            return EXIT_BUSY
        return _failed(job, out, log, e, held, where)
    except BaseException as e:
        return _failed(job, out, log, e, held, where)
    try:
        with Store(job["store"]) as store:
            store.finish(out, **where)
    except Exception as e:  # the run finished, but the store could not file it
        print(f"worker: the run finished but the results store could not record it: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_DONE


def _failed(job: dict[str, Any], out: Path, log: Path, error: BaseException, held: bool, where: dict[str, Any]) -> int:
    """Record a failure, holding the run directory's lock (so never for a run another process
    holds). ``held``: the failure came after this worker took the run over (its output already
    goes to ``sweep.log``); otherwise it came before (the run's setup), and the worker takes the
    lock now to record it."""
    from loopgolf.lab.store import Store
    from loopgolf.rundir import RunDir, RunDirLocked

    if held:
        traceback.print_exception(error)
    rundir = RunDir(out)
    try:
        with rundir.lock():
            if not held:
                if rundir.finished:
                    print(f"worker: {out} was finished by another process; nothing to do")
                    return EXIT_FINISHED
                _redirect_output(log)
                traceback.print_exception(error)
            try:
                with Store(job["store"]) as store:
                    if not held:
                        store.start(out, **where)
                    store.finish(out, error=f"{type(error).__name__}: {error}", **where)
            except Exception as e:
                print(f"worker: the results store could not record the failure: {e}", file=sys.stderr)
    except RunDirLocked:
        print(f"worker: {out} failed ({type(error).__name__}: {error}), and another process holds it now: not recorded")
        return EXIT_BUSY
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

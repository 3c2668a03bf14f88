"""One sweep run in its own process: ``python -m loopgolf.lab.worker JOB_JSON``.

Pins itself to its cores and threads, records the start in the results store, runs
:func:`loopgolf.run.run`, and records the end (``done`` with the summary, or ``failed`` with the
error). Exit status 0 on success, 1 on failure.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    job = json.loads(argv[0])
    if job.get("cpus") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, job["cpus"])
    import torch

    torch.set_num_threads(int(job["threads"]))
    from loopgolf.lab.store import Store
    from loopgolf.run import RunOptions, run

    opts = dict(job["options"])
    for key in ("data", "out"):
        if opts.get(key) is not None:
            opts[key] = Path(opts[key])
    out = Path(opts["out"])
    with Store(job["store"]) as store:
        store.start(out, ledger=job["ledger"], variant=job["variant"], seed=job["seed"])
        try:
            run(RunOptions(**opts))
        except BaseException as e:  # recorded, then re-raised so the exit status says so
            store.finish(out, ledger=job["ledger"], variant=job["variant"], seed=job["seed"], error=f"{type(e).__name__}: {e}")
            traceback.print_exc()
            return 1
        store.finish(out, ledger=job["ledger"], variant=job["variant"], seed=job["seed"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

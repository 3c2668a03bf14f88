"""The results store: one SQLite row per run (``sqlite3``, WAL mode).

Each row keeps a run's config, summary and environment as JSON, with the ledger, variant and
seed it belongs to, the git commit of the code that ran it, timestamps and a status
(``running``, ``done``, ``failed``). WAL mode and a busy timeout let the parallel workers of a
sweep write at once; every write is one short transaction, so none is lost.

Queries address summary and config fields by name: ``val_bpb_post`` (a summary key), or a dotted
path into the config (``model.model_dim``) or summary, with ``ledger``, ``variant``, ``seed`` and
``status`` as columns.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loopgolf.rundir import RunDir

COLUMNS = ("run_dir", "ledger", "variant", "seed", "status", "git_commit", "started", "finished", "error")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_dir TEXT PRIMARY KEY,
    ledger TEXT,
    variant TEXT,
    seed INTEGER,
    status TEXT NOT NULL,
    config TEXT,
    summary TEXT,
    environment TEXT,
    git_commit TEXT,
    started TEXT,
    finished TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS runs_ledger ON runs (ledger, variant, seed);
"""


class StoreError(ValueError):
    """A bad query or a run directory the store cannot read."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the loopgolf checkout (None outside a git checkout)."""
    root = Path(path) if path is not None else Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@dataclass
class RunRow:
    run_dir: str
    ledger: str | None
    variant: str | None
    seed: int | None
    status: str
    config: dict[str, Any] | None
    summary: dict[str, Any] | None
    environment: dict[str, Any] | None
    git_commit: str | None
    started: str | None
    finished: str | None
    error: str | None

    def value(self, key: str) -> Any:
        """A column, a summary key, or a dotted path into the config or summary (None if absent)."""
        if key in COLUMNS:
            return getattr(self, key)
        for root in (self.summary, self.config):
            node: Any = root
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    node = None
                    break
                node = node[part]
            if node is not None:
                return node
        return None


class Store:
    """A results store at ``path`` (created with its folder on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA busy_timeout=60000")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, sql: str, params: tuple) -> None:
        # BEGIN IMMEDIATE takes the write lock up front, so concurrent writers queue on the busy
        # timeout instead of failing half-way through a transaction.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.execute(sql, params)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def start(self, run_dir: Path, *, ledger: str | None, variant: str | None, seed: int | None, config: dict[str, Any] | None = None) -> None:
        """Record that a run has started (replacing an earlier row for the same directory)."""
        self._write(
            "INSERT OR REPLACE INTO runs (run_dir, ledger, variant, seed, status, config, summary, environment, git_commit, started, finished, error) "
            "VALUES (?, ?, ?, ?, 'running', ?, NULL, NULL, ?, ?, NULL, NULL)",
            (str(Path(run_dir).resolve()), ledger, variant, seed, _dump(config), git_commit(), now()),
        )

    def finish(self, run_dir: Path, *, ledger: str | None = None, variant: str | None = None, seed: int | None = None, error: str | None = None) -> RunRow:
        """Record a run's end from its directory: ``done`` with its summary, or ``failed``."""
        run_dir = Path(run_dir).resolve()
        config, summary, env = read_run_files(run_dir)
        status = "done" if error is None and summary is not None else "failed"
        if status == "failed" and error is None:
            error = "no summary.json"
        old = self.get(run_dir)
        started = old.started if old else None
        commit = old.git_commit if old and old.git_commit else git_commit()
        ledger = ledger if ledger is not None else (old.ledger if old else None)
        variant = variant if variant is not None else (old.variant if old else None)
        seed = seed if seed is not None else (old.seed if old else (summary or {}).get("seed"))
        self._write(
            "INSERT OR REPLACE INTO runs (run_dir, ledger, variant, seed, status, config, summary, environment, git_commit, started, finished, error) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (str(run_dir), ledger, variant, seed, status, _dump(config), _dump(summary), _dump(env), commit, started, now(), error),
        )
        row = self.get(run_dir)
        assert row is not None
        return row

    def add(self, run_dir: Path, *, ledger: str | None = None, variant: str | None = None) -> RunRow:
        """Add a finished run made outside a sweep (``loopgolf runs add``)."""
        run_dir = Path(run_dir)
        if not RunDir(run_dir).finished:
            raise StoreError(f"{run_dir} is not a finished run directory (no summary.json)")
        return self.finish(run_dir, ledger=ledger, variant=variant if variant is not None else _preset_of(run_dir))

    def get(self, run_dir: Path) -> RunRow | None:
        rows = list(self._select("WHERE run_dir = ?", (str(Path(run_dir).resolve()),)))
        return rows[0] if rows else None

    def rows(self, ledger: str | None = None) -> list[RunRow]:
        if ledger is None:
            return list(self._select("", ()))
        return list(self._select("WHERE ledger = ?", (ledger,)))

    def query(self, *, ledger: str | None = None, where: list[tuple[str, str]] = (), sort: str | None = None) -> list[RunRow]:
        """Rows of ``ledger`` whose fields equal the ``where`` values (compared as text, numbers
        also numerically), sorted by ``sort`` (a leading ``-`` for descending; missing last)."""
        rows = [r for r in self.rows(ledger) if all(_matches(r.value(k), v) for k, v in where)]
        if sort:
            key, reverse = (sort[1:], True) if sort.startswith("-") else (sort, False)
            present = [r for r in rows if r.value(key) is not None]
            missing = [r for r in rows if r.value(key) is None]
            try:
                present.sort(key=lambda r: r.value(key), reverse=reverse)
            except TypeError:
                raise StoreError(f"cannot sort by {key!r}: its values are of mixed types") from None
            rows = present + missing
        return rows

    def _select(self, clause: str, params: tuple) -> Iterator[RunRow]:
        cur = self._conn.execute(
            "SELECT run_dir, ledger, variant, seed, status, config, summary, environment, git_commit, started, finished, error FROM runs "
            f"{clause} ORDER BY ledger, variant, seed, run_dir",
            params,
        )
        for r in cur.fetchall():
            yield RunRow(r[0], r[1], r[2], r[3], r[4], _load(r[5]), _load(r[6]), _load(r[7]), r[8], r[9], r[10], r[11])


def read_run_files(run_dir: Path) -> tuple[dict | None, dict | None, dict | None]:
    """A run directory's config, summary and environment (the ``env`` of its log's start record),
    each checked as :class:`~loopgolf.rundir.RunDir` reads it; None where the file is absent."""
    rundir = RunDir(run_dir)
    try:
        config = rundir.read_config().to_dict() if rundir.config_path.is_file() else None
        summary = rundir.read_summary().to_dict() if rundir.finished else None
    except ValueError as e:
        raise StoreError(str(e)) from None
    return config, summary, rundir.environment()


def _preset_of(run_dir: Path) -> str | None:
    config, _, _ = read_run_files(run_dir)
    return (config or {}).get("preset")


def _matches(value: Any, wanted: str) -> bool:
    if value is None:
        return wanted.lower() in ("none", "null", "")
    if isinstance(value, bool):
        return wanted.lower() == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return float(wanted) == float(value)
        except ValueError:
            return False
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True) == wanted
    return str(value) == wanted


def _dump(obj: Any) -> str | None:
    return None if obj is None else json.dumps(obj, sort_keys=True)


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)

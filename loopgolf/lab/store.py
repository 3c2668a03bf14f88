"""The results store: one SQLite row per run (``sqlite3``, WAL mode).

Each row keeps a run's config, summary and environment as JSON, with the ledger, variant and
seed it belongs to, the git commit of the code that ran it, timestamps and a status
(``running``, ``done``, ``failed``). WAL mode and a busy timeout let the parallel workers of a
sweep write at once; every write is one short transaction, so none is lost. Queries open the file
read-only. Whatever SQLite says about the file (not a database, damaged, a full disk, read-only)
is a :class:`StoreError` (a ``ValueError``) naming it, as is a database that is not a results
store; a run directory's files are read through :class:`~loopgolf.rundir.RunDir`'s checks, and
a seed must fit what a run takes (0 to 2**63 - 1).

Queries address summary and config fields by name: ``val_bpb_post`` (a summary key), or a dotted
path into the config (``model.model_dim``) or summary, with ``ledger``, ``variant``, ``seed`` and
``status`` as columns.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loopgolf.config import MAX_SEED
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
    """A bad query, a store file that is not a results store, or a run directory the store cannot read."""


SEED_RANGE = (0, MAX_SEED)  # what a run takes, and what an SQLite INTEGER holds


def now() -> str:
    # Microseconds: "the latest finished" of two runs of one seed must not tie within a second.
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


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


_INSERT = (
    "INSERT OR REPLACE INTO runs (run_dir, ledger, variant, seed, status, config, summary, environment, git_commit, started, finished, error) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_ALL_COLUMNS = ("run_dir", "ledger", "variant", "seed", "status", "config", "summary", "environment", "git_commit", "started", "finished", "error")


class Store:
    """A results store at ``path`` (created with its folder on first use). ``readonly``: for
    queries; the file must exist, and it is opened read-only (``mode=ro``), so a query never
    writes to it and works on a store it may not write. Every SQLite error (a file that is not a
    store, a damaged one, a full disk) is a :class:`StoreError` naming the file."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._conn: sqlite3.Connection | None = None
        self._has_table = True
        if self.path.is_dir():
            raise StoreError(f"results store {self.path} is a directory, not an SQLite file")
        if self.path.exists() and not self.path.is_file():
            raise StoreError(f"results store {self.path} is not a regular file")
        if readonly and not self.path.exists():
            raise StoreError(f"no results store at {self.path} (a sweep or `loopgolf runs add` makes one; --store or $LOOPGOLF_STORE names another)")
        try:
            with self._errors():
                if readonly:
                    self._conn = self._open_readonly()
                else:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
                    self._conn.execute("PRAGMA busy_timeout=60000")
                self._check_schema()  # before anything is written: a foreign database is left as it is
                if not readonly:
                    self._conn.execute("PRAGMA journal_mode=WAL")
                    self._conn.executescript(_SCHEMA)
                    self._has_table = True
        except BaseException:
            self.close()
            raise

    def _open_readonly(self) -> sqlite3.Connection:
        uri = "file:" + urllib.parse.quote(str(self.path.resolve())) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=60.0, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=60000")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError:
            conn.close()
            if os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK):
                raise
        # A WAL store nobody here may write (its -shm cannot be made): nobody changes it either,
        # so it is read as the fixed file it is.
        return sqlite3.connect(uri + "&immutable=1", uri=True, timeout=60.0, isolation_level=None)

    def _check_schema(self) -> None:
        assert self._conn is not None
        tables = sorted(r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"))
        if not tables:
            self._has_table = False
            return
        columns = tuple(r[1] for r in self._conn.execute("PRAGMA table_info(runs)"))
        if tables != ["runs"] or columns != _ALL_COLUMNS:
            found = f"a runs table with columns ({', '.join(columns)})" if "runs" in tables else f"tables {', '.join(tables)}"
            raise StoreError(
                f"results store {self.path} is an SQLite database but not a loopgolf results store: it has {found}, "
                f"where a results store has one table, runs ({', '.join(_ALL_COLUMNS)})"
            )

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            text = _explain(e)
            if not self.readonly and not (os.access(self.path, os.W_OK) if self.path.exists() else os.access(self.path.parent, os.W_OK)):
                text += " (the store, or its folder, cannot be written here)"
            raise StoreError(f"results store {self.path}: {text}") from None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, statements: list[tuple[str, tuple]]) -> None:
        """Run ``statements`` as one transaction: all of them or none."""
        if self.readonly:
            raise StoreError(f"results store {self.path} is open read-only")
        assert self._conn is not None
        with self._errors():
            # BEGIN IMMEDIATE takes the write lock up front, so concurrent writers queue on the busy
            # timeout instead of failing half-way through a transaction.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    self._conn.execute(sql, params)
                self._conn.execute("COMMIT")
            except BaseException:
                # SQLite rolls some failures back itself (a full disk, an I/O error): a second
                # ROLLBACK would fail and hide the error that matters.
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise

    def start(self, run_dir: Path, *, ledger: str | None, variant: str | None, seed: int | None, config: dict[str, Any] | None = None) -> None:
        """Record that a run has started (replacing an earlier row for the same directory)."""
        run_dir = Path(run_dir).resolve()
        _check_seed(seed, f"the seed of {run_dir}")
        self._write([(_INSERT, (str(run_dir), ledger, variant, seed, "running", _dump(config), None, None, git_commit(), now(), None, None))])

    def finish(self, run_dir: Path, *, ledger: str | None = None, variant: str | None = None, seed: int | None = None, error: str | None = None) -> RunRow:
        """Record a run's end from its directory: ``done`` with its summary, or ``failed`` (with
        ``error``; then what of the directory cannot be read is left out rather than refused)."""
        run_dir = Path(run_dir).resolve()
        files = read_run_files(run_dir, strict=error is None)
        self._write([self._end_row(run_dir, files, ledger=ledger, variant=variant, seed=seed, error=error)])
        row = self.get(run_dir)
        assert row is not None
        return row

    def _end_row(self, run_dir: Path, files: tuple, *, ledger: str | None, variant: str | None, seed: int | None, error: str | None) -> tuple[str, tuple]:
        config, summary, env = files
        status = "done" if error is None and summary is not None else "failed"
        if status == "failed" and error is None:
            error = "no summary.json"
        old = self.get(run_dir)
        started = old.started if old else None
        commit = old.git_commit if old and old.git_commit else git_commit()
        ledger = ledger if ledger is not None else (old.ledger if old else None)
        variant = variant if variant is not None else (old.variant if old else None)
        seed = seed if seed is not None else (old.seed if old and old.seed is not None else (summary or {}).get("seed"))
        _check_seed(seed, f"{RunDir(run_dir).summary_path}: key 'seed'")
        return _INSERT, (str(run_dir), ledger, variant, seed, status, _dump(config), _dump(summary), _dump(env), commit, started, now(), error)

    def add(self, run_dir: Path, *, ledger: str | None = None, variant: str | None = None) -> RunRow:
        """Add a finished run made outside a sweep (``loopgolf runs add``)."""
        return self.add_all([run_dir], ledger=ledger, variant=variant)[0]

    def add_all(self, run_dirs: list[Path], *, ledger: str | None = None, variant: str | None = None) -> list[RunRow]:
        """Add finished runs: every directory is read and checked first, then all are filed in one
        transaction (a bad one adds none)."""
        read = []
        for d in run_dirs:
            d = Path(d)
            if not RunDir(d).finished:
                raise StoreError(f"{d} is not a finished run directory (no summary.json)")
            read.append((d.resolve(), read_run_files(d)))
        statements = []
        for d, files in read:
            v = variant if variant is not None else (files[0] or {}).get("preset")
            statements.append(self._end_row(d, files, ledger=ledger, variant=v, seed=None, error=None))
        self._write(statements)
        return [row for d, _ in read if (row := self.get(d)) is not None]

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
        if not self._has_table:  # an empty store opened read-only
            return
        assert self._conn is not None
        with self._errors():
            found = self._conn.execute(
                f"SELECT {', '.join(_ALL_COLUMNS)} FROM runs {clause} ORDER BY ledger, variant, seed, run_dir",
                params,
            ).fetchall()
        for r in found:
            where = f"results store {self.path}, run {r[0]}"
            yield RunRow(r[0], r[1], r[2], r[3], r[4], _load(r[5], where, "config"), _load(r[6], where, "summary"), _load(r[7], where, "environment"), *r[8:])


def _explain(e: sqlite3.Error) -> str:
    text = str(e)
    if "file is not a database" in text:
        return "not an SQLite database (file is not a database)"
    if "malformed" in text:
        return f"damaged or cut short ({text})"
    if "readonly" in text:
        return f"cannot be written ({text})"
    return text


def _check_seed(seed: Any, where: str) -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise StoreError(f"{where}: a seed must be an integer from {SEED_RANGE[0]} to 2**63 - 1, got {seed!r:.40}")


def read_run_files(run_dir: Path, *, strict: bool = True) -> tuple[dict | None, dict | None, dict | None]:
    """A run directory's config, summary and environment (the ``env`` of its log's start record),
    each checked as :class:`~loopgolf.rundir.RunDir` reads it; None where the file is absent.
    ``strict``: a file that does not check out is an error; otherwise it is left out (None)."""
    rundir = RunDir(run_dir)

    def read(what: Callable[[], Any]) -> Any:
        try:
            return what()
        except ValueError as e:
            if strict:
                raise StoreError(str(e)) from None
            return None

    config = read(lambda: rundir.read_config().to_dict()) if rundir.config_path.is_file() else None
    summary = read(lambda: rundir.read_summary().to_dict()) if rundir.finished else None
    records = read(rundir.read_log) if rundir.log_path.is_file() else None  # every line a JSON object
    return config, summary, rundir.environment(records) if records is not None else None


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


def _load(text: Any, where: str, column: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise StoreError(f"{where}: its {column} is not JSON") from None

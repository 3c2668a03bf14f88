"""The lab on bad inputs and awkward stores (issue 27): every bad ledger, store file or run
directory is one line and exit 2, nothing is half-written, queries never write, and a report counts
one finite run per (variant, seed), with a paired test beside Welch's and the record margin."""

from __future__ import annotations

import json
import math
import os
import sqlite3
from pathlib import Path

import pytest
from helpers import one_line_error
from test_lab import TINY, _fake_run

from loopgolf.cli import main as cli_main
from loopgolf.lab.ledger import LedgerError, parse_ledger
from loopgolf.lab.report import variant_stats, write_report
from loopgolf.lab.store import Store, StoreError


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _run(root: Path, name: str, *, bpb: float, seed: int, loss: float | None = None, summary: dict | None = None) -> Path:
    """A fake finished run (tests/test_lab.py) with ``loss`` as its val_loss_post and the values
    of ``summary`` written over the fake's (even ones RunSummary refuses)."""
    d = _fake_run(root, name, bpb=bpb, seed=seed)
    changes = dict(summary or {})
    if loss is not None:
        changes["val_loss_post"] = loss
    if changes:
        s = json.loads((d / "summary.json").read_text())
        s.update(changes)
        (d / "summary.json").write_text(json.dumps(s))
    return d


# ---------------------------------------------------------------- ledgers


@pytest.mark.parametrize(
    "text, needles",
    [
        ('name = "t"\nbaseline = "a"\nvariant = [1, 2]\n[budget]\nsteps = 3\n', ["line 3", "'variant'", "[[variant]] tables"]),
        ("x = " + "[" * 5000 + "]" * 5000 + "\n", ["nested too deeply"]),
        (TINY.replace('baseline = "a"', 'baseline = ["a"]'), ["line 3", "'baseline'", "string"]),
        (TINY.replace("seeds = [1]", "seeds = [1180591620717411303424]"), ["line 4", "'seeds'", "2**63"]),
        (TINY.replace("model = { model_dim = 48", "model = { colour = 1, model_dim = 48"), ["line 16", "'variant[1].model.colour'", "unknown model field"]),
        (
            TINY.replace("model = { model_dim = 48, num_heads = 2, num_kv_heads = 1 }", "[variant.model]\nmodel_dim = 48\ncolour = 2"),
            ["line 18", "'variant[1].model.colour'"],
        ),
        (TINY.replace("model = { model_dim = 48", "train = { optim = { lr = 1 } }\nmodel = { model_dim = 48"), ["line 16", "'variant[1].train.optim.lr'"]),
        (TINY.replace('name = "b"\npreset = "debug"', 'name = "b"\npreset = "debug"\ntrain = { warmup = 3 }'), ["line 16", "'variant[1].train.warmup'"]),
    ],
    ids=[
        "variant-list-of-ints",
        "nested-too-deep",
        "baseline-list",
        "seed-2**70",
        "unknown-model-key",
        "unknown-model-key-subtable",
        "unknown-optim-key",
        "unknown-train-key",
    ],
)
def test_bad_ledgers_name_the_line_and_key(text, needles, tmp_path, capsys):
    with pytest.raises(LedgerError) as e:
        parse_ledger(text, source="bad.toml")
    for n in needles:
        assert n in str(e.value), str(e.value)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, _, err = _cli(["sweep", str(path), "--list"], capsys)
    one_line_error(code, err)


def test_sweep_seeds_flag_is_range_checked(tmp_path, capsys):
    (tmp_path / "tiny.toml").write_text(TINY)
    code, _, err = _cli(["sweep", str(tmp_path / "tiny.toml"), "--list", "--seeds", str(2**70)], capsys)
    one_line_error(code, err)
    assert "2**63" in err


# ---------------------------------------------------------------- run directories the store refuses


def _bad_runs(root: Path) -> dict[str, Path]:
    runs = {
        "nan val_bpb_post": _run(root, "nan", bpb=2.0, seed=1, summary={"val_bpb_post": math.nan}),
        "infinite val_loss_post": _run(root, "inf", bpb=2.0, seed=1, summary={"val_loss_post": math.inf}),
        "seed 'x'": _run(root, "xseed", bpb=2.0, seed=1, summary={"seed": "x"}),
        "seed 2**70": _run(root, "bigseed", bpb=2.0, seed=1, summary={"seed": 2**70}),
    }
    runs["summary a JSON list"] = _fake_run(root, "list_summary", bpb=2.0, seed=1)
    (runs["summary a JSON list"] / "summary.json").write_text("[1, 2]")
    runs["config a JSON list"] = _fake_run(root, "list_config", bpb=2.0, seed=1)
    (runs["config a JSON list"] / "config.json").write_text("[1]")
    runs["log lines JSON lists"] = _fake_run(root, "list_log", bpb=2.0, seed=1)
    (runs["log lines JSON lists"] / "log.jsonl").write_text("[1]\n[2]\n")
    return runs


def test_runs_add_refuses_bad_run_directories_and_adds_none(tmp_path, capsys):
    store = tmp_path / "s.sqlite"
    good = _run(tmp_path, "good", bpb=2.0, seed=1)
    for what, bad in _bad_runs(tmp_path / "bad").items():
        code, _, err = _cli(["runs", "--store", str(store), "add", str(good), str(bad), "--ledger", "L"], capsys)
        one_line_error(code, err)
        assert str(bad) in err, (what, err)
        with Store(store) as s:
            assert s.rows() == [], what  # the good one was not filed either: all or none


def test_runs_add_takes_store_after_the_subcommand(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOPGOLF_STORE", raising=False)
    d = _run(tmp_path, "r", bpb=2.0, seed=3)
    code, out, _ = _cli(["runs", "add", str(d), "--store", str(tmp_path / "mine.sqlite"), "--ledger", "L"], capsys)
    assert code == 0 and "seed 3" in out
    with Store(tmp_path / "mine.sqlite") as s:
        assert [(r.ledger, r.seed) for r in s.rows()] == [("L", 3)]
    assert not (tmp_path / "runs").exists()  # not the default store


# ---------------------------------------------------------------- store files that are not stores


def _store_files(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    files["random bytes"] = root / "random.sqlite"
    files["random bytes"].write_bytes(os.urandom(4096))
    files["bad header"] = root / "header.sqlite"
    files["bad header"].write_bytes(b"SQLite format 3\x00" + os.urandom(300))
    other = root / "other.sqlite"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE x (a)")
        c.executemany("INSERT INTO x VALUES (?)", [("a" * 500,)] * 100)
    c.close()
    files["truncated"] = root / "truncated.sqlite"
    files["truncated"].write_bytes(other.read_bytes()[: other.stat().st_size // 2 + 7])
    files["a directory"] = root / "dir.sqlite"
    files["a directory"].mkdir()
    files["/dev/null"] = Path("/dev/null")
    files["foreign runs table"] = root / "foreign.sqlite"
    with sqlite3.connect(files["foreign runs table"]) as c:
        c.execute("CREATE TABLE runs (a, b)")
    c.close()
    files["another program's database"] = other
    return files


@pytest.mark.parametrize("command", ["query", "add", "report", "sweep"])
def test_store_files_that_are_not_stores_give_one_line(command, tmp_path, capsys):
    ledger = tmp_path / "tiny.toml"
    ledger.write_text(TINY)
    good = _run(tmp_path, "good", bpb=2.0, seed=1)
    for what, path in _store_files(tmp_path / "stores").items():
        before = path.read_bytes() if path.is_file() else None
        argv = {
            "query": ["runs", "--store", str(path)],
            "add": ["runs", "--store", str(path), "add", str(good)],
            "report": ["report", str(ledger), "--out", str(tmp_path / "rep"), "--store", str(path)],
            "sweep": ["sweep", str(ledger), "--out", str(tmp_path / "sw"), "--store", str(path), "--quiet"],
        }[command]
        code, _, err = _cli(argv, capsys)
        one_line_error(code, err)
        assert str(path) in err, (what, err)
        if before is not None:
            assert path.read_bytes() == before, what  # left as it was
    assert not (tmp_path / "sw").exists() and not (tmp_path / "rep").exists()


def test_a_query_on_a_missing_store_says_so_and_creates_nothing(tmp_path, capsys):
    code, _, err = _cli(["runs", "--store", str(tmp_path / "no" / "s.sqlite")], capsys)
    one_line_error(code, err)
    assert "no results store" in err and not (tmp_path / "no").exists()


def _rollback_journal_store(path: Path, run: Path) -> None:
    """A store whose file is in rollback-journal mode: any write (a WAL switch) changes its header."""
    with Store(path) as s:
        s.add(run, ledger="tiny", variant="a")
    c = sqlite3.connect(path)
    c.execute("PRAGMA journal_mode=DELETE")
    c.close()
    assert path.read_bytes()[18:20] == b"\x01\x01"


def test_queries_open_the_store_read_only(tmp_path, capsys):
    store = tmp_path / "s.sqlite"
    _rollback_journal_store(store, _run(tmp_path, "r", bpb=2.0, seed=1))
    before = store.read_bytes()
    ledger = tmp_path / "tiny.toml"
    ledger.write_text(TINY)
    assert _cli(["runs", "--store", str(store)], capsys)[0] == 0
    assert _cli(["report", str(ledger), "--out", str(tmp_path / "rep"), "--store", str(store)], capsys)[0] == 0
    assert store.read_bytes() == before  # not switched to WAL, not touched
    with Store(store, readonly=True) as s:
        with pytest.raises(StoreError, match="read-only"):
            s.start(tmp_path / "x", ledger="L", variant="v", seed=1)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="file permissions do not stop root")
def test_a_read_only_store_can_be_queried(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    store = folder / "s.sqlite"
    with Store(store) as s:
        s.add(_run(tmp_path, "r", bpb=2.0, seed=1), ledger="L", variant="v")
    store.chmod(0o444)
    folder.chmod(0o555)
    try:
        code, out, err = _cli(["runs", "--store", str(store), "--columns", "ledger,seed"], capsys)
        assert code == 0 and out.split() == ["ledger", "seed", "L", "1"], err
        code, _, err = _cli(["runs", "--store", str(store), "add", str(_run(tmp_path, "r2", bpb=2.0, seed=2))], capsys)
        one_line_error(code, err)
    finally:
        folder.chmod(0o755)


def test_a_full_disk_reports_the_real_error(tmp_path, monkeypatch, capsys):
    store = tmp_path / "s.sqlite"
    with Store(store) as s:
        s.add(_run(tmp_path, "r0", bpb=2.0, seed=0), ledger="L", variant="v")
    opened = Store.__init__

    def full(self, *a, **kw):  # the file may not grow: as on a full disk, SQLite answers SQLITE_FULL
        opened(self, *a, **kw)
        pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
        self._conn.execute(f"PRAGMA max_page_count={pages}")

    monkeypatch.setattr(Store, "__init__", full)
    runs = [str(_run(tmp_path, f"r{i}", bpb=2.0, seed=i)) for i in range(1, 40)]
    code, _, err = _cli(["runs", "--store", str(store), "add", *runs], capsys)
    one_line_error(code, err)
    assert "full" in err and "rollback" not in err, err
    monkeypatch.setattr(Store, "__init__", opened)
    with Store(store, readonly=True) as s:
        assert len(s.rows()) == 1  # none of the 39 half-written


def test_store_rows_that_are_not_json_are_one_line(tmp_path, capsys):
    store = tmp_path / "s.sqlite"
    with Store(store) as s:
        s.add(_run(tmp_path, "r", bpb=2.0, seed=1), ledger="L", variant="v")
    c = sqlite3.connect(store)
    c.execute("UPDATE runs SET summary = '{not json'")
    c.commit()
    c.close()
    code, _, err = _cli(["runs", "--store", str(store)], capsys)
    one_line_error(code, err)
    assert "summary is not JSON" in err


# ---------------------------------------------------------------- reports


def _store_with(tmp_path: Path, runs: list[tuple[str, str, float, int, float]]) -> list:
    """A store with ``(name, variant, bpb, seed, loss)`` runs of the tiny ledger; its rows."""
    with Store(tmp_path / "s.sqlite") as s:
        for name, variant, bpb, seed, loss in runs:
            s.add(_run(tmp_path / "runs", name, bpb=bpb, seed=seed, loss=loss), ledger="tiny", variant=variant)
        return s.rows("tiny")


def test_report_counts_one_run_per_variant_and_seed(tmp_path):
    from loopgolf.lab.report import select_rows

    ledger = parse_ledger(TINY)
    rows = _store_with(
        tmp_path,
        [
            ("a1", "a", 2.60, 1, 1.80),
            ("a2", "a", 2.62, 2, 1.81),
            ("a1-again", "a", 2.70, 1, 1.87),  # seed 1 again, later: it counts, a1 does not
            ("a2-again", "a", 2.64, 2, 1.82),
            ("b1", "b", 2.50, 1, 1.73),
            ("b2", "b", 2.51, 2, 1.74),
        ],
    )
    sel = select_rows(rows)
    assert sorted((r.variant, r.seed) for r in sel.counted) == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert {Path(r.run_dir).name for r in sel.counted if r.variant == "a"} == {"a1-again", "a2-again"}
    groups = {g.name: g for g in variant_stats(ledger, rows)}
    assert groups["a"].bpb == pytest.approx([2.70, 2.64]) and groups["a"].test is None
    assert groups["b"].test is not None and groups["b"].paired is not None and groups["b"].paired.n == 2
    text = write_report(ledger, rows, tmp_path / "rep").read_text()
    assert "| a (baseline) | 2 |" in text and "| b | 2 vs 2 |" in text
    assert "`a` seed 1 has 2 finished runs; one counts, the latest finished: " + str((tmp_path / "runs" / "a1-again").resolve()) in text
    assert "too few for a test to mean anything" in text and "no verdict" in text
    assert "significant at p < 0.01" not in text


def test_report_never_prints_nan_or_a_verdict_on_non_finite_numbers(tmp_path):
    import re

    ledger = parse_ledger(TINY)
    runs = [(f"{v}{s}", v, bpb + 0.01 * s, s, 1.8 + 0.01 * s) for v, bpb in (("a", 2.6), ("b", 2.5)) for s in (1, 2, 3)]
    _store_with(tmp_path, runs)
    # A store written by something else (or an older loopgolf) may hold what `runs add` refuses now.
    c = sqlite3.connect(tmp_path / "s.sqlite")
    for name, key, value in (("b1", "val_bpb_post", math.nan), ("b2", "val_loss_post", math.inf), ("a1", "tokens_per_second", "fast")):
        (text,) = c.execute("SELECT summary FROM runs WHERE run_dir LIKE ?", (f"%/{name}",)).fetchone()
        summary = {**json.loads(text), key: value}
        c.execute("UPDATE runs SET summary = ? WHERE run_dir LIKE ?", (json.dumps(summary), f"%/{name}"))
    c.execute("UPDATE runs SET seed = 'x' WHERE run_dir LIKE '%/a3'")
    c.commit()
    c.close()
    with Store(tmp_path / "s.sqlite", readonly=True) as s:
        rows = s.rows("tiny")
    text = write_report(ledger, rows, tmp_path / "rep").read_text()
    assert not re.search(r"\b(nan|inf|infinity)\b", text, re.I), text
    for needle in (
        "`b` seed 1",
        "val_bpb_post is not a finite number",
        "`b` seed 2",
        "val_loss_post is not a finite number",
        "`a` seed 1",
        "seed 'x' is not an integer",
    ):
        assert needle in text, needle
    groups = {g.name: g for g in variant_stats(ledger, rows)}
    assert len(groups["b"].rows) == 1 and len(groups["a"].rows) == 1
    verdict = text.split("## Verdict")[1]
    assert "too few seeds for a test" in verdict and "no verdict" in verdict and "significant" not in verdict


def test_paired_test_and_record_margin_match_scipy():
    from scipy import stats

    from loopgolf.lab.significance import margin_p, paired

    a, b = [2.01, 2.03, 2.02, 2.05], [2.04, 2.07, 2.05, 2.10]
    p = paired(a, b)
    ref = stats.ttest_rel(a, b)
    assert p.n == 4 and p.df == 3
    assert p.t == pytest.approx(ref.statistic, rel=1e-12) and p.p == pytest.approx(ref.pvalue, rel=1e-12)
    assert p.ci_low < p.diff < p.ci_high < 0
    # One-sided, against the margin: is a better than b by more than m?
    for m in (0.0, 0.005, 0.03):
        assert margin_p(a, b, m, pair=True) == pytest.approx(stats.ttest_rel([x + m for x in a], b, alternative="less").pvalue, rel=1e-9)
        assert margin_p(a, b, m, pair=False) == pytest.approx(stats.ttest_ind([x + m for x in a], b, equal_var=False, alternative="less").pvalue, rel=1e-9)
    assert margin_p(a, b, 0.03, pair=True) > margin_p(a, b, 0.005, pair=True)
    assert margin_p([1.0, 1.0], [1.1, 1.1], 0.005, pair=True) == 0.0 and margin_p([1.0, 1.0], [1.003, 1.003], 0.005, pair=True) == 1.0
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired([1.0], [1.0])


def test_report_pairs_seeds_and_states_the_record_margin(tmp_path):
    from loopgolf.lab.report import RECORD_MARGIN_NATS

    ledger = parse_ledger(TINY)
    # b beats a on every seed by about 0.02 nats (well past the 0.005 margin), but the seeds
    # themselves vary a lot: the paired test sees it, Welch's hardly does.
    luck = [0.0, 0.09, -0.07, 0.05]
    runs = [(f"a{s}", "a", 2.60 + x, s, 1.80 + x) for s, x in enumerate(luck, 1)]
    runs += [(f"b{s}", "b", 2.57 + x + 0.001 * s, s, 1.78 + x + 0.001 * s) for s, x in enumerate(luck, 1)]
    rows = _store_with(tmp_path, runs)
    b = {g.name: g for g in variant_stats(ledger, rows)}["b"]
    assert b.paired.p < 0.01 < b.test.p
    assert b.record_p_paired < 0.01 < b.record_p
    assert b.test_nats.diff == pytest.approx(-0.0175, abs=1e-9)
    text = write_report(ledger, rows, tmp_path / "rep").read_text()
    assert "### Paired t-test (seeds both have)" in text and "| b | 4 | -0.0275 |" in text
    verdict = text.split("## Verdict")[1].split("## Plots")[0]
    assert "paired over 4 seeds -0.0275 bpb" in verdict
    assert f"at least {RECORD_MARGIN_NATS} nats better at p < 0.01" in verdict and "In nats (val_loss_post) the effect is -0.0175" in verdict
    assert "record rule" in verdict and "not met (one-sided p = " in verdict and "paired p = " in verdict
    assert "bpb on this validation set" in text  # the margin in bpb too
    assert "Warning" not in text  # four seeds a side: enough

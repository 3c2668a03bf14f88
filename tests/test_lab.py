"""The hypothesis ledger: ledger files, the results store, sweeps, Welch's test and reports."""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing as mp
import os
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from helpers import fake_summary

from loopgolf.cli import main as cli_main
from loopgolf.config import get_preset
from loopgolf.lab.ledger import LedgerError, builtin_ledgers, load_ledger, parse_ledger, resolve
from loopgolf.lab.report import pareto, variant_stats, write_report
from loopgolf.lab.significance import mean_std, welch
from loopgolf.lab.store import Store
from loopgolf.lab.sweep import plan_runs, run_sweep

TINY = """\
name = "tiny"
description = "two debug variants"
baseline = "a"
seeds = [1]

[budget]
steps = 3

[[variant]]
name = "a"
preset = "debug"

[[variant]]
name = "b"
preset = "debug"
model = { model_dim = 48, num_heads = 2, num_kv_heads = 1 }
"""


# ---------------------------------------------------------------- ledger files


def test_builtin_ledgers_load_and_resolve():
    names = builtin_ledgers()
    assert {"cpu-seed", "pg-seed", "calibration", "record-recipe", "record-ablation", "frontier", "frontier-long", "planner-grid"} <= set(names)
    # every built-in ledger loads and every variant resolves (presets, overrides, budgets)
    for name in names:
        ledger = load_ledger(name)
        for v in ledger.variants:
            resolve(ledger, v)
    from loopgolf.cli import main

    with pytest.raises(SystemExit), redirect_stdout(io.StringIO()) as out:
        main(["sweep", "--help"])
    assert all(name in " ".join(out.getvalue().split()) for name in names)  # the help names each one
    cpu = load_ledger("cpu-seed")
    assert cpu.baseline == "vanilla" and cpu.variant("vanilla").seeds == (1, 2, 3)
    want = {"vanilla", "shared", "shared-scales", "shared-depth", "shared-lora4", "shared-lora16", "mlp-share", "attn-share", "k1", "k3", "mini-loop", "wide"}
    assert {v.name for v in cpu.variants} == want
    # Equal training compute: the FLOPs of every variant's budget agree to within one step.
    for v in cpu.variants:
        rv = resolve(cpu, v)
        assert abs(rv.train_flops(rv.max_steps) - cpu.budget) <= rv.train_flops(1) / 2 + 1
    # Equal stored bytes for the reinvested-width variant: its unique parameters match vanilla's.
    from loopgolf.config import get_preset
    from loopgolf.model.gpt import unique_params_formula

    vanilla, wide = unique_params_formula(get_preset("cpu-vanilla").model), unique_params_formula(get_preset("cpu-wide").model)
    assert 0.8 * vanilla <= wide <= vanilla
    assert load_ledger("pg-seed").budget_kind == "seconds"


@pytest.mark.parametrize(
    "edit, needles",
    [
        (lambda t: t.replace('preset = "debug"\nmodel', 'preset = "debug"\ncolour = "red"\nmodel'), ["line 16", "variant[1].colour", "unknown key"]),
        (lambda t: t.replace("steps = 3", "steps = -3"), ["line 7", "budget.steps", "positive"]),
        (lambda t: t.replace("steps = 3", "steps = 3\nseconds = 4"), ["exactly one"]),
        (lambda t: t.replace('baseline = "a"', 'baseline = "zzz"'), ["line 3", "'baseline'", "names no variant"]),
        (lambda t: t.replace("seeds = [1]", "seeds = [1, 1]"), ["line 4", "'seeds'", "repeats"]),
        (lambda t: t.replace('name = "b"\npreset = "debug"', 'name = "b"\npreset = "nope"'), ["line 15", "variant[1].preset", "unknown preset"]),
        (lambda t: t.replace("model_dim = 48", "model_dim = -48"), ["line 15", "variant[1].preset", "does not build", "model_dim"]),
        (lambda t: t.replace('name = "a"', 'name = "b"'), ["line 14", "defined twice"]),
        (lambda t: t + "\n[[variant]\n", ["not valid TOML", "line"]),
        (lambda t: t.replace('name = "tiny"\n', 'name = "tiny"\nextra = 1\n'), ["line 2", "'extra'", "unknown key"]),
    ],
)
def test_malformed_ledger_names_line_and_key(edit, needles):
    with pytest.raises(LedgerError) as e:
        parse_ledger(edit(TINY), source="bad.toml")
    msg = str(e.value)
    assert msg.startswith("bad.toml")
    for n in needles:
        assert n in msg, msg


def test_missing_ledger_file_lists_builtins(tmp_path):
    with pytest.raises(LedgerError, match="cpu-seed"):
        load_ledger(tmp_path / "nope.toml")


# ---------------------------------------------------------------- statistics


def test_welch_matches_scipy_and_hand_computation():
    from scipy import stats

    a, b = [2.01, 2.03, 2.02, 2.05], [2.10, 2.08, 2.12]
    w = welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert w.t == pytest.approx(ref.statistic, rel=1e-12)
    assert w.p == pytest.approx(ref.pvalue, rel=1e-12)
    # By hand: means 2.0275 and 2.10, sample variances 0.000291667 and 0.0004.
    va, vb = 0.00029166666666666 / 4, 0.0004 / 3
    assert w.diff == pytest.approx(2.0275 - 2.10, abs=1e-12)
    assert w.t == pytest.approx(-0.0725 / math.sqrt(va + vb), rel=1e-9)
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    assert w.df == pytest.approx(df, rel=1e-9)
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert (w.ci_low, w.ci_high) == pytest.approx((w.diff - half, w.diff + half), rel=1e-9)
    assert w.ci_low < w.diff < w.ci_high < 0  # significant: the interval excludes 0
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        welch([1.0], [1.0, 2.0])
    same = welch([1.0, 1.0], [1.0, 1.0])
    assert same.p == 1.0 and same.diff == 0.0


def test_pareto_frontier():
    pts = [(1.0, 3.0, "a"), (2.0, 2.0, "b"), (3.0, 2.5, "c"), (4.0, 1.0, "d"), (2.5, 2.0, "e")]
    assert [p[2] for p in pareto(pts)] == ["a", "b", "d"]


# ---------------------------------------------------------------- results store


def _fake_run(root: Path, name: str, *, bpb: float, seed: int, artifact: int = 1000, steps: int = 5, dim: int = 32) -> Path:
    from loopgolf.config import RunConfig

    d = root / name
    d.mkdir(parents=True)
    config = (
        RunConfig.from_preset(get_preset("debug"))
        .with_changes(
            {
                "model": {"vocab_size": 384, "model_dim": dim, "num_heads": 2, "num_kv_heads": 1, "plan": {"kind": "vanilla", "layers": 2}},
                "train.seq_len": 32,
                "train.batch_tokens": 256,
                "train.seed": seed,
            }
        )
        .to_dict()
    )
    summary = fake_summary(
        val_bpb_post=bpb,
        val_bpb_pre=bpb - 0.01,
        artifact_bytes=artifact,
        unique_params=1000 * dim,
        effective_params=1000 * dim,
        tokens_per_second=1234.5,
        train_tokens=256 * steps,
        steps=steps,
        seed=seed,
        data="synthetic",
        preset="debug",
    )
    (d / "config.json").write_text(json.dumps(config))
    (d / "summary.json").write_text(json.dumps(summary))
    events = [{"event": "start", "env": {"python": "3.11", "torch": "x"}}] + [
        {"event": "train", "step": s, "loss": 6.0 - 0.3 * s + bpb} for s in range(1, steps + 1)
    ]
    (d / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"event": "tr')  # torn last line, as a killed run leaves
    return d


def test_store_round_trips_a_summary(tmp_path):
    d = _fake_run(tmp_path, "r1", bpb=2.5, seed=7)
    with Store(tmp_path / "s.sqlite") as store:
        row = store.add(d, ledger="L", variant="v")
        assert row.status == "done" and row.seed == 7 and row.variant == "v"
        assert row.summary == json.loads((d / "summary.json").read_text())
        assert row.config["model"]["model_dim"] == 32 and row.environment == {"python": "3.11", "torch": "x"}
        assert row.value("model.model_dim") == 32 and row.value("val_bpb_post") == 2.5
    with Store(tmp_path / "s.sqlite") as store:  # persisted
        assert [r.run_dir for r in store.rows("L")] == [str(d.resolve())]
        with pytest.raises(ValueError, match="no summary.json"):
            store.add(tmp_path)


def _writer(path: str, prefix: str, n: int) -> None:
    with Store(path) as store:
        for i in range(n):
            run_dir = Path(path).parent / f"{prefix}{i}"
            store.start(run_dir, ledger="par", variant=prefix, seed=i)
            store.finish(run_dir, error="fake")


def test_parallel_writers_never_lose_a_row(tmp_path):
    path = str(tmp_path / "s.sqlite")
    Store(path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, p, 60)) for p in ("x", "y")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with Store(path) as store:
        rows = store.rows("par")
    assert len(rows) == 120 and {r.status for r in rows} == {"failed"}
    assert sorted((r.variant, r.seed) for r in rows) == sorted((p, i) for p in ("x", "y") for i in range(60))


def test_runs_command_where_sort_csv_and_add(tmp_path, capsys):
    store = tmp_path / "s.sqlite"
    for i, bpb in enumerate([2.7, 2.5, 2.6]):
        assert cli_main(["runs", "--store", str(store), "add", str(_fake_run(tmp_path, f"r{i}", bpb=bpb, seed=i, dim=32 + 16 * (i % 2))), "--ledger", "L"]) == 0
    capsys.readouterr()
    assert cli_main(["runs", "--store", str(store), "--ledger", "L", "--sort", "val_bpb_post", "--csv", "--columns", "seed,val_bpb_post,model.model_dim"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows == [["seed", "val_bpb_post", "model.model_dim"], ["1", "2.5", "48"], ["2", "2.6", "32"], ["0", "2.7", "32"]]
    assert cli_main(["runs", "--store", str(store), "--where", "model.model_dim=32", "--sort=-val_bpb_post", "--columns", "seed"]) == 0
    assert capsys.readouterr().out.split() == ["seed", "0", "2"]


# ---------------------------------------------------------------- report


def test_report_on_a_fake_store(tmp_path):
    from matplotlib.image import imread

    ledger = parse_ledger(TINY)
    with Store(tmp_path / "s.sqlite") as store:
        for seed, (a, b) in enumerate([(2.60, 2.50), (2.62, 2.51), (2.61, 2.49)], 1):
            store.add(_fake_run(tmp_path / "runs", f"a{seed}", bpb=a, seed=seed, artifact=1000), ledger="tiny", variant="a")
            store.add(_fake_run(tmp_path / "runs", f"b{seed}", bpb=b, seed=seed, artifact=1500, dim=48), ledger="tiny", variant="b")
        store.start(tmp_path / "runs" / "killed", ledger="tiny", variant="b", seed=9)  # never finished
        rows = store.rows("tiny")
    groups = {g.name: g for g in variant_stats(ledger, rows)}
    assert groups["b"].test is not None and groups["b"].test.p < 0.01 and groups["a"].test is None
    path = write_report(ledger, rows, tmp_path / "rep", command="loopgolf report tiny --out rep")
    text = path.read_text()
    assert "| b | 3 | 2.5000 ± 0.0100 | 1,500 ± 0 |" in text
    assert "| a (baseline) | 3 | 2.6100 ± 0.0100 |" in text
    assert "`b` has the lowest mean val_bpb" in text and "significant at p < 0.01" in text and "not significant" not in text
    assert "Not counted: 1 run(s) not finished (running)" in text
    for png in ("bpb_vs_bytes.png", "bpb_vs_flops.png", "loss_curves.png"):
        img = imread(tmp_path / "rep" / png)
        assert img.shape[:2] == (550, 800), png
        assert img[..., :3].std() > 0.01  # not a blank canvas


FRONTIER = """\
name = "front"
baseline = "v-small"
seeds = [1, 2, 3]

[budget]
steps = 3

[[variant]]
name = "v-small"
preset = "debug"
family = "vanilla"
model_cap_bytes = 2000

[[variant]]
name = "s-small"
preset = "debug"
family = "shared"
model_cap_bytes = 2000

[[variant]]
name = "v-big"
preset = "debug"
family = "vanilla"
model_cap_bytes = 9000

[[variant]]
name = "v-big-deep"
preset = "debug"
family = "vanilla"
model_cap_bytes = 9000

[[variant]]
name = "s-big"
preset = "debug"
family = "shared"
model_cap_bytes = 9000
"""


def test_frontier_long_runs_the_frontier_ledgers_middle_cap_models_for_longer():
    """Seed by seed comparable with `frontier`: the same models, the same seeds, only the clock differs."""
    short, long = load_ledger("frontier"), load_ledger("frontier-long")
    assert (short.budget_kind, short.budget, long.budget_kind, long.budget) == ("seconds", 300, "seconds", 1800)
    assert long.baseline == short.baseline and {v.name for v in long.variants} == {v.name for v in short.variants if v.model_cap_bytes == 400000}
    for v in long.variants:
        twin = short.variant(v.name)
        assert (v.preset, v.model, v.train, v.quant, v.family, v.seeds) == (twin.preset, twin.model, twin.train, twin.quant, twin.family, twin.seeds)


def test_planner_grid_holds_every_vanilla_shape_that_fits_its_cap():
    """For each width, the grid has exactly the depths (1-6) whose predicted model bytes fit
    1,000,000, so the planner's vanilla pick at that cap is always one of its shapes."""
    from loopgolf.budget import predict_bytes
    from loopgolf.export.quantize import parse_policy
    from loopgolf.run import RunOptions, build_config

    ledger = load_ledger("planner-grid")
    assert (ledger.budget_kind, ledger.budget, ledger.variant(ledger.baseline).seeds) == ("seconds", 600, (1, 2, 3))
    have = {(v.model["model_dim"], v.model["plan"]["layers"]) for v in ledger.variants}
    for width in (64, 128, 192, 256):
        fits = set()
        for layers in range(1, 7):
            model = {
                "model_dim": width,
                "num_heads": width // 32,
                "num_kv_heads": max(1, width // 64),
                "plan": {"kind": "vanilla", "layers": layers, "loops": 1},
            }
            cfg = build_config(RunOptions(preset="cpu-vanilla", model_overrides=model, progress=False))
            if predict_bytes(cfg.model, parse_policy(cfg.export.quant), cfg.export.codec)["model_bytes"] <= 1_000_000:
                fits.add((width, layers))
        assert {s for s in have if s[0] == width} == fits, width
    # The planner's own vanilla candidates at this cap are grid shapes.
    from loopgolf.cli import main

    argv = [
        "budget",
        "--cap",
        "1000000",
        "--code-bytes",
        "0",
        "--head-dim",
        "32",
        "--family",
        "cpu-vanilla",
        "--layers",
        "1,2,3,4,5,6",
        "--top",
        "20",
        "--matmul-flops",
        "2e10",
    ]
    with redirect_stdout(io.StringIO()) as out:
        assert main([*argv, "--json"]) == 0
    picks = {(c["model_dim"], c["virtual_layers"]) for c in json.loads(out.getvalue())["candidates"]}
    assert len(picks) == 6 and picks <= have


def test_frontier_report_takes_each_familys_best_per_cap_and_tests_it(tmp_path):
    from matplotlib.image import imread

    from loopgolf.lab.frontier import frontier

    ledger = parse_ledger(FRONTIER)
    # At 2 kB sharing wins clearly; at 9 kB the deeper vanilla (the family's best there) and
    # sharing tie. One s-big seed stored more than its cap: it must not count.
    bpbs = {
        "v-small": [2.60, 2.61, 2.62],
        "s-small": [2.50, 2.51, 2.49],
        "v-big": [2.40, 2.41, 2.42],
        "v-big-deep": [2.30, 2.35, 2.32],
        "s-big": [2.33, 2.31, 1.00],
    }
    with Store(tmp_path / "s.sqlite") as store:
        for name, values in bpbs.items():
            for seed, bpb in enumerate(values, 1):
                artifact = 9600 if (name, seed) == ("s-big", 3) else 1600  # model bytes: 100 less (the code)
                d = _fake_run(tmp_path / "runs", f"{name}{seed}", bpb=bpb, seed=seed, artifact=artifact)
                store.add(d, ledger="front", variant=name)
        rows = store.rows("front")
    groups = variant_stats(ledger, rows)
    small, big = frontier(ledger, groups)
    assert (small.cap, big.cap) == (2000, 9000)
    assert small.best["shared"].name == "s-small" and small.winner() == "shared"
    assert big.best["vanilla"].name == "v-big-deep"  # the family's better candidate
    assert sorted(big.best["shared"].bpb) == [1, 2] and big.best["shared"].over_cap  # seed 3 over its cap
    assert big.winner() is None and "fewer than 3 seeds" in big.verdict()
    text = write_report(ledger, rows, tmp_path / "rep").read_text()
    assert "## The frontier" in text and "| 2 kB | 2.5000 ± 0.0100 (s-small, n=3) | 2.6100 ± 0.0100 (v-small, n=3) |" in text
    assert "`s-big` seed 3 stored 9,500 model bytes, over its cap of 9,000" in text
    assert "Crossover: another family beats the reference significantly at 2 kB (shared)." in text
    img = imread(tmp_path / "rep" / "bpb_vs_cap.png")
    assert img.shape[:2] == (550, 800) and img[..., :3].std() > 0.01


def test_frontier_verdict_names_a_family_ahead_seed_by_seed(tmp_path):
    """Seeds that differ far more than the designs do: Welch's test sees noise, the paired test
    (same seed on both sides) sees the reference ahead in every seed, and the verdict says so
    without calling it a win."""
    from loopgolf.lab.frontier import frontier

    ledger = parse_ledger(FRONTIER)
    bpbs = {"v-small": [2.30, 2.40, 2.50], "s-small": [2.311, 2.409, 2.512]}
    with Store(tmp_path / "s.sqlite") as store:
        for name, values in bpbs.items():
            for seed, bpb in enumerate(values, 1):
                store.add(_fake_run(tmp_path / "runs", f"{name}{seed}", bpb=bpb, seed=seed, artifact=1600), ledger="front", variant=name)
        rows = store.rows("front")
    small = frontier(ledger, variant_stats(ledger, rows))[0]
    assert small.test.p > 0.5 and small.paired.p < 0.01 and small.winner() is None
    assert "not significant by Welch's test at p < 0.01, but `vanilla` is ahead seed by seed (paired)" in small.verdict()


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda t: t.replace('family = "shared"\nmodel_cap_bytes = 2000\n', 'family = "shared"\n'), "needs both family and model_cap_bytes"),
        (lambda t: t.replace("model_cap_bytes = 2000", "model_cap_bytes = -5", 1), "positive integer"),
        (lambda t: t.replace("model_cap_bytes = 2000", "model_cap_bytes = 2.5e3", 1), "positive integer"),
        (lambda t: t.replace('family = "vanilla"', 'family = "a b"', 1), "family"),
        (lambda t: t.replace('family = "vanilla"\nmodel_cap_bytes = 2000\n', "", 1), "places every variant"),
    ],
)
def test_frontier_ledger_keys_are_checked(edit, needle):
    with pytest.raises(LedgerError, match=needle):
        parse_ledger(edit(FRONTIER), source="front.toml")


def test_ledger_variants_may_set_the_export_policy_and_null_fields(tmp_path):
    text = TINY.replace(
        'name = "b"\npreset = "debug"',
        'name = "b"\npreset = "debug"\nquant = "int6,gptq"\ntrain = { ema_decay = "null", optim = { muon_ns = "polar_express" } }',
    )
    ledger = parse_ledger(text)
    b = ledger.variant("b")
    assert b.quant == "int6,gptq" and b.train == {"ema_decay": None, "optim": {"muon_ns": "polar_express"}}
    assert ledger.variant("a").quant is None
    [run] = plan_runs(ledger, tmp_path, variants=["b"])
    assert run.options["quant"] == "int6,gptq" and run.options["train_overrides"]["ema_decay"] is None
    for bad, needle in (('quant = "int99"', "variant[1].quant"), ("quant = 6", "policy string")):
        with pytest.raises(LedgerError, match=re.escape(needle)):
            parse_ledger(text.replace('quant = "int6,gptq"', bad), source="q.toml")


def test_the_ablation_ledger_toggles_one_component_per_variant():
    """Each `on-X` differs from `base` and each `off-X` from `record`, and each pair names the
    same component: the built configurations show it."""
    from loopgolf.run import RunOptions, build_config

    ledger = load_ledger("record-ablation")

    def built(name: str) -> dict:
        v = ledger.variant(name)
        c = build_config(RunOptions(preset=v.preset, model_overrides=v.model, train_overrides=v.train, quant=v.quant, progress=False)).to_dict()
        return {"model": c["model"], "train": c["train"], "quant": c["export"]["quant"]}

    base, record = built("base"), built("record")
    names = {v.name for v in ledger.variants}
    parts = sorted(n[3:] for n in names if n.startswith("on-"))
    # The parallel residual and the lanes are not in the cpu recipe's preset: their record-side variants add them (plus-).
    added = {"parallel", "lanes"}
    assert len(parts) == 15 and {f"off-{p}" for p in parts if p not in added} | {f"plus-{p}" for p in added} <= names and len(names) == 2 + 2 * len(parts)
    for part in parts:
        assert built(f"on-{part}") != base, part
        assert built(f"{'plus' if part in added else 'off'}-{part}") != record, part
    assert built("on-parallel")["model"]["parallel_from"] == 1 and built("plus-parallel")["model"]["parallel_from"] == 1
    assert built("on-lanes")["model"]["parallel_lanes"] is True and built("plus-lanes")["model"]["parallel_lanes"] is True
    assert built("off-ema")["train"]["ema_decay"] is None and built("off-rope16")["model"]["rope_dims"] is None


def test_report_without_runs_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="loopgolf sweep tiny"):
        variant_stats(parse_ledger(TINY), [])


# ---------------------------------------------------------------- sweeps


def test_sweep_runs_resumes_and_redoes_unfinished(tmp_path, text_dataset):
    ledger_file = tmp_path / "tiny.toml"
    ledger_file.write_text(TINY)
    ledger = load_ledger(ledger_file)
    out, store = tmp_path / "sweep", tmp_path / "s.sqlite"
    res = run_sweep(ledger, out, store, jobs=1, threads=1, data=str(text_dataset), progress=False)
    assert (res.planned, res.skipped, len(res.done), res.failed) == (2, 0, 2, [])
    with Store(store) as s:
        rows = s.rows("tiny")
    assert [(r.variant, r.seed, r.status, r.summary["steps"]) for r in rows] == [("a", 1, "done", 3), ("b", 1, "done", 3)]
    assert rows[1].config["model"]["model_dim"] == 48
    a_summary = out / "a" / "seed1" / "summary.json"
    stamp = a_summary.stat().st_mtime_ns
    # A killed run: its directory without a summary (and a half-written log) is redone; the finished one is skipped.
    (out / "b" / "seed1" / "summary.json").unlink()
    (out / "b" / "seed1" / "log.jsonl").write_text('{"event": "sta')
    assert [r.finished for r in plan_runs(ledger, out)] == [True, False]
    res = run_sweep(ledger, out, store, jobs=1, threads=1, data=str(text_dataset), progress=False)
    assert (res.planned, res.skipped, len(res.done), res.failed) == (2, 1, 1, [])
    assert a_summary.stat().st_mtime_ns == stamp
    assert (out / "b" / "seed1" / "summary.json").is_file()
    # More seeds for one variant: only the new ones run.
    res = run_sweep(ledger, out, store, jobs=1, threads=1, data=str(text_dataset), variants=["a"], seeds=[1, 2], progress=False)
    assert (res.planned, res.skipped, len(res.done)) == (2, 1, 1)
    with Store(store) as s:
        assert sorted((r.variant, r.seed, r.status) for r in s.rows("tiny")) == [("a", 1, "done"), ("a", 2, "done"), ("b", 1, "done")]


def test_sweep_records_failures_and_refuses_oversubscription(tmp_path, text_dataset):
    ledger = parse_ledger(TINY.replace("steps = 3", "steps = 2"))
    with pytest.raises(LedgerError, match="oversubscribe"):
        run_sweep(ledger, tmp_path / "o", tmp_path / "s.sqlite", jobs=os.cpu_count() + 1, threads=1, progress=False)
    # A run that fails (its data directory does not exist) is recorded as failed, with its error.
    res = run_sweep(ledger, tmp_path / "o", tmp_path / "s.sqlite", jobs=1, threads=1, data=str(tmp_path / "missing"), variants=["a"], progress=False)
    assert len(res.failed) == 1 and not res.done
    with Store(tmp_path / "s.sqlite") as s:
        (row,) = s.rows("tiny")
    assert row.status == "failed" and "missing" in row.error


def test_sweep_cli_list(tmp_path, capsys):
    ledger_file = tmp_path / "tiny.toml"
    ledger_file.write_text(TINY)
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli_main(["sweep", str(ledger_file), "--out", str(tmp_path / "o"), "--list"]) == 0
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("todo  a") and "3 steps" in lines[0]
    assert cli_main(["sweep", str(tmp_path / "nope.toml")]) == 2
    assert "no ledger file" in capsys.readouterr().err


def test_train_flops_counts_each_recurrence_stage_at_its_depth():
    from loopgolf.config import get_preset
    from loopgolf.lab.report import train_flops
    from loopgolf.lab.store import RunRow
    from loopgolf.model.gpt import forward_flops_per_token

    p = get_preset("cpu-mini-loop")
    config = {"model": p.model.to_dict(), "train": {"seq_len": p.train.seq_len}}
    tokens = 10 * p.train.batch_tokens
    row = RunRow("x", None, None, 1, "done", config, {"steps": 10, "stage_steps": [0, 4], "train_tokens": tokens}, None, None, None, None, None)
    shallow, full = (forward_flops_per_token(p.model, p.train.seq_len, num_layers=n) for n in (4, 6))
    assert shallow < full
    assert train_flops(row) == pytest.approx(3 * tokens * (0.4 * shallow + 0.6 * full), rel=1e-12)
    row.summary["stage_steps"] = [0]
    assert train_flops(row) == pytest.approx(3 * tokens * full, rel=1e-12)


def test_train_flops_counts_each_depth_sampled_step_at_the_depth_it_drew():
    from loopgolf.config import LoopSampler, get_preset
    from loopgolf.lab.report import train_flops
    from loopgolf.lab.store import RunRow
    from loopgolf.model.gpt import forward_flops_per_token

    p = get_preset("cpu-shared-scales")  # cycle 2 x 3
    config = {"model": p.model.to_dict(), "train": {"seq_len": p.train.seq_len, "seed": 7, "loop_sampling": "uniform:1-4"}}
    tokens = 20 * p.train.batch_tokens
    row = RunRow("x", None, None, 1, "done", config, {"steps": 20, "stage_steps": [], "train_tokens": tokens}, None, None, None, None, None)
    draws = [LoopSampler.parse("uniform:1-4").draw(7, s) for s in range(20)]
    want = sum(3 * tokens / 20 * forward_flops_per_token(p.model, p.train.seq_len, num_layers=2 * n) for n in draws)
    assert len(set(draws)) > 1 and train_flops(row) == pytest.approx(want, rel=1e-12)

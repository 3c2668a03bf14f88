"""The loss model: a fit recovers known parameters from synthetic runs, its leave-one-out error is
what a held-out prediction misses by, and bad inputs are refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from loopgolf.lossmodel import MIN_RUNS, FitError, LossFit, Point, effective_tokens, fit, predict

TRUE = {"E": 1.2, "A": 40.0, "alpha": 0.35, "B": 300.0, "beta": 0.45, "gamma": 0.4}


def synthetic(noise: float = 0.0, seed: int = 0) -> list[Point]:
    rng = np.random.default_rng(seed)
    points = []
    for n in (5e4, 2e5, 8e5, 3e6):
        for reuse in (1, 3):
            for d in (2e5, 1e6, 5e6):
                bpb = predict(TRUE, n, n * reuse, d) + rng.normal(0, noise)
                points.append(Point(n, n * reuse, d, bpb, f"n{n:g}-r{reuse}-d{d:g}"))
    return points


def test_fit_recovers_known_parameters():
    got = fit(synthetic(), dataset="synthetic")
    for k, want in TRUE.items():
        assert got.params[k] == pytest.approx(want, rel=0.05, abs=0.02), (k, got.params)
    assert got.rmse < 1e-4 and got.loo_mae < 1e-3
    # Off the grid, too.
    assert got.predict(1e6, 2.5e6, 3e6) == pytest.approx(predict(TRUE, 1e6, 2.5e6, 3e6), abs=1e-3)


def test_left_out_error_measures_held_out_predictions():
    points = synthetic(noise=0.01, seed=1)
    got = fit(points, dataset="synthetic")
    assert 0.003 < got.loo_mae < 0.03 and got.loo_max >= got.loo_mae
    # Each left-out prediction is a fit on the other runs: refit one by hand and compare.
    first = got.runs[0]
    alone = fit(points[1:], dataset="synthetic")
    assert first["left_out_predicted"] == pytest.approx(alone.predict(points[0].unique_params, points[0].effective_params, points[0].train_tokens), abs=1e-6)
    assert sum(abs(r["residual"]) for r in got.runs) / len(got.runs) <= got.loo_mae  # in-fit errors are smaller


def test_fit_files_round_trip_and_bad_inputs_are_refused():
    got = fit(synthetic(), dataset="synthetic", quant="int8")
    back = LossFit.from_dict(json.loads(json.dumps(got.to_dict())))
    assert back.params == got.params and back.quant == "int8" and back.loo_mae == got.loo_mae
    with pytest.raises(FitError, match="at least"):
        fit(synthetic()[: MIN_RUNS - 1], dataset="x")
    bad = synthetic()[:MIN_RUNS]
    for broken in (Point(0, 0, 1e5, 2.0, "zero"), Point(1e5, 1e5, 1e5, math.nan, "nan"), Point(1e5, 5e4, 1e5, 2.0, "fewer effective")):
        with pytest.raises(FitError, match=broken.name):
            fit([*bad, broken], dataset="x")
    for text in (
        {},
        {"format": 1},
        {"format": 1, "dataset": "x", "params": {"E": 1}},
        {"format": 1, "dataset": "x", "params": dict.fromkeys(TRUE, math.inf), "loo_mae": 0},
    ):
        with pytest.raises(FitError):
            LossFit.from_dict(text)


REPEATED = {**TRUE, "R_star": 4.0}
UNIQUE = 1e6


def repeated_runs() -> list[Point]:
    """Runs on a dataset of UNIQUE tokens, several of them many epochs long."""
    return [
        Point(n, n * reuse, d, predict(REPEATED, n, n * reuse, d, UNIQUE), f"n{n:g}-r{reuse}-d{d:g}")
        for n in (5e4, 2e5, 8e5, 3e6)
        for reuse in (1, 3)
        for d in (2e5, 1e6, 5e6, 2e7)
    ]


def test_repeated_tokens_count_for_less():
    assert effective_tokens(5e5, UNIQUE, 4.0) == 5e5  # the first epoch counts in full
    assert effective_tokens(5e6, None, 4.0) == 5e6 and effective_tokens(5e6, UNIQUE, None) == 5e6  # no term without both
    worth = [effective_tokens(d, UNIQUE, 4.0) for d in (1e6, 2e6, 5e6, 2e7, 1e9)]
    assert worth == sorted(worth) and worth[0] == UNIQUE
    assert worth[1] == pytest.approx(UNIQUE * (1 + 4.0 * (1 - math.exp(-1 / 4.0))))  # one repeat
    assert worth[-1] == pytest.approx(UNIQUE * 5.0, rel=1e-6)  # saturates at U (1 + R*)


def test_fit_recovers_the_repetition_term():
    points = repeated_runs()
    got = fit(points, dataset="synthetic", unique_tokens=UNIQUE)
    assert got.params["R_star"] == pytest.approx(4.0, rel=0.05) and got.unique_tokens == UNIQUE
    assert got.rmse < 1e-3 and got.epochs(2e7) == 20
    assert got.predict(1e6, 1e6, 8e7) == pytest.approx(predict(REPEATED, 1e6, 1e6, 8e7, UNIQUE), abs=2e-3)
    # Without the dataset's size the fit cannot tell repeated tokens from fresh ones, and misses.
    blind = fit(points, dataset="synthetic")
    assert blind.params["R_star"] is None and blind.loo_mae > 5 * got.loo_mae
    # A dataset no run went past fits without the term (and needs no extra run).
    fresh = fit(synthetic(), dataset="synthetic", unique_tokens=1e9)
    assert fresh.params["R_star"] is None and fresh.unique_tokens == 1e9
    with pytest.raises(FitError, match="unique tokens"):
        fit(points, dataset="x", unique_tokens=-5)
    with pytest.raises(FitError, match=f"at least {MIN_RUNS + 1}"):
        fit([p for p in points if p.train_tokens > UNIQUE][:MIN_RUNS], dataset="x", unique_tokens=UNIQUE)


def test_fit_files_of_both_formats_load_and_bad_terms_are_refused():
    got = fit(repeated_runs(), dataset="synthetic", unique_tokens=UNIQUE)
    back = LossFit.from_dict(json.loads(json.dumps(got.to_dict())))
    assert back.params == got.params and back.unique_tokens == UNIQUE and back.predict(1e5, 1e5, 1e7) == got.predict(1e5, 1e5, 1e7)
    old = {"format": 1, "dataset": "x", "params": TRUE, "loo_mae": 0.02}  # written before the repetition term
    first = LossFit.from_dict(old)
    assert first.params["R_star"] is None and first.predict(1e5, 1e5, 1e7) == predict(TRUE, 1e5, 1e5, 1e7)
    for bad in (
        {"params": {**TRUE, "R_star": -1}},
        {"params": {**TRUE, "R_star": math.nan}},
        {"unique_tokens": "many"},
        {"unique_tokens": True},
        {"format": 4},
    ):
        with pytest.raises(FitError):
            LossFit.from_dict({**old, "format": 2, **bad})


def test_fit_reads_the_datasets_unique_tokens_from_its_manifest(tmp_path, text_dataset, capsys, monkeypatch):
    from loopgolf.cli import main
    from loopgolf.data.dataset import load_manifest
    from loopgolf.lab.store import Store

    monkeypatch.setenv("LOOPGOLF_CACHE", str(tmp_path / "cache"))
    tokens = load_manifest(text_dataset)["splits"]["train"]["tokens"]
    scale = tokens / UNIQUE
    store = tmp_path / "store.sqlite"
    with Store(store) as s:
        for i, p in enumerate(repeated_runs()):
            q = Point(p.unique_params, p.effective_params, p.train_tokens * scale, p.bpb)
            s.add(_run_dir(tmp_path, f"r{i}", q, data_dir=str(text_dataset)))
    assert main(["fit", "--store", str(store), "--data", "synthetic", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unique_tokens"] == tokens and out["params"]["R_star"] == pytest.approx(4.0, rel=0.05)
    assert str(text_dataset) in out["unique_tokens_from"]
    assert main(["fit", "--store", str(store), "--data", "synthetic", "--unique-tokens", "1e12"]) == 0
    assert "no run went past the 1,000,000,000,000 unique tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit", "--store", str(store), "--data", "synthetic", "--unique-tokens", "nan"])


def _run_dir(root, name: str, point: Point, *, data: str = "synthetic", quant: str = "", uptrain=None, data_dir: str = "/nowhere"):
    """A finished run directory as the store reads it, with ``point``'s numbers."""
    from helpers import fake_summary

    from loopgolf.config import RunConfig, get_preset

    d = root / name
    d.mkdir(parents=True)
    config = RunConfig.from_preset(get_preset("debug")).with_changes({"data": {"name": data, "dir": data_dir}, "export.quant": quant}).to_dict()
    summary = fake_summary(
        val_bpb_post=point.bpb,
        unique_params=int(point.unique_params),
        effective_params=int(point.effective_params),
        train_tokens=int(point.train_tokens),
        uptrain=uptrain,
    )
    (d / "config.json").write_text(json.dumps(config))
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "log.jsonl").write_text(json.dumps({"event": "start", "env": {}}) + "\n")
    return d


def test_fit_command_fits_a_datasets_runs_and_budget_predicts_with_it(tmp_path, monkeypatch, capsys):
    """`loopgolf fit` takes the dataset's finished int8 runs from the store (not other datasets,
    policies or uptraining runs), saves the fit where `budget --time` finds it, and the budget then
    ranks candidates by predicted val_bpb, in predicted order."""
    from loopgolf.cli import main
    from loopgolf.lab.store import Store
    from loopgolf.lossmodel import fit_path, load_fit

    monkeypatch.setenv("LOOPGOLF_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "store.sqlite"
    points = synthetic()
    with Store(store) as s:
        for i, p in enumerate(points):
            s.add(_run_dir(tmp_path, f"r{i}", p))
        # Noise the fit must leave out: another dataset, another policy, an uptraining run.
        s.add(_run_dir(tmp_path, "other-data", Point(1e5, 1e5, 1e6, 9.0), data="elsewhere"))
        s.add(_run_dir(tmp_path, "other-quant", Point(1e5, 1e5, 1e6, 9.0), quant="int6"))
        s.add(_run_dir(tmp_path, "uptrained", Point(1e5, 1e5, 1e6, 9.0), uptrain={"from": "x"}))
    assert main(["fit", "--store", str(store), "--data", "synthetic"]) == 0
    out = capsys.readouterr().out
    assert "left-out error" in out and str(fit_path("synthetic")) in out
    saved = load_fit(fit_path("synthetic"))
    assert len(saved.runs) == len(points) and saved.params["gamma"] == pytest.approx(TRUE["gamma"], abs=0.02)
    # Too few runs of a dataset: a clear error naming what the store has and the ledger to run.
    assert main(["fit", "--store", str(store), "--data", "elsewhere"]) == 2
    err = capsys.readouterr().err
    assert "1 finished run(s)" in err and "synthetic (" in err and "sweep calibration" in err

    import loopgolf.train.steptime as steptime

    monkeypatch.setattr(steptime, "measure", lambda m, t, d, **kw: [0.05 * m.model_dim / 128] * (len(t.recurrence_stages) + 1))
    args = [
        "budget",
        "--cap",
        "2000000",
        "--family",
        "cpu-vanilla,cpu-shared-scales,cpu-k1",
        "--layers",
        "2,4",
        "--time",
        "120",
        "--data",
        "synthetic",
        "--top",
        "6",
    ]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    preds = [c["predicted_bpb"] for c in report["candidates"]]
    assert len(preds) >= 3 and preds == sorted(preds) and report["fit"]["dataset"] == "synthetic"
    for c in report["candidates"]:
        assert c["predicted_bpb"] == pytest.approx(saved.predict(c["unique_params"], c["effective_params"], c["tokens_in_budget"]))
        assert c["extrapolated"] == saved.outside(c["unique_params"], c["tokens_in_budget"])
        lo, hi = c["predicted_bpb_interval"]
        assert lo < c["predicted_bpb"] < hi and hi - lo == pytest.approx(2 * saved.loo_mae)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "best predicted val_bpb in 120 s first" in text and "+-" in text
    assert main([*args, "--quant", "int6"]) == 0  # the dataset's fit is for int8 runs: none for int6
    assert "no loss fit for dataset 'synthetic' with quant" in capsys.readouterr().out
    assert main([*args, "--quant", "int6", "--fit", str(fit_path("synthetic"))]) == 0  # a file named outright is used, with a warning
    assert "warning: the loss fit was made on runs with quant 'int8'" in capsys.readouterr().out
    # A named fit file must be readable.
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main([*args, "--fit", str(bad)]) == 2
    assert "not a loopgolf loss fit" in capsys.readouterr().err


def test_predictions_outside_the_fitted_range_are_flagged():
    got = fit(synthetic(), dataset="synthetic")
    assert got.outside(2e5, 1e6) == []  # inside the grid
    assert got.outside(5e4 / 1.05, 5e6 * 1.05) == []  # within 10% of its edges
    far = got.outside(1e8, 1e9)
    assert len(far) == 2 and "stored parameters" in far[0] and "training tokens" in far[1]


def test_budget_searches_several_policies_each_with_its_own_fit(tmp_path, monkeypatch, capsys):
    """`--quant A --quant B`: both policies' candidates in one list, each listed command exports
    with its policy, each predicted by its policy's fit; a policy without a fit says so."""
    from loopgolf.budget import fit_file as fit_path
    from loopgolf.cli import main
    from loopgolf.export.quantize import parse_policy
    from loopgolf.util import atomic_write_json

    monkeypatch.setenv("LOOPGOLF_CACHE", str(tmp_path))
    int8 = fit(synthetic(), dataset="synthetic")
    int6 = fit([Point(p.unique_params, p.effective_params, p.train_tokens, p.bpb + 0.1, p.name) for p in synthetic()], dataset="synthetic", quant="int6")
    assert fit_path("synthetic", "int6") != fit_path("synthetic") == fit_path("synthetic", "int8")
    six = parse_policy("int6").describe()
    assert fit_path("synthetic", "int6") == fit_path("synthetic", six)  # one file per policy, however written
    atomic_write_json(fit_path("synthetic"), int8.to_dict())
    common = ["budget", "--cap", "600000", "--family", "cpu-vanilla", "--layers", "1,2", "--code-bytes", "0", "--head-dim", "32"]
    common += ["--matmul-flops", "1e10", "--steps", "300", "--data", "synthetic", "--top", "20"]
    assert main([*common, "--quant", "int8", "--quant", "int6", "--quant", "int8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    by_quant = {}
    for c in out["candidates"]:
        by_quant.setdefault(c["quant"], []).append(c)
    assert len(by_quant) == 2  # int8 given twice counts once
    assert all(c["predicted_bpb"] is None for c in by_quant[six]) and "with quant" in out["fit_missing"]
    assert [c["predicted_bpb"] is None for c in out["candidates"]] == sorted(c["predicted_bpb"] is None for c in out["candidates"])  # predicted first
    # int6 stores fewer bits: its widest candidates are at least as wide
    assert max(c["model_dim"] for c in by_quant[six]) >= max(c["model_dim"] for q, cs in by_quant.items() if q != six for c in cs)
    atomic_write_json(fit_path("synthetic", "int6"), int6.to_dict())
    assert main([*common, "--quant", "int8", "--quant", "int6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "fit_missing" not in out and set(out["fits"]) == {c["quant"] for c in out["candidates"]}
    for c in out["candidates"]:
        want = (int6 if c["quant"] == six else int8).predict(c["unique_params"], c["effective_params"], c["tokens_in_budget"])
        assert c["predicted_bpb"] == pytest.approx(want)
    assert main([*common, "--quant", "int8", "--quant", "int6"]) == 0
    text = capsys.readouterr().out
    assert f"--quant {six} --steps 300 --train time_budget=null" in text
    assert f"--quant {parse_policy('').describe()}" not in text  # the default policy needs no flag


def test_fit_includes_the_runs_of_earlier_fit_files(tmp_path, monkeypatch, capsys):
    """`fit --include FILE`: a saved fit's runs join the store's (a run counted once however often
    it is included), alone when there is no store; a file of another dataset or policy, or with a
    run a fit cannot take, is refused whole, with nothing written."""
    from loopgolf.cli import main
    from loopgolf.lab.store import Store
    from loopgolf.lossmodel import load_fit
    from loopgolf.util import atomic_write_json

    monkeypatch.setenv("LOOPGOLF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LOOPGOLF_STORE", raising=False)
    monkeypatch.chdir(tmp_path)  # no store at the default path
    points = synthetic()
    earlier = tmp_path / "earlier.json"
    atomic_write_json(earlier, fit(points[:12], dataset="synthetic", unique_tokens=1e12).to_dict())
    store = tmp_path / "store.sqlite"
    with Store(store) as s:
        for i, p in enumerate(points[12:]):
            s.add(_run_dir(tmp_path, f"r{i}", p))
    out = tmp_path / "both.json"
    assert main(["fit", "--store", str(store), "--data", "synthetic", "--include", str(earlier), "--include", str(earlier), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    both = load_fit(out)
    assert len(both.runs) == len(points) and both.params["gamma"] == pytest.approx(TRUE["gamma"], abs=0.02)
    assert {r["name"] for r in both.runs} >= {p.name for p in points[:12]}
    # The store's runs name no manifest: the dataset's size comes from the included file.
    assert both.unique_tokens == 1e12 and report["unique_tokens_from"] == "the included fit files"
    # No store: the included runs alone.
    alone = tmp_path / "alone.json"
    assert main(["fit", "--data", "synthetic", "--include", str(earlier), "--out", str(alone)]) == 0
    assert "12 runs" in capsys.readouterr().out and len(load_fit(alone).runs) == 12
    # Refused, nothing written: another dataset, another policy, a damaged run, no such file.
    damaged = json.loads(earlier.read_text())
    damaged["runs"][3]["bpb"] = math.nan
    (tmp_path / "damaged.json").write_text(json.dumps(damaged).replace("NaN", "null"))
    for args, message in (
        (["--data", "other"], "a fit of dataset 'synthetic'"),
        (["--quant", "int6"], "with quant 'int8'"),
        (["--include", str(tmp_path / "damaged.json")], "run 3 must hold finite numbers"),
        (["--include", str(tmp_path / "missing.json")], "cannot read a loss fit"),
    ):
        target = tmp_path / "refused.json"
        assert main(["fit", "--data", "synthetic", "--include", str(earlier), *args, "--out", str(target)]) == 2, args
        assert message in capsys.readouterr().err and not target.exists()


def test_fit_recovers_the_one_layer_penalty():
    """Runs of one and of three virtual layers, the one-layer ones 0.05 bpb worse than the law:
    the fit finds C, predicts with it only for one-layer models, and without the layer counts
    (or without both kinds of run) has no such term."""
    with_c = {**TRUE, "C": 0.05}
    points = [
        Point(
            p.unique_params,
            p.effective_params,
            p.train_tokens,
            predict(with_c, p.unique_params, p.effective_params, p.train_tokens, None, v),
            p.name + f"-L{v}",
            v,
        )
        for p in synthetic()
        for v in (1, 3)
    ]
    got = fit(points, dataset="synthetic")
    assert got.params["C"] == pytest.approx(0.05, abs=2e-3) and got.rmse < 1e-3
    assert got.predict(1e6, 1e6, 3e6, 1) - got.predict(1e6, 1e6, 3e6, 2) == pytest.approx(got.params["C"])
    assert got.predict(1e6, 1e6, 3e6) == got.predict(1e6, 1e6, 3e6, 4)  # unknown depth: no penalty
    assert {r["virtual_layers"] for r in got.runs} == {1, 3}
    back = LossFit.from_dict(json.loads(json.dumps(got.to_dict())))
    assert back.params["C"] == got.params["C"] and back.predict(1e5, 1e5, 1e6, 1) == got.predict(1e5, 1e5, 1e6, 1)
    # A run of unknown depth, or only deep runs: no term.
    assert fit([*points[:-1], Point(1e5, 1e5, 1e6, 2.0, "unknown")], dataset="s").params["C"] is None
    assert fit([p for p in points if p.virtual_layers == 3], dataset="s").params["C"] is None
    with pytest.raises(FitError, match="virtual layers must be a positive integer"):
        fit([*points, Point(1e5, 1e5, 1e6, 2.0, "zero-depth", 0)], dataset="s")
    # A format 2 file (before the term) loads with no penalty; a damaged C is refused.
    old = {"format": 2, "dataset": "x", "params": {**TRUE, "R_star": None}, "loo_mae": 0.02}
    assert LossFit.from_dict(old).params["C"] is None
    for bad in (math.nan, "big", True):
        with pytest.raises(FitError, match="C must be"):
            LossFit.from_dict({**old, "format": 3, "params": {**TRUE, "C": bad}})

"""The loss model: a fit recovers known parameters from synthetic runs, its leave-one-out error is
what a held-out prediction misses by, and bad inputs are refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from loopgolf.lossmodel import MIN_RUNS, FitError, LossFit, Point, fit, predict

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

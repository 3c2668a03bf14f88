"""A parametric model of roundtrip val_bpb, fitted on finished runs of one dataset.

    bpb(N, M, D) = E + A / P^alpha + B / D^beta,   P = N^(1 - gamma) * M^gamma

N is the stored (unique) parameter count, M the effective one (every virtual layer counted, so a
block run three times counts three times), D the training tokens. ``gamma`` in [0, 1] says what
reuse is worth: 0, a loop adds nothing over its stored parameters; 1, a looped parameter is worth
as much as a unique one. The form is the Chinchilla fit (Hoffmann et al., 2022,
https://arxiv.org/abs/2203.15556: an irreducible loss plus power laws in parameters and data),
with one more exponent for reuse, which is the question sharing asks. Quantization is not a term:
the fit is on roundtrip bpb of runs that share one export policy (the planner predicts for that
policy), and the fit file records which policy that was.

Fitted with scipy's bounded least squares on log-scaled amplitudes, from several starting points
(the surface has shallow valleys), keeping the best. The file holds the parameters, each run's
residual, and the error on runs left out of the fit (leave-one-out: each run predicted by a fit
on all the others), which is the honest estimate of the error of a prediction; the planner's
interval is plus or minus that error.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loopgolf.util import cache_dir

FIT_FORMAT = 1
PARAMS = ("E", "A", "alpha", "B", "beta", "gamma")
MIN_RUNS = 7  # six parameters, and at least one run left over


class FitError(ValueError):
    """Too few or unusable runs to fit, or a fit file that cannot be read."""


@dataclass(frozen=True)
class Point:
    """One finished run as the fit sees it."""

    unique_params: float
    effective_params: float
    train_tokens: float
    bpb: float
    name: str = ""


def predict(params: dict[str, float], unique_params: float, effective_params: float, train_tokens: float) -> float:
    p = unique_params ** (1 - params["gamma"]) * effective_params ** params["gamma"]
    return params["E"] + params["A"] / p ** params["alpha"] + params["B"] / train_tokens ** params["beta"]


def _vector_predict(x: np.ndarray, n: np.ndarray, m: np.ndarray, d: np.ndarray) -> np.ndarray:
    e, log_a, alpha, log_b, beta, gamma = x
    log_p = (1 - gamma) * np.log(n) + gamma * np.log(m)
    return e + np.exp(log_a - alpha * log_p) + np.exp(log_b - beta * np.log(d))


def _fit_arrays(points: list[Point]) -> dict[str, float]:
    from scipy.optimize import least_squares

    n = np.array([p.unique_params for p in points], dtype=float)
    m = np.array([p.effective_params for p in points], dtype=float)
    d = np.array([p.train_tokens for p in points], dtype=float)
    y = np.array([p.bpb for p in points], dtype=float)
    lower = [0.0, -20.0, 0.01, -20.0, 0.01, 0.0]
    upper = [float(y.min()), 60.0, 2.0, 60.0, 2.0, 1.0]
    best = None
    for e0 in (0.5 * y.min(), 0.9 * y.min()):
        for alpha0, beta0 in ((0.3, 0.3), (0.6, 0.3), (0.3, 0.6)):
            for gamma0 in (0.2, 0.8):
                # Start the amplitudes where each term carries half the excess over E at the median run.
                excess = max(float(np.median(y)) - e0, 1e-3) / 2
                x0 = [
                    e0,
                    math.log(excess) + alpha0 * float(np.median(np.log(n))),
                    alpha0,
                    math.log(excess) + beta0 * float(np.median(np.log(d))),
                    beta0,
                    gamma0,
                ]
                x0 = [min(max(v, lo + 1e-9), hi - 1e-9) for v, lo, hi in zip(x0, lower, upper)]
                r = least_squares(lambda x: _vector_predict(x, n, m, d) - y, x0, bounds=(lower, upper), method="trf", max_nfev=4000)
                if best is None or r.cost < best.cost:
                    best = r
    e, log_a, alpha, log_b, beta, gamma = best.x
    return {"E": float(e), "A": math.exp(log_a), "alpha": float(alpha), "B": math.exp(log_b), "beta": float(beta), "gamma": float(gamma)}


@dataclass
class LossFit:
    """A fitted loss model for one dataset, as saved to JSON."""

    dataset: str
    quant: str
    params: dict[str, float]
    runs: list[dict[str, Any]] = field(default_factory=list)  # name, inputs, bpb, predicted, residual, left-out prediction
    rmse: float = 0.0  # in-fit root mean square residual
    loo_mae: float = 0.0  # mean absolute error on runs left out of the fit
    loo_max: float = 0.0
    format: int = FIT_FORMAT

    def predict(self, unique_params: float, effective_params: float, train_tokens: float) -> float:
        return predict(self.params, unique_params, effective_params, train_tokens)

    def outside(self, unique_params: float, train_tokens: float) -> list[str]:
        """What puts a prediction outside the runs the fit saw (stored parameters or tokens beyond
        their range, by more than 10%): there the left-out error says nothing. Measured: a fit on
        0.4-1.6 M tokens predicted 1.63 for a run of 24 M tokens that scored 1.98."""
        out = []
        for what, value, key in (("stored parameters", unique_params, "unique_params"), ("training tokens", train_tokens, "train_tokens")):
            seen = [r[key] for r in self.runs if isinstance(r.get(key), (int, float))]
            if seen and not (min(seen) / 1.1 <= value <= max(seen) * 1.1):
                out.append(f"{what} {value:,.0f} outside the fit's {min(seen):,.0f}-{max(seen):,.0f}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "fit") -> LossFit:
        if not isinstance(d, dict) or d.get("format") != FIT_FORMAT:
            raise FitError(f"{where}: not a loopgolf loss fit (format {FIT_FORMAT})")
        params = d.get("params")
        if (
            not isinstance(params, dict)
            or set(params) != set(PARAMS)
            or not all(isinstance(params[k], (int, float)) and math.isfinite(params[k]) for k in PARAMS)
        ):
            raise FitError(f"{where}: params must hold finite numbers for {', '.join(PARAMS)}")
        try:
            return cls(
                dataset=str(d["dataset"]),
                quant=str(d.get("quant", "")),
                params={k: float(params[k]) for k in PARAMS},
                runs=list(d.get("runs", [])),
                rmse=float(d.get("rmse", 0.0)),
                loo_mae=float(d["loo_mae"]),
                loo_max=float(d.get("loo_max", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FitError(f"{where}: {e}") from None


def fit(points: list[Point], *, dataset: str, quant: str = "") -> LossFit:
    """Fit ``points`` (one dataset, one export policy); FitError with fewer than :data:`MIN_RUNS`
    or with values no power law can take (non-positive sizes, non-finite bpb)."""
    if len(points) < MIN_RUNS:
        raise FitError(f"a loss fit needs at least {MIN_RUNS} finished runs of the dataset, got {len(points)}")
    for p in points:
        if not (p.unique_params > 0 and p.effective_params >= p.unique_params and p.train_tokens > 0 and math.isfinite(p.bpb) and p.bpb > 0):
            raise FitError(f"run {p.name or '?'}: unusable for a fit (params {p.unique_params}/{p.effective_params}, tokens {p.train_tokens}, bpb {p.bpb})")
    params = _fit_arrays(points)
    runs, errors = [], []
    for i, p in enumerate(points):
        others = points[:i] + points[i + 1 :]
        left_out = predict(_fit_arrays(others), p.unique_params, p.effective_params, p.train_tokens)
        predicted = predict(params, p.unique_params, p.effective_params, p.train_tokens)
        errors.append(abs(left_out - p.bpb))
        runs.append(
            {
                "name": p.name,
                "unique_params": p.unique_params,
                "effective_params": p.effective_params,
                "train_tokens": p.train_tokens,
                "bpb": p.bpb,
                "predicted": predicted,
                "residual": p.bpb - predicted,
                "left_out_predicted": left_out,
            }
        )
    rmse = math.sqrt(sum(r["residual"] ** 2 for r in runs) / len(runs))
    return LossFit(dataset, quant, params, runs, rmse, float(np.mean(errors)), float(np.max(errors)))


def fit_path(dataset: str) -> Path:
    """Where ``loopgolf fit`` keeps a dataset's fit and ``loopgolf budget --time`` looks for it:
    ``<cache>/fits/<dataset>.json`` (the name made file-safe)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset).strip("_") or "dataset"
    return cache_dir() / "fits" / f"{slug}.json"


def load_fit(path: str | Path) -> LossFit:
    try:
        return LossFit.from_dict(json.loads(Path(path).read_text()), str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FitError(f"{path}: cannot read a loss fit ({e})") from None

"""A parametric model of roundtrip val_bpb, fitted on finished runs of one dataset.

    bpb(N, M, D) = E + A / P^alpha + B / D'^beta,   P = N^(1 - gamma) * M^gamma

N is the stored (unique) parameter count, M the effective one (every virtual layer counted, so a
block run three times counts three times), D the training tokens. ``gamma`` in [0, 1] says what
reuse is worth: 0, a loop adds nothing over its stored parameters; 1, a looped parameter is worth
as much as a unique one. The form is the Chinchilla fit (Hoffmann et al., 2022,
https://arxiv.org/abs/2203.15556: an irreducible loss plus power laws in parameters and data),
with one more exponent for reuse, which is the question sharing asks.

Repeated data counts for less. When the fit knows the dataset's unique training tokens U and
some run saw more than U tokens, the data term uses the effective tokens of data-constrained
scaling (Muennighoff et al., 2023, https://arxiv.org/abs/2305.16264, their equation 5):

    D' = U + U * R* * (1 - exp(-R / R*)),   R = max(D / U - 1, 0) (the repeats)

so the first pass counts in full and each further epoch counts less: after R* repeats
(``R_star``, fitted) one more epoch is worth 1/e of a fresh one, and D' never exceeds U (1 + R*). At CPU scale this is most of
the question: a 2 x 128 model trains 19 epochs of the embedded corpus in 600 s. Without U (or
with no run past one epoch) D' = D and ``R_star`` is not fitted (saved as null).

One-layer models pay a fitted penalty ``C`` (``+ C`` when the model runs a single virtual layer):
induction heads need two layers of attention (Olsson et al., 2022, https://arxiv.org/abs/2209.11895),
and Kaplan et al. (2020, https://arxiv.org/abs/2001.08361) saw one-layer models fall off their
parameter law. Measured here on 47 python-docs runs, every one-layer model of a 13-shape grid
scored worse than a fit without the term predicted and every deeper one better; with it the
left-out error fell from 0.0235 to 0.0216 (docs/results/frontier.md). ``C`` is fitted only when
the runs hold both one-layer and deeper models whose layer counts are known (else saved as null).

Quantization is not a term: the fit is on roundtrip bpb of runs that share one export policy
(the planner predicts for that policy), and the fit file records which policy that was.

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

FIT_FORMAT = 3  # 2: R_star and unique_tokens; 3: C and each run's virtual layers (format 1 and 2 files still load)
FORMATS = (1, 2, FIT_FORMAT)
PARAMS = ("E", "A", "alpha", "B", "beta", "gamma")  # always fitted; R_star only with repeated data, C only with one-layer and deeper runs
OPTIONAL = ("R_star", "C")
MIN_RUNS = 7  # six parameters, and at least one run left over (one more for each of R_star and C)


def finite_number(v: Any) -> bool:
    """A finite int or float (JSON's true and false are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(v: Any) -> bool:
    """A layer count: an int of at least 1 (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


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
    virtual_layers: int | None = None  # None: unknown (a run from a format 1-2 fit file)


def effective_tokens(train_tokens: float, unique_tokens: float | None, r_star: float | None) -> float:
    """D' of data-constrained scaling: the tokens ``train_tokens`` are worth when the data has
    ``unique_tokens`` (None: unknown, every token counts)."""
    if unique_tokens is None or r_star is None or train_tokens <= unique_tokens:
        return train_tokens
    repeats = train_tokens / unique_tokens - 1
    return unique_tokens * (1 + r_star * -math.expm1(-repeats / r_star))


def predict(
    params: dict[str, float | None],
    unique_params: float,
    effective_params: float,
    train_tokens: float,
    unique_tokens: float | None = None,
    virtual_layers: int | None = None,
) -> float:
    p = unique_params ** (1 - params["gamma"]) * effective_params ** params["gamma"]
    d = effective_tokens(train_tokens, unique_tokens, params.get("R_star"))
    one_layer = params.get("C") if virtual_layers == 1 else None
    return params["E"] + params["A"] / p ** params["alpha"] + params["B"] / d ** params["beta"] + (one_layer or 0.0)


def _vector_predict(x: np.ndarray, n: np.ndarray, m: np.ndarray, d: np.ndarray, u: float | None, one: np.ndarray | None = None) -> np.ndarray:
    """The model over arrays; ``x`` = the six PARAMS (amplitudes as logs), then log R_star when
    ``u`` is given, then C when ``one`` (1.0 for one-layer runs, else 0.0) is given."""
    e, log_a, alpha, log_b, beta, gamma = x[:6]
    log_p = (1 - gamma) * np.log(n) + gamma * np.log(m)
    if u is not None:
        r_star = np.exp(x[6])
        d = np.where(d > u, u * (1 + r_star * -np.expm1(-np.maximum(d / u - 1, 0) / r_star)), d)
    penalty = 0.0 if one is None else x[-1] * one
    return e + np.exp(log_a - alpha * log_p) + np.exp(log_b - beta * np.log(d)) + penalty


def repeats_data(points: list[Point], unique_tokens: float | None) -> bool:
    """Whether the fit has a repetition term: the unique tokens are known and a run went past them."""
    return unique_tokens is not None and any(p.train_tokens > unique_tokens for p in points)


R_STAR_BOUNDS = (0.05, 500.0)  # repeats: from "a second epoch is worth almost nothing" to "never saturates here"
C_BOUNDS = (-0.5, 0.5)  # bpb: a one-layer model may be better or worse than the law says, never by half a bit


def one_layer_term(points: list[Point]) -> bool:
    """Whether the fit has the one-layer term: its runs hold one-layer and deeper models (every
    run's layer count known)."""
    layers = [p.virtual_layers for p in points]
    return None not in layers and 1 in layers and any(v > 1 for v in layers)  # type: ignore[operator]


def _fit_arrays(points: list[Point], unique_tokens: float | None = None) -> dict[str, float | None]:
    from scipy.optimize import least_squares

    n = np.array([p.unique_params for p in points], dtype=float)
    m = np.array([p.effective_params for p in points], dtype=float)
    d = np.array([p.train_tokens for p in points], dtype=float)
    y = np.array([p.bpb for p in points], dtype=float)
    repeated, depth = repeats_data(points, unique_tokens), one_layer_term(points)
    lower = [0.0, -20.0, 0.01, -20.0, 0.01, 0.0] + ([math.log(R_STAR_BOUNDS[0])] if repeated else []) + ([C_BOUNDS[0]] if depth else [])
    upper = [float(y.min()), 60.0, 2.0, 60.0, 2.0, 1.0] + ([math.log(R_STAR_BOUNDS[1])] if repeated else []) + ([C_BOUNDS[1]] if depth else [])
    u = unique_tokens if repeated else None
    one = np.array([1.0 if p.virtual_layers == 1 else 0.0 for p in points]) if depth else None
    best = None
    # Several starting points (the surface has shallow valleys); the best fit wins.
    starts = [
        (e0, alpha0, beta0, gamma0, r0)
        for e0 in (0.5 * y.min(), 0.9 * y.min())
        for alpha0, beta0 in ((0.3, 0.3), (0.6, 0.3), (0.3, 0.6))
        for gamma0 in (0.2, 0.8)
        for r0 in ((1.0, 15.0) if repeated else (None,))
    ]
    for e0, alpha0, beta0, gamma0, r0 in starts:
        # Start the amplitudes where each term carries half the excess over E at the median run.
        excess = max(float(np.median(y)) - e0, 1e-3) / 2
        x0 = (
            [
                e0,
                math.log(excess) + alpha0 * float(np.median(np.log(n))),
                alpha0,
                math.log(excess) + beta0 * float(np.median(np.log(d))),
                beta0,
                gamma0,
            ]
            + ([] if r0 is None else [math.log(r0)])
            + ([0.0] if depth else [])
        )
        x0 = [min(max(v, lo + 1e-9), hi - 1e-9) for v, lo, hi in zip(x0, lower, upper)]
        r = least_squares(lambda x: _vector_predict(x, n, m, d, u, one) - y, x0, bounds=(lower, upper), method="trf", max_nfev=4000)
        if best is None or r.cost < best.cost:
            best = r
    e, log_a, alpha, log_b, beta, gamma = best.x[:6]
    return {
        "E": float(e),
        "A": math.exp(log_a),
        "alpha": float(alpha),
        "B": math.exp(log_b),
        "beta": float(beta),
        "gamma": float(gamma),
        "R_star": math.exp(best.x[6]) if repeated else None,
        "C": float(best.x[-1]) if depth else None,
    }


@dataclass
class LossFit:
    """A fitted loss model for one dataset, as saved to JSON."""

    dataset: str
    quant: str
    params: dict[str, float | None]  # PARAMS, R_star (None: no repetition term) and C (None: no one-layer term)
    runs: list[dict[str, Any]] = field(default_factory=list)  # name, inputs, bpb, predicted, residual, left-out prediction
    rmse: float = 0.0  # in-fit root mean square residual
    loo_mae: float = 0.0  # mean absolute error on runs left out of the fit
    loo_max: float = 0.0
    unique_tokens: float | None = None  # the dataset's training tokens (None: unknown)
    format: int = FIT_FORMAT

    def predict(self, unique_params: float, effective_params: float, train_tokens: float, virtual_layers: int | None = None) -> float:
        return predict(self.params, unique_params, effective_params, train_tokens, self.unique_tokens, virtual_layers)

    def epochs(self, train_tokens: float) -> float | None:
        """Passes over the dataset's training tokens that ``train_tokens`` make (None: unknown)."""
        return None if not self.unique_tokens else train_tokens / self.unique_tokens

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
        if not isinstance(d, dict) or d.get("format") not in FORMATS:
            raise FitError(f"{where}: not a loopgolf loss fit (format {', '.join(map(str, FORMATS))})")
        params = d.get("params")

        if not isinstance(params, dict) or set(params) - set(OPTIONAL) != set(PARAMS) or not all(finite_number(params[k]) for k in PARAMS):
            raise FitError(f"{where}: params must hold finite numbers for {', '.join(PARAMS)} (and R_star, a positive number or null; C, a number or null)")
        r_star, c, unique = params.get("R_star"), params.get("C"), d.get("unique_tokens")
        if r_star is not None and not (finite_number(r_star) and r_star > 0):
            raise FitError(f"{where}: R_star must be a positive number or null, got {r_star!r:.40}")
        if c is not None and not finite_number(c):
            raise FitError(f"{where}: C must be a finite number or null, got {c!r:.40}")
        if unique is not None and not (finite_number(unique) and unique > 0):
            raise FitError(f"{where}: unique_tokens must be a positive number or null, got {unique!r:.40}")
        try:
            return cls(
                dataset=str(d["dataset"]),
                quant=str(d.get("quant", "")),
                params={**{k: float(params[k]) for k in PARAMS}, "R_star": None if r_star is None else float(r_star), "C": None if c is None else float(c)},
                runs=list(d.get("runs", [])),
                rmse=float(d.get("rmse", 0.0)),
                loo_mae=float(d["loo_mae"]),
                loo_max=float(d.get("loo_max", 0.0)),
                unique_tokens=None if unique is None else float(unique),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise FitError(f"{where}: {e}") from None


def fit(points: list[Point], *, dataset: str, quant: str = "", unique_tokens: float | None = None) -> LossFit:
    """Fit ``points`` (one dataset, one export policy; ``unique_tokens``: the dataset's training
    tokens, which adds the repetition term when a run went past them); FitError with fewer than
    :data:`MIN_RUNS` (one more with the repetition term) or with values no power law can take
    (non-positive sizes, non-finite bpb)."""
    if unique_tokens is not None and not (math.isfinite(unique_tokens) and unique_tokens > 0):
        raise FitError(f"unique tokens must be a positive number, got {unique_tokens!r}")
    need = MIN_RUNS + repeats_data(points, unique_tokens) + one_layer_term(points)
    if len(points) < need:
        raise FitError(f"a loss fit needs at least {need} finished runs of the dataset, got {len(points)}")
    for p in points:
        if not (p.unique_params > 0 and p.effective_params >= p.unique_params and p.train_tokens > 0 and math.isfinite(p.bpb) and p.bpb > 0):
            raise FitError(f"run {p.name or '?'}: unusable for a fit (params {p.unique_params}/{p.effective_params}, tokens {p.train_tokens}, bpb {p.bpb})")
        if p.virtual_layers is not None and not positive_int(p.virtual_layers):
            raise FitError(f"run {p.name or '?'}: virtual layers must be a positive integer, got {p.virtual_layers!r}")
    params = _fit_arrays(points, unique_tokens)
    runs, errors = [], []
    for i, p in enumerate(points):
        others = points[:i] + points[i + 1 :]
        left_out = predict(_fit_arrays(others, unique_tokens), p.unique_params, p.effective_params, p.train_tokens, unique_tokens, p.virtual_layers)
        predicted = predict(params, p.unique_params, p.effective_params, p.train_tokens, unique_tokens, p.virtual_layers)
        errors.append(abs(left_out - p.bpb))
        runs.append(
            {
                "name": p.name,
                "unique_params": p.unique_params,
                "effective_params": p.effective_params,
                "train_tokens": p.train_tokens,
                "virtual_layers": p.virtual_layers,
                "bpb": p.bpb,
                "predicted": predicted,
                "residual": p.bpb - predicted,
                "left_out_predicted": left_out,
            }
        )
    rmse = math.sqrt(sum(r["residual"] ** 2 for r in runs) / len(runs))
    return LossFit(dataset, quant, params, runs, rmse, float(np.mean(errors)), float(np.max(errors)), unique_tokens)


def fit_path(dataset: str, policy: str | None = None) -> Path:
    """Where ``loopgolf fit`` keeps a dataset's fit and ``loopgolf budget`` looks for it:
    ``<cache>/fits/<dataset>.json`` for the int8 baseline's runs (``policy`` None),
    ``<dataset>@<policy>.json`` for another policy's (``policy`` as ``QuantPolicy.describe``
    writes it, so that every spelling of one policy shares a file: :func:`loopgolf.budget.fit_file`
    normalises it); the names made file-safe."""

    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", text).strip("_") or "dataset"

    return cache_dir() / "fits" / f"{slug(dataset)}{'' if policy is None else '@' + slug(policy)}.json"


def load_fit(path: str | Path) -> LossFit:
    try:
        return LossFit.from_dict(json.loads(Path(path).read_text()), str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FitError(f"{path}: cannot read a loss fit ({e})") from None

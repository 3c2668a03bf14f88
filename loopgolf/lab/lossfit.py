"""Fit the loss model (:mod:`loopgolf.lossmodel`) on finished runs in the results store.

A run counts for a dataset's fit when it finished (status ``done``), trained on that dataset
(``config.data.name``: ``embedded:python-docs`` for the default corpus, the directory for
``--data DIR``), exported with the fit's quantization policy, and did not start from another
model (uptraining or conversion change what the tokens bought). Each seed is one point.
"""

from __future__ import annotations

from loopgolf.lab.store import RunRow
from loopgolf.lossmodel import FitError, LossFit, Point, fit


def datasets(rows: list[RunRow]) -> dict[str, int]:
    """Finished runs per dataset name, most first: what a fit could be made for."""
    counts: dict[str, int] = {}
    for row in rows:
        if row.status == "done" and row.summary is not None:
            name = row.value("data.name") or "?"
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def points(rows: list[RunRow], dataset: str, quant: str = "") -> list[Point]:
    out = []
    for row in rows:
        if row.status != "done" or row.summary is None or row.value("data.name") != dataset:
            continue
        if (row.value("export.quant") or "") != quant or row.summary.get("uptrain"):
            continue
        s = row.summary
        name = f"{row.ledger or '-'}/{row.variant or '-'}/seed{row.seed}" if row.ledger else row.run_dir
        out.append(Point(float(s["unique_params"]), float(s["effective_params"]), float(s["train_tokens"]), float(s["val_bpb_post"]), name))
    return out


def fit_store(rows: list[RunRow], dataset: str, quant: str = "") -> LossFit:
    found = points(rows, dataset, quant)
    if len(found) < 7:
        have = ", ".join(f"{k} ({v})" for k, v in datasets(rows).items()) or "none"
        raise FitError(
            f"{len(found)} finished run(s) of dataset {dataset!r} with quant {quant or 'int8'!r} in the store; a fit needs at least 7. "
            f"Datasets with finished runs: {have}. The built-in ledger `calibration` makes them: loopgolf sweep calibration"
        )
    return fit(found, dataset=dataset, quant=quant)

"""Fit the loss model (:mod:`loopgolf.lossmodel`) on finished runs in the results store.

A run counts for a dataset's fit when it finished (status ``done``), trained on that dataset
(``config.data.name``: ``embedded:python-docs`` for the default corpus, the directory for
``--data DIR``), exported with the fit's quantization policy, and did not start from another
model (uptraining or conversion change what the tokens bought). Each seed is one point.
"""

from __future__ import annotations

from loopgolf.lab.store import RunRow
from loopgolf.lossmodel import MIN_RUNS, FitError, LossFit, Point, fit


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


def unique_tokens(rows: list[RunRow], dataset: str) -> tuple[float | None, str]:
    """The dataset's training tokens from its manifest, and where they came from (or why not)."""
    from loopgolf.data.dataset import CorpusError, load_manifest

    dirs = sorted({str(row.value("data.dir")) for row in rows if row.value("data.name") == dataset and row.value("data.dir")})
    counts = {}
    for d in dirs:
        try:
            manifest = load_manifest(d)
        except (CorpusError, OSError):
            manifest = None
        if manifest is not None:
            counts[d] = manifest["splits"]["train"].get("tokens")
    found = {c for c in counts.values() if isinstance(c, int) and c > 0}
    if len(found) == 1:
        return float(found.pop()), f"the manifest in {', '.join(counts)}"
    if len(found) > 1:
        return None, f"the runs' data directories disagree on the training tokens ({', '.join(f'{d}: {c}' for d, c in counts.items())})"
    return None, "no readable manifest in the runs' data directories" if dirs else "the runs name no data directory"


def fit_store(rows: list[RunRow], dataset: str, quant: str = "", tokens: float | None = None) -> tuple[LossFit, str]:
    """The fit of ``dataset``'s runs, and a note on where its unique tokens came from
    (``tokens``: the count given by the user)."""
    found = points(rows, dataset, quant)
    if len(found) < MIN_RUNS:
        have = ", ".join(f"{k} ({v})" for k, v in datasets(rows).items()) or "none"
        raise FitError(
            f"{len(found)} finished run(s) of dataset {dataset!r} with quant {quant or 'int8'!r} in the store; a fit needs at least {MIN_RUNS}. "
            f"Datasets with finished runs: {have}. The built-in ledger `calibration` makes them: loopgolf sweep calibration"
        )
    note = "given"
    if tokens is None:
        tokens, note = unique_tokens(rows, dataset)
    return fit(found, dataset=dataset, quant=quant, unique_tokens=tokens), note

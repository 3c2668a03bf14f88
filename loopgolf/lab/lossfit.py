"""Fit the loss model (:mod:`loopgolf.lossmodel`) on finished runs in the results store.

A run counts for a dataset's fit when it finished (status ``done``), trained on that dataset
(``config.data.name``: ``embedded:python-docs`` for the default corpus, the directory for
``--data DIR``), exported with the fit's quantization policy, and did not start from another
model (uptraining or conversion change what the tokens bought). Each seed is one point.

Runs of earlier fit files can join them (``loopgolf fit --include FILE``): a fit file holds every
run's inputs and score, so one saved beside published results keeps them fittable after the store
that made it is gone.
"""

from __future__ import annotations

from collections.abc import Sequence

from loopgolf.lab.store import RunRow
from loopgolf.lossmodel import MIN_RUNS, FitError, LossFit, Point, finite_number, fit, positive_int


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
        plan = s.get("plan")
        layers = plan.get("virtual_layers") if isinstance(plan, dict) else None
        layers = layers if positive_int(layers) else None
        out.append(Point(float(s["unique_params"]), float(s["effective_params"]), float(s["train_tokens"]), float(s["val_bpb_post"]), name, layers))
    return out


def included_points(included: LossFit, dataset: str, quant: str, where: str) -> list[Point]:
    """The runs an earlier fit file holds, as points: how a fit made elsewhere (a colleague's, or
    one committed with published results whose store is gone) joins the store's runs. The file must
    be for the same dataset and policy; FitError names a run whose numbers a fit cannot take."""
    if included.dataset != dataset or included.quant != quant:
        raise FitError(
            f"{where}: a fit of dataset {included.dataset!r} with quant {included.quant or 'int8'!r}; "
            f"this fit is of {dataset!r} with quant {quant or 'int8'!r} (--data and --quant choose it)"
        )
    out = []
    for i, run in enumerate(included.runs):
        keys = ("unique_params", "effective_params", "train_tokens", "bpb")
        values = [run.get(k) for k in keys] if isinstance(run, dict) else [None]
        if not all(finite_number(v) for v in values):
            raise FitError(f"{where}: run {i} must hold finite numbers for {', '.join(keys)}")
        name, layers = run.get("name"), run.get("virtual_layers")
        if layers is not None and not positive_int(layers):
            raise FitError(f"{where}: run {i}: virtual_layers must be a positive integer or null, got {layers!r:.40}")
        out.append(Point(*(float(v) for v in values), name=str(name) if name else f"{where}#{i}", virtual_layers=layers))
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


def fit_store(
    rows: list[RunRow], dataset: str, quant: str = "", tokens: float | None = None, include: Sequence[tuple[str, LossFit]] = ()
) -> tuple[LossFit, str]:
    """The fit of ``dataset``'s runs, and a note on where its unique tokens came from
    (``tokens``: the count given by the user). ``include``: (where, fit) pairs whose runs join the
    store's; a run named like one already counted (the store's first) is counted once."""
    found = points(rows, dataset, quant)
    seen = {p.name for p in found}
    for where, extra in include:
        for p in included_points(extra, dataset, quant, where):
            if p.name not in seen:
                seen.add(p.name)
                found.append(p)
    if len(found) < MIN_RUNS:
        have = ", ".join(f"{k} ({v})" for k, v in datasets(rows).items()) or "none"
        raise FitError(
            f"{len(found)} finished run(s) of dataset {dataset!r} with quant {quant or 'int8'!r} in the store; a fit needs at least {MIN_RUNS}. "
            f"Datasets with finished runs: {have}. The built-in ledger `calibration` makes them: loopgolf sweep calibration"
        )
    note = "given"
    if tokens is None:
        tokens, note = unique_tokens(rows, dataset)
    if tokens is None and include:
        # The store's runs name no readable manifest (or there are none): the included files
        # say what the dataset's unique tokens were when they were made, if they agree.
        counts = {extra.unique_tokens for _, extra in include}
        if len(counts) == 1 and None not in counts:
            tokens, note = counts.pop(), f"the included fit file{'s' if len(include) > 1 else ''}"
    return fit(found, dataset=dataset, quant=quant, unique_tokens=tokens), note

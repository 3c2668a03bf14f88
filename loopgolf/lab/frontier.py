"""The size-quality frontier of a ledger whose variants each carry a design ``family`` and the
``model_cap_bytes`` they were sized for (the built-in ``frontier`` ledger).

At each cap, a family's point is its best variant there (the lowest mean roundtrip val_bpb over
its seeds; a family may run several candidates at one cap, for example a one-layer and a deeper
vanilla model, because the planner's loss model can be wrong). Picking the best of a family's
candidates on the same runs that are then tested favours families with more candidates a
little; the report lists every candidate, so a reader can see how much choice there was.

Each cap's best family other than the reference (the baseline variant's family) is tested
against the reference's point there: Welch's t-test over all seeds, and the paired t-test over
the seeds both have (same seed, same data order). A run whose model bytes exceed its variant's
cap is not counted, and is named. The verdict per cap says which family wins and whether the
difference is significant at p < 0.01 with at least three seeds a side; "sharing crosses over"
where a non-reference family wins significantly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from loopgolf.lab.ledger import Ledger
from loopgolf.lab.significance import MIN_SEEDS, SIGNIFICANCE, Paired, Welch, mean_std, paired, welch
from loopgolf.lab.store import RunRow


class _Group(Protocol):
    name: str
    rows: list[RunRow]


@dataclass
class Candidate:
    """One variant at its cap: its counted runs' bpb by seed, and the runs over its cap."""

    name: str
    family: str
    cap: int
    bpb: dict[int, float]
    model_bytes: list[float]
    over_cap: list[RunRow] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return mean_std(list(self.bpb.values()))[0] if self.bpb else math.inf

    @property
    def std(self) -> float:
        return mean_std(list(self.bpb.values()))[1] if self.bpb else 0.0


@dataclass
class CapResult:
    """One cap: each family's best candidate, and the best other family tested against the reference."""

    cap: int
    best: dict[str, Candidate]  # family -> its best candidate at this cap
    candidates: list[Candidate]
    reference: str
    challenger: Candidate | None = None
    test: Welch | None = None
    paired: Paired | None = None

    def winner(self) -> str | None:
        """The family that wins here significantly (p < 0.01, at least MIN_SEEDS seeds a side), or None."""
        ref, c, w = self.best.get(self.reference), self.challenger, self.test
        if ref is None or c is None or w is None or min(len(c.bpb), len(ref.bpb)) < MIN_SEEDS:
            return None
        if not math.isfinite(w.p) or w.p >= SIGNIFICANCE:
            return None
        return c.family if c.mean < ref.mean else self.reference

    def verdict(self) -> str:
        ref = self.best.get(self.reference)
        if ref is None:
            return f"no finished run of the reference family `{self.reference}`: no test"
        if self.challenger is None:
            return f"only `{self.reference}` has finished runs here"
        c = self.challenger
        who = f"`{c.family}` ({c.name}, {c.mean:.4f}) against `{self.reference}` ({ref.name}, {ref.mean:.4f}): {c.mean - ref.mean:+.4f} bpb"
        if self.test is None:
            return f"{who}; too few seeds for a test"
        p_text = f"p = {self.test.p:.2g} (Welch)" + (f", paired p = {self.paired.p:.2g} over {self.paired.n} seeds" if self.paired is not None else "")
        if min(len(c.bpb), len(ref.bpb)) < MIN_SEEDS:
            return f"{who}, {p_text}; fewer than {MIN_SEEDS} seeds a side: no verdict"
        winner = self.winner()
        if winner:
            return f"{who}, {p_text}: **{winner} wins**"
        pd = self.paired
        if pd is not None and pd.n >= MIN_SEEDS and math.isfinite(pd.p) and pd.p < SIGNIFICANCE:
            # Welch's test counts each seed's own luck as noise; with the same seeds on both sides the paired test removes it.
            ahead = c.family if pd.diff < 0 else self.reference
            return f"{who}, {p_text}: not significant by Welch's test at p < {SIGNIFICANCE}, but `{ahead}` is ahead seed by seed (paired)"
        return f"{who}, {p_text}: no significant difference at p < {SIGNIFICANCE}"


def is_frontier(ledger: Ledger) -> bool:
    return bool(ledger.variants) and all(v.family and v.model_cap_bytes for v in ledger.variants)


def frontier(ledger: Ledger, groups: Sequence[_Group]) -> list[CapResult]:
    """Per cap (ascending): each family's best candidate and the test of the best non-reference
    family against the reference family (the baseline variant's)."""
    reference = ledger.variant(ledger.baseline).family
    by_name = {g.name: g for g in groups}
    candidates: list[Candidate] = []
    for v in ledger.variants:
        g = by_name.get(v.name)
        if g is None or v.model_cap_bytes is None:
            continue
        fits = [r for r in g.rows if float(r.summary["model_bytes"]) <= v.model_cap_bytes]
        over = [r for r in g.rows if float(r.summary["model_bytes"]) > v.model_cap_bytes]
        bpb = {int(r.seed): float(r.summary["val_bpb_post"]) for r in fits if r.seed is not None}
        candidates.append(Candidate(v.name, v.family, v.model_cap_bytes, bpb, [float(r.summary["model_bytes"]) for r in fits], over))
    out = []
    for cap in sorted({c.cap for c in candidates}):
        here = [c for c in candidates if c.cap == cap and c.bpb]
        best: dict[str, Candidate] = {}
        for c in sorted(here, key=lambda c: c.mean):
            best.setdefault(c.family, c)
        result = CapResult(cap, best, [c for c in candidates if c.cap == cap], reference)
        others = [c for f, c in best.items() if f != reference]
        if others:
            result.challenger = min(others, key=lambda c: c.mean)
            ref = best.get(reference)
            if ref is not None:
                a, b = result.challenger.bpb, ref.bpb
                if len(a) >= 2 and len(b) >= 2:
                    result.test = welch(list(a.values()), list(b.values()))
                common = sorted(set(a) & set(b))
                if len(common) >= 2:
                    result.paired = paired([a[s] for s in common], [b[s] for s in common])
        out.append(result)
    return out


def _cap_label(cap: int) -> str:
    return f"{cap / 1e6:g} MB" if cap >= 1_000_000 else f"{cap / 1e3:g} kB"


def render_frontier(results: list[CapResult]) -> list[str]:
    """The report's frontier section (markdown lines)."""
    families = sorted({c.family for r in results for c in r.candidates})
    lines = [
        "## The frontier (val_bpb against the model-byte cap)",
        "",
        "Each family's point at a cap is its best candidate there (mean ± std over seeds). Runs whose model bytes exceed "
        f"their cap are not counted. The test: the best family other than `{results[0].reference if results else ''}` "
        "against it, at each cap.",
        "",
        "| cap | " + " | ".join(families) + " |",
        "|---|" + "---:|" * len(families),
    ]
    for r in results:
        cells = []
        for f in families:
            c = r.best.get(f)
            cells.append("n/a" if c is None else f"{c.mean:.4f}" + (f" ± {c.std:.4f}" if len(c.bpb) > 1 else "") + f" ({c.name}, n={len(c.bpb)})")
        lines.append(f"| {_cap_label(r.cap)} | " + " | ".join(cells) + " |")
    lines += ["", "Every candidate:", "", "| cap | family | variant | seeds | val_bpb | model bytes |", "|---|---|---|---:|---:|---:|"]
    for r in results:
        for c in sorted(r.candidates, key=lambda c: (c.family, c.mean)):
            mb = f"{mean_std(c.model_bytes)[0]:,.0f}" if c.model_bytes else "n/a"
            val = "n/a" if not c.bpb else f"{c.mean:.4f}" + (f" ± {c.std:.4f}" if len(c.bpb) > 1 else "")
            lines.append(f"| {_cap_label(r.cap)} | {c.family} | {c.name} | {len(c.bpb)} | {val} | {mb} |")
    over = [(c, row) for r in results for c in r.candidates for row in c.over_cap]
    for c, row in over:
        lines.append(f"- Not counted: `{c.name}` seed {row.seed} stored {float(row.summary['model_bytes']):,.0f} model bytes, over its cap of {c.cap:,}.")
    lines += ["", "Per cap:", ""]
    lines += [f"- {_cap_label(r.cap)}: {r.verdict()}." for r in results]
    crossed = [r for r in results if r.winner() not in (None, r.reference)]
    lines += [
        "",
        "Crossover: "
        + (
            "another family beats the reference significantly at " + ", ".join(f"{_cap_label(r.cap)} ({r.winner()})" for r in crossed) + "."
            if crossed
            else "no cap where another family beats the reference significantly."
        ),
        "",
    ]
    lines += ["![val_bpb against the model-byte cap](bpb_vs_cap.png)", ""]
    return lines


def plot_frontier(results: list[CapResult], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    families = sorted({c.family for r in results for c in r.candidates})
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=100)
    cmap = matplotlib.colormaps["tab10"]
    for i, f in enumerate(families):
        pts = [(r.cap, r.best[f]) for r in results if f in r.best]
        colour, marker = cmap(i % 10), "osD^vP"[i % 6]
        ax.errorbar([p[0] for p in pts], [c.mean for _, c in pts], yerr=[c.std for _, c in pts], color=colour, marker=marker, capsize=3, lw=1.5, label=f)
        for r in results:  # every seed of every candidate, faint, so the spread and the choice show
            for c in r.candidates:
                if c.family == f:
                    ax.scatter([r.cap] * len(c.bpb), list(c.bpb.values()), color=colour, marker=marker, alpha=0.3, s=14)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: _cap_label(int(x))))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([r.cap for r in results])
    ax.set_xlabel("model-byte cap (log scale)")
    ax.set_ylabel("roundtrip val_bpb (lower is better)")
    ax.set_title(f"{title}: best of each family at each cap")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = out / "bpb_vs_cap.png"
    fig.savefig(path)
    plt.close(fig)
    return path

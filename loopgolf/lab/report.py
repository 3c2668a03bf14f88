"""``loopgolf report``: a ledger's finished runs as a markdown report with significance and plots.

Per variant: mean +- std over seeds of the roundtrip val_bpb, artifact bytes, unique and
effective parameters, tokens/s and training FLOPs (3 x forward FLOPs per token x training
tokens; a progressive-recurrence run's stages each at their own depth), and the roundtrip
val_loss. One run counts per (variant, seed): the latest finished, when a seed was run twice; a
run whose results are not finite numbers is not counted (the report says which). Each variant
with at least two seeds is tested against the baseline: Welch's t-test (two-sided) and, over the
seeds both have, the paired t-test (the same seed gives both variants the same data order and
initial draw), in bpb and in nats (val_loss_post); the effect is variant - baseline, negative =
better. Fewer than three seeds (or pairs) are flagged as too few for a test to mean anything, and
give no verdict. The verdict also says whether the effect clears Parameter Golf's record rule:
at least 0.005 nats (of val_loss) better at p < 0.01, tested one-sided against that margin.
Plots (PNG): val_bpb against artifact bytes with the Pareto frontier of the variant means,
val_bpb against training FLOPs, and every run's training loss curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from loopgolf.lab.frontier import CapResult, frontier, is_frontier, plot_frontier, render_frontier
from loopgolf.lab.ledger import Ledger
from loopgolf.lab.significance import MIN_SEEDS, SIGNIFICANCE, Paired, Welch, margin_p, mean_std, paired, welch
from loopgolf.lab.store import RunRow
from loopgolf.rundir import RunDir

RECORD_MARGIN_NATS = 0.005  # the margin a new record must beat the old one by, in nats of val_loss
# The summary numbers a report uses: each must be a finite number for a run to count.
_NUMBERS = ("val_bpb_post", "val_loss_post", "artifact_bytes", "unique_params", "effective_params", "tokens_per_second", "steps", "train_tokens")


class ReportError(ValueError):
    pass


def train_flops(row: RunRow) -> float | None:
    from loopgolf.model.gpt import ModelConfig, forward_flops_per_token

    if not isinstance(row.config, dict) or not isinstance(row.summary, dict):
        return None
    try:
        cfg = ModelConfig.from_dict(row.config["model"])
        seq_len, steps, tokens = int(row.config["train"]["seq_len"]), int(row.summary["steps"]), float(row.summary["train_tokens"])
        starts = [int(x) for x in row.summary.get("stage_steps") or []]
    except (KeyError, TypeError, ValueError, RecursionError):  # a config this loopgolf cannot read: FLOPs unknown
        return None
    sampling = row.config["train"].get("loop_sampling") if isinstance(row.config.get("train"), dict) else None
    if sampling and steps > 0:
        # Depth-sampled training: each step at the depth it drew (a function of seed and step).
        from collections import Counter

        from loopgolf.config import LoopSampler

        try:
            sampler, seed = LoopSampler.parse(sampling), int(row.config["train"]["seed"])
            counts = Counter(sampler.draw(seed, s) for s in range(steps))
            return sum(
                3.0 * forward_flops_per_token(cfg, seq_len, num_layers=len(cfg.depth_plan.schedule(n)[0])) * tokens * k / steps for n, k in counts.items()
            )
        except (KeyError, TypeError, ValueError):
            return None
    if len(starts) < 2 or steps <= 0:
        return 3.0 * forward_flops_per_token(cfg, seq_len) * tokens
    # Progressive recurrence: each stage's steps at that stage's depth (stage i runs from
    # starts[i] to starts[i + 1]).
    bounds = starts + [steps]
    flops = 0.0
    for stage, (a, b) in enumerate(zip(bounds, bounds[1:])):
        layers = len(cfg.depth_plan.active_layers(stage))
        flops += 3.0 * forward_flops_per_token(cfg, seq_len, num_layers=layers) * tokens * (b - a) / steps
    return flops


def loss_curve(row: RunRow) -> tuple[list[int], list[float]]:
    """The training loss by step from the run's log (empty when the log is gone or unreadable)."""
    steps, losses = [], []
    try:
        records = RunDir(Path(row.run_dir)).read_log()
    except (ValueError, OSError):
        return steps, losses
    for ev in records:
        step, loss = ev.get("step"), ev.get("loss")
        if ev.get("event") == "train" and isinstance(step, int) and isinstance(loss, (int, float)) and math.isfinite(loss):
            steps.append(step)
            losses.append(float(loss))
    return steps, losses


def row_problem(row: RunRow) -> str | None:
    """Why a finished row cannot be counted (None when it can): a seed that is not an integer,
    or a result the report uses that is not a finite number."""
    if isinstance(row.seed, bool) or not isinstance(row.seed, int):
        return f"seed {row.seed!r:.40} is not an integer"
    if not isinstance(row.summary, dict):
        return "its summary is not an object"
    for key in _NUMBERS:
        v = row.summary.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"{key} is not a finite number"  # (its value is not printed: a report never shows nan)
    return None


@dataclass
class Selection:
    """The rows a report counts: finished, with finite results, one per (variant, seed)."""

    counted: list[RunRow]
    duplicates: list[tuple[RunRow, list[RunRow]]]  # (the latest finished, counted; the others)
    invalid: list[tuple[RunRow, str]]  # finished rows that cannot be counted, and why
    unfinished: list[RunRow]


def select_rows(rows: list[RunRow]) -> Selection:
    """Finished rows with finite results, one per (variant, seed): of a seed run more than once
    (two directories, or a store that holds both), the latest finished counts."""
    invalid, by_key = [], {}
    for r in rows:
        if r.status != "done" or r.summary is None:
            continue
        problem = row_problem(r)
        if problem is not None:
            invalid.append((r, problem))
            continue
        by_key.setdefault((r.variant, r.seed), []).append(r)
    counted, duplicates = [], []
    for group in by_key.values():
        group.sort(key=lambda r: (r.finished or "", r.started or "", r.run_dir), reverse=True)
        counted.append(group[0])
        if len(group) > 1:
            duplicates.append((group[0], group[1:]))
    unfinished = [r for r in rows if r.status != "done"]
    counted.sort(key=lambda r: (str(r.variant), r.seed, r.run_dir))
    return Selection(counted, duplicates, invalid, unfinished)


@dataclass
class VariantStats:
    name: str
    rows: list[RunRow]
    bpb: list[float] = field(init=False)
    nats: list[float] = field(init=False)  # val_loss_post
    metrics: dict[str, tuple[float, float]] = field(init=False)
    test: Welch | None = None  # Welch's t-test against the baseline, in bpb
    test_nats: Welch | None = None  # ... in nats
    paired: Paired | None = None  # the paired t-test over the seeds both have, in bpb
    paired_nats: Paired | None = None
    record_p: float | None = None  # one-sided p that it is more than RECORD_MARGIN_NATS better (Welch)
    record_p_paired: float | None = None  # ... (paired)

    def __post_init__(self) -> None:
        self.bpb = [float(r.summary["val_bpb_post"]) for r in self.rows]
        self.nats = [float(r.summary["val_loss_post"]) for r in self.rows]
        self.metrics = {"val_bpb": mean_std(self.bpb), "val_loss": mean_std(self.nats)}
        for key in ("artifact_bytes", "unique_params", "effective_params", "tokens_per_second"):
            self.metrics[key] = mean_std([float(r.summary[key]) for r in self.rows])
        flops = [train_flops(r) for r in self.rows]
        self.metrics["train_flops"] = mean_std([f for f in flops if f is not None]) if all(f is not None for f in flops) else (float("nan"), 0.0)

    def by_seed(self, values: list[float]) -> dict[int, float]:
        return {r.seed: v for r, v in zip(self.rows, values)}

    @property
    def seeds(self) -> int:
        return len(self.rows)


def compare(g: VariantStats, base: VariantStats) -> None:
    """Test ``g`` against the baseline (Welch's with two or more seeds a side; paired with two
    or more seeds in common), in bpb and nats, and against the record margin."""
    if len(g.bpb) >= 2 and len(base.bpb) >= 2:
        g.test, g.test_nats = welch(g.bpb, base.bpb), welch(g.nats, base.nats)
        g.record_p = margin_p(g.nats, base.nats, RECORD_MARGIN_NATS, pair=False)
    common = sorted(set(g.by_seed(g.bpb)) & set(base.by_seed(base.bpb)))
    if len(common) >= 2:
        gb, bb, gn, bn = g.by_seed(g.bpb), base.by_seed(base.bpb), g.by_seed(g.nats), base.by_seed(base.nats)
        g.paired = paired([gb[s] for s in common], [bb[s] for s in common])
        g.paired_nats = paired([gn[s] for s in common], [bn[s] for s in common])
        g.record_p_paired = margin_p([gn[s] for s in common], [bn[s] for s in common], RECORD_MARGIN_NATS, pair=True)


def variant_stats(ledger: Ledger, rows: list[RunRow]) -> list[VariantStats]:
    """Counted runs (:func:`select_rows`) grouped by the ledger's variants (in ledger order),
    tested against the baseline."""
    done = select_rows(rows).counted
    groups = [VariantStats(v.name, [r for r in done if r.variant == v.name]) for v in ledger.variants if any(r.variant == v.name for r in done)]
    if not groups:
        raise ReportError(f"no finished runs of ledger {ledger.name!r} in the store; run `loopgolf sweep {ledger.name}` first")
    base = next((g for g in groups if g.name == ledger.baseline), None)
    for g in groups:
        if base is not None and g is not base:
            compare(g, base)
    return groups


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both x and y (lower is better on both), by x."""
    front = []
    for x, y, name in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y, name))
    return front


def _colours(names: list[str]) -> dict[str, Any]:
    import matplotlib

    # tab10 first (the most distinct), then tab20's lighter shades for variants 11-20.
    tab10, tab20 = matplotlib.colormaps["tab10"], matplotlib.colormaps["tab20"]
    return {n: tab10(i) if i < 10 else tab20((2 * (i - 10) + 1) % 20) for i, n in enumerate(names)}


def make_plots(groups: list[VariantStats], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colours = _colours([g.name for g in groups])
    markers = {g.name: "osD^vPX*<>pHh8d"[i % 15] for i, g in enumerate(groups)}  # shape as well as colour tells variants apart
    paths = []

    def scatter(xkey: str, xlabel: str, fname: str, frontier: bool) -> None:
        fig, ax = plt.subplots(figsize=(8, 5.5), dpi=100)
        means = []
        for g in groups:
            xs = [float(r.summary["artifact_bytes"]) if xkey == "artifact_bytes" else (train_flops(r) or math.nan) for r in g.rows]
            ax.scatter(xs, g.bpb, color=colours[g.name], marker=markers[g.name], alpha=0.45, s=18)
            mx, my = g.metrics[xkey][0], g.metrics["val_bpb"][0]
            ax.scatter([mx], [my], color=colours[g.name], marker=markers[g.name], s=70, edgecolor="black", label=f"{g.name} (n={len(g.rows)})")
            means.append((mx, my, g.name))
        if frontier:
            front = pareto(means)
            ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto frontier (means)")
        if xkey == "artifact_bytes":
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("roundtrip val_bpb (bits per byte, lower is better)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(out / fname)
        plt.close(fig)
        paths.append(out / fname)

    scatter("artifact_bytes", "artifact bytes (compressed model + code)", "bpb_vs_bytes.png", True)
    scatter("train_flops", "training FLOPs (3 x forward FLOPs/token x tokens)", "bpb_vs_flops.png", False)

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=100)
    for g in groups:
        for i, r in enumerate(g.rows):
            steps, losses = loss_curve(r)
            ax.plot(steps, losses, color=colours[g.name], lw=1, alpha=0.8, label=g.name if i == 0 else None)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (nats per token)")
    ax.set_title(f"{title}: training loss, every run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png")
    plt.close(fig)
    paths.append(out / "loss_curves.png")
    return paths


def _f(x: float | None, fmt: str) -> str:
    """``x`` formatted, or ``n/a`` for a missing or non-finite number (a report never prints nan)."""
    return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def _pm(ms: tuple[float, float], fmt: str, n: int) -> str:
    m, s = ms
    return f"{_f(m, fmt)} ± {_f(s, fmt)}" if n > 1 else _f(m, fmt)  # one seed: no spread to show


def _finite(*xs: Any) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def _record(p: float | None) -> str:
    if p is None or not _finite(p):
        return "n/a"
    return f"{'met' if p < SIGNIFICANCE else 'not met'} (p = {p:.2g})"


def margin_bpb(groups: list[VariantStats]) -> float | None:
    """The record margin in bpb on this validation set: 0.005 nats per target, as bits, times
    targets per byte (from the summaries; None where they do not say)."""
    ratios = []
    for g in groups:
        for r in g.rows:
            t, b = r.summary.get("val_targets"), r.summary.get("val_target_bytes")
            if _finite(t, b) and not isinstance(t, bool) and not isinstance(b, bool) and t > 0 and b > 0:
                ratios.append(t / b)
    return RECORD_MARGIN_NATS / math.log(2) * (sum(ratios) / len(ratios)) if ratios else None


def render_markdown(ledger: Ledger, groups: list[VariantStats], rows: list[RunRow], command: str | None = None, caps: list[CapResult] | None = None) -> str:
    """The report's markdown (``caps``: the frontier of a frontier ledger, when the caller has it already)."""
    base = next((g for g in groups if g.name == ledger.baseline), None)
    sel = select_rows(rows)
    counted = [r for g in groups for r in g.rows]
    data = sorted({str(r.summary.get("data")) for r in counted})
    commits = sorted({r.git_commit[:12] for r in counted if r.git_commit})
    lines = [
        f"# Ledger `{ledger.name}`",
        "",
        ledger.description,
        "",
        f"- Report made {date.today().isoformat()} from {len(counted)} finished run(s); code commit(s) {', '.join(commits) or 'unknown'}.",
        f"- Budget: {ledger.budget:g} {ledger.budget_kind} per run; cap {ledger.cap_bytes:,} bytes; baseline `{ledger.baseline}`.",
        f"- Data: {', '.join(data)}.",
    ]
    if command:
        lines.append(f"- Command: `{command}`")
    if sel.unfinished:
        lines.append(f"- Not counted: {len(sel.unfinished)} run(s) not finished ({', '.join(sorted({str(r.status) for r in sel.unfinished}))}).")
    for r, problem in sel.invalid:
        lines.append(f"- Not counted: `{r.variant}` seed {r.seed!r:.40} ({r.run_dir}): {problem}.")
    for kept, others in sel.duplicates:
        dropped = ", ".join(f"{r.run_dir} (finished {r.finished or 'unknown'})" for r in others)
        lines.append(
            f"- Seed run more than once: `{kept.variant}` seed {kept.seed} has {1 + len(others)} finished runs; one counts, the latest finished: "
            f"{kept.run_dir} (finished {kept.finished or 'unknown'}); not counted: {dropped}."
        )
    known = {v.name for v in ledger.variants}
    strays = sorted({str(r.variant) for r in sel.counted if r.variant not in known})
    if strays:
        lines.append(f"- Not counted: runs of variants the ledger does not have ({', '.join(strays)}).")
    lines += ["", "## Variants", "", "| variant | preset | steps | what it is |", "|---|---|---:|---|"]
    for g in groups:
        v = ledger.variant(g.name)
        steps = sorted({int(r.summary["steps"]) for r in g.rows})
        lines.append(f"| {g.name} | `{v.preset}`{' + overrides' if v.model or v.train else ''} | {', '.join(map(str, steps))} | {v.description} |")
    lines += [
        "",
        "## Per variant (mean ± std over seeds; one seed: the value)",
        "",
        "| variant | seeds | val_bpb | artifact bytes | unique params | effective params | tokens/s | training FLOPs | val_loss (nats) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in sorted(groups, key=lambda g: g.metrics["val_bpb"][0]):
        m, n = g.metrics, len(g.rows)
        lines.append(
            f"| {g.name}{' (baseline)' if g is base else ''} | {len(g.rows)} | {_pm(m['val_bpb'], '.4f', n)} | {_pm(m['artifact_bytes'], ',.0f', n)} | "
            f"{_f(m['unique_params'][0], ',.0f')} | {_f(m['effective_params'][0], ',.0f')} | {_pm(m['tokens_per_second'], ',.0f', n)} | "
            f"{_f(m['train_flops'][0], '.3g')} | {_pm(m['val_loss'], '.4f', n)} |"
        )
    margin = margin_bpb(groups)
    lines += [
        "",
        f"## Against the baseline (effect = variant − `{ledger.baseline}`, negative is better)",
        "",
        "Welch's t-test (two-sided, unequal variances) compares all seeds of each side. Runs with the same seed see the same "
        "data order and initial draw, so the paired t-test over the seeds both have removes the seed's own luck. Effects are in "
        f"bpb (val_bpb_post) and nats (val_loss_post). *Record rule*: Parameter Golf takes a new record only if it beats the old "
        f"one by at least {RECORD_MARGIN_NATS} nats at p < {SIGNIFICANCE} (one-sided, against that margin)"
        + (f"; {RECORD_MARGIN_NATS} nats is {margin:.4f} bpb on this validation set." if margin is not None else "."),
        "",
    ]
    tested = [g for g in groups if g.test is not None]
    pairs = [g for g in groups if g.paired is not None]
    if base is None or len(base.bpb) < 2:
        lines.append(f"The baseline `{ledger.baseline}` has fewer than two finished seeds: no test is possible.")
    elif not tested and not pairs:
        lines.append("No other variant has two or more finished seeds: no test is possible.")
    tables = (
        ("### Welch's t-test", "seeds", tested, lambda g: (f"{len(g.bpb)} vs {len(base.bpb)}", g.test, g.test_nats, g.record_p), ".1f"),
        ("### Paired t-test (seeds both have)", "pairs", pairs, lambda g: (str(g.paired.n), g.paired, g.paired_nats, g.record_p_paired), ".0f"),
    )
    for title, count, rows, pick, df_format in tables:
        if not rows:
            continue
        lines += [
            title,
            "",
            f"| variant | {count} | effect (bpb) | 95% interval | t | df | p | effect (nats) | p (nats) | record rule |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for g in sorted(rows, key=lambda g: pick(g)[1].p):
            n, w, wn, record = pick(g)
            lines.append(
                f"| {g.name} | {n} | {_f(w.diff, '+.4f')} | [{_f(w.ci_low, '+.4f')}, {_f(w.ci_high, '+.4f')}] | {_f(w.t, '.2f')} | "
                f"{_f(w.df, df_format)} | {_f(w.p, '.2g')} | {_f(wn.diff, '+.4f')} | {_f(wn.p, '.2g')} | {_record(record)} |"
            )
        lines.append("")
    for g in groups:
        if g is base or base is None:
            continue
        if (g.test is not None or g.paired is not None) and (len(g.bpb) < MIN_SEEDS or len(base.bpb) < MIN_SEEDS):
            lines.append(
                f"- Warning: `{g.name}` has {len(g.bpb)} seed(s) and the baseline {len(base.bpb)}: fewer than {MIN_SEEDS} per variant, "
                "too few for a test to mean anything."
            )
        if g.paired is not None and g.paired.n < MIN_SEEDS:
            lines.append(
                f"- Warning: `{g.name}` shares {g.paired.n} seed(s) with the baseline: fewer than {MIN_SEEDS} pairs, too few for the paired test to mean anything."
            )
    while lines[-1] == "":
        lines.pop()
    if is_frontier(ledger):
        lines += ["", *render_frontier(caps if caps is not None else frontier(ledger, groups))]
    lines += [
        "",
        "## Verdict",
        "",
        verdict(ledger, groups),
        "",
        "## Plots",
        "",
        "![val_bpb against artifact bytes](bpb_vs_bytes.png)",
        "",
        "![val_bpb against training FLOPs](bpb_vs_flops.png)",
        "",
        "![training loss curves](loss_curves.png)",
        "",
    ]
    return "\n".join(lines)


def verdict(ledger: Ledger, groups: list[VariantStats]) -> str:
    best = min(groups, key=lambda g: g.metrics["val_bpb"][0])
    base = next((g for g in groups if g.name == ledger.baseline), None)
    if base is None:
        return f"Lowest mean val_bpb: `{best.name}` ({_f(best.metrics['val_bpb'][0], '.4f')}); the baseline has no finished run."
    if best is base:
        runner = sorted((g for g in groups if g is not base), key=lambda g: g.metrics["val_bpb"][0])
        tail = ""
        if runner and runner[0].test is not None and _finite(runner[0].test.diff, runner[0].test.p):
            w = runner[0].test
            tail = f" The nearest variant, `{runner[0].name}`, is {w.diff:+.4f} bpb behind (p = {w.p:.2g})."
        return f"The baseline `{base.name}` has the lowest mean val_bpb ({_f(base.metrics['val_bpb'][0], '.4f')}).{tail}"
    head = f"`{best.name}` has the lowest mean val_bpb: {_f(best.metrics['val_bpb'][0], '.4f')} against the baseline's {_f(base.metrics['val_bpb'][0], '.4f')}"
    if best.test is None:
        return f"{head}, but too few seeds for a test ({len(best.bpb)} and {len(base.bpb)}; at least {MIN_SEEDS} per variant): no verdict."
    w, wn, d, dn = best.test, best.test_nats, best.paired, best.paired_nats
    numbers = [w.diff, w.p, w.ci_low, w.ci_high, wn.diff, wn.p, best.record_p] + ([d.diff, d.p, dn.diff, best.record_p_paired] if d is not None else [])
    if not _finite(*numbers):
        return f"{head}; some of its tests are not finite numbers: no verdict."
    text = f"{head}, effect {w.diff:+.4f} bpb (95% interval [{w.ci_low:+.4f}, {w.ci_high:+.4f}]), p = {w.p:.2g} (Welch)"
    if d is not None:
        text += f"; paired over {d.n} seeds {d.diff:+.4f} bpb, p = {d.p:.2g}"
    few = len(best.bpb) < MIN_SEEDS or len(base.bpb) < MIN_SEEDS
    if few:
        return (
            f"{text}: too few seeds for the test to mean anything ({len(best.bpb)} and {len(base.bpb)}; at least {MIN_SEEDS} per variant): "
            f"no verdict. In nats (val_loss_post) the effect is {wn.diff:+.4f}."
        )
    strength = "significant at p < 0.01" if w.p < SIGNIFICANCE else "not significant at p < 0.01"
    met = best.record_p < SIGNIFICANCE
    paired_rule = "" if d is None else f", paired p = {best.record_p_paired:.2g}"
    return (
        f"{text}: {strength}. In nats (val_loss_post) the effect is {wn.diff:+.4f} (p = {wn.p:.2g}); Parameter Golf's record rule "
        f"(at least {RECORD_MARGIN_NATS} nats better at p < {SIGNIFICANCE}): {'met' if met else 'not met'} "
        f"(one-sided p = {best.record_p:.2g} that it is more than {RECORD_MARGIN_NATS} nats better{paired_rule})."
    )


def write_report(ledger: Ledger, rows: list[RunRow], out: Path, command: str | None = None) -> Path:
    groups = variant_stats(ledger, rows)
    out.mkdir(parents=True, exist_ok=True)
    make_plots(groups, out, f"ledger {ledger.name}")
    caps = frontier(ledger, groups) if is_frontier(ledger) else None
    if caps is not None:
        plot_frontier(caps, out, f"ledger {ledger.name}")
    path = out / "report.md"
    path.write_text(render_markdown(ledger, groups, rows, command, caps), encoding="utf-8")
    return path

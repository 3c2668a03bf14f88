"""``loopgolf report``: a ledger's finished runs as a markdown report with significance and plots.

Per variant: mean +- std over seeds of the roundtrip val_bpb, artifact bytes, unique and
effective parameters, tokens/s and training FLOPs (3 x forward FLOPs per token x training
tokens; a progressive-recurrence run's stages each at their own depth). Each variant with at least two seeds is tested against the baseline (Welch's t-test,
two-sided; the effect is variant - baseline in bpb, negative = better). Plots (PNG): val_bpb
against artifact bytes with the Pareto frontier of the variant means, val_bpb against training
FLOPs, and every run's training loss curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from loopgolf.lab.ledger import Ledger
from loopgolf.lab.significance import Welch, mean_std, welch
from loopgolf.lab.store import RunRow
from loopgolf.rundir import RunDir

SIGNIFICANCE = 0.01  # Parameter Golf's bar for a new record


class ReportError(ValueError):
    pass


def train_flops(row: RunRow) -> float | None:
    from loopgolf.model.gpt import ModelConfig, forward_flops_per_token

    if not row.config or not row.summary:
        return None
    cfg = ModelConfig.from_dict(row.config["model"])
    seq_len, steps, tokens = int(row.config["train"]["seq_len"]), int(row.summary["steps"]), float(row.summary["train_tokens"])
    starts = list(row.summary.get("stage_steps") or [])
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


@dataclass
class VariantStats:
    name: str
    rows: list[RunRow]
    bpb: list[float] = field(init=False)
    metrics: dict[str, tuple[float, float]] = field(init=False)
    test: Welch | None = None

    def __post_init__(self) -> None:
        self.bpb = [float(r.summary["val_bpb_post"]) for r in self.rows]
        self.metrics = {"val_bpb": mean_std(self.bpb)}
        for key in ("artifact_bytes", "unique_params", "effective_params", "tokens_per_second"):
            self.metrics[key] = mean_std([float(r.summary[key]) for r in self.rows])
        flops = [train_flops(r) for r in self.rows]
        self.metrics["train_flops"] = mean_std([f for f in flops if f is not None]) if all(f is not None for f in flops) else (float("nan"), 0.0)


def variant_stats(ledger: Ledger, rows: list[RunRow]) -> list[VariantStats]:
    """Finished runs grouped by the ledger's variants (in ledger order), tested against the baseline."""
    done = [r for r in rows if r.status == "done" and r.summary is not None]
    groups = [VariantStats(v.name, [r for r in done if r.variant == v.name]) for v in ledger.variants if any(r.variant == v.name for r in done)]
    if not groups:
        raise ReportError(f"no finished runs of ledger {ledger.name!r} in the store; run `loopgolf sweep {ledger.name}` first")
    base = next((g for g in groups if g.name == ledger.baseline), None)
    for g in groups:
        if base is not None and g is not base and len(g.bpb) >= 2 and len(base.bpb) >= 2:
            g.test = welch(g.bpb, base.bpb)
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
            xs = [float(r.summary["artifact_bytes"]) if xkey == "artifact_bytes" else train_flops(r) for r in g.rows]
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


def _pm(ms: tuple[float, float], fmt: str, n: int) -> str:
    m, s = ms
    return f"{m:{fmt}} ± {s:{fmt}}" if n > 1 else f"{m:{fmt}}"  # one seed: no spread to show


def render_markdown(ledger: Ledger, groups: list[VariantStats], rows: list[RunRow], command: str | None = None) -> str:
    base = next((g for g in groups if g.name == ledger.baseline), None)
    data = sorted({str((r.summary or {}).get("data")) for r in rows if r.status == "done"})
    commits = sorted({r.git_commit[:12] for r in rows if r.status == "done" and r.git_commit})
    lines = [
        f"# Ledger `{ledger.name}`",
        "",
        ledger.description,
        "",
        f"- Report made {date.today().isoformat()} from {sum(len(g.rows) for g in groups)} finished run(s); code commit(s) {', '.join(commits) or 'unknown'}.",
        f"- Budget: {ledger.budget:g} {ledger.budget_kind} per run; cap {ledger.cap_bytes:,} bytes; baseline `{ledger.baseline}`.",
        f"- Data: {', '.join(data)}.",
    ]
    if command:
        lines.append(f"- Command: `{command}`")
    failed = [r for r in rows if r.status != "done"]
    if failed:
        lines.append(f"- Not counted: {len(failed)} run(s) not finished ({', '.join(sorted({r.status for r in failed}))}).")
    lines += ["", "## Variants", "", "| variant | preset | steps | what it is |", "|---|---|---:|---|"]
    for g in groups:
        v = ledger.variant(g.name)
        steps = sorted({int(r.summary["steps"]) for r in g.rows})
        lines.append(f"| {g.name} | `{v.preset}`{' + overrides' if v.model or v.train else ''} | {', '.join(map(str, steps))} | {v.description} |")
    lines += [
        "",
        "## Per variant (mean ± std over seeds; one seed: the value)",
        "",
        "| variant | seeds | val_bpb | artifact bytes | unique params | effective params | tokens/s | training FLOPs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for g in sorted(groups, key=lambda g: g.metrics["val_bpb"][0]):
        m, n = g.metrics, len(g.rows)
        lines.append(
            f"| {g.name}{' (baseline)' if g is base else ''} | {len(g.rows)} | {_pm(m['val_bpb'], '.4f', n)} | {_pm(m['artifact_bytes'], ',.0f', n)} | "
            f"{m['unique_params'][0]:,.0f} | {m['effective_params'][0]:,.0f} | {_pm(m['tokens_per_second'], ',.0f', n)} | {m['train_flops'][0]:.3g} |"
        )
    lines += ["", f"## Against the baseline (Welch's t-test, two-sided; effect = variant − `{ledger.baseline}`, negative is better)", ""]
    tested = [g for g in groups if g.test is not None]
    if base is None or len(base.bpb) < 2:
        lines.append(f"The baseline `{ledger.baseline}` has fewer than two finished seeds: no test is possible.")
    elif not tested:
        lines.append("No other variant has two or more finished seeds: no test is possible.")
    else:
        lines += ["| variant | seeds | effect (bpb) | 95% interval | t | df | p |", "|---|---:|---:|---:|---:|---:|---:|"]
        for g in sorted(tested, key=lambda g: g.test.p):
            w = g.test
            lines.append(
                f"| {g.name} | {len(g.bpb)} vs {len(base.bpb)} | {w.diff:+.4f} | [{w.ci_low:+.4f}, {w.ci_high:+.4f}] | {w.t:.2f} | {w.df:.1f} | {w.p:.2g} |"
            )
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
        return f"Lowest mean val_bpb: `{best.name}` ({best.metrics['val_bpb'][0]:.4f}); the baseline has no finished run."
    if best is base:
        runner = sorted((g for g in groups if g is not base), key=lambda g: g.metrics["val_bpb"][0])
        tail = ""
        if runner and runner[0].test is not None:
            w = runner[0].test
            tail = f" The nearest variant, `{runner[0].name}`, is {w.diff:+.4f} bpb behind (p = {w.p:.2g})."
        return f"The baseline `{base.name}` has the lowest mean val_bpb ({base.metrics['val_bpb'][0]:.4f}).{tail}"
    if best.test is None:
        return (
            f"`{best.name}` has the lowest mean val_bpb ({best.metrics['val_bpb'][0]:.4f} against the baseline's "
            f"{base.metrics['val_bpb'][0]:.4f}) but too few seeds for a test."
        )
    w = best.test
    strength = "significant at p < 0.01" if w.p < SIGNIFICANCE else "not significant at p < 0.01"
    return (
        f"`{best.name}` has the lowest mean val_bpb: {best.metrics['val_bpb'][0]:.4f} against the baseline's "
        f"{base.metrics['val_bpb'][0]:.4f}, effect {w.diff:+.4f} bpb (95% interval [{w.ci_low:+.4f}, {w.ci_high:+.4f}]), p = {w.p:.2g}: {strength}."
    )


def write_report(ledger: Ledger, rows: list[RunRow], out: Path, command: str | None = None) -> Path:
    groups = variant_stats(ledger, rows)
    out.mkdir(parents=True, exist_ok=True)
    make_plots(groups, out, f"ledger {ledger.name}")
    path = out / "report.md"
    path.write_text(render_markdown(ledger, groups, rows, command), encoding="utf-8")
    return path

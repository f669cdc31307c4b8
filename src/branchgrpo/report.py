"""``report.md`` of a run directory, with PNG plots from ``metrics.jsonl``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .evaluate import grid_alert_level
from .log import read_metrics, split_evals


@contextmanager
def line_figure(path: Path, xlabel: str, title: str, size: tuple[float, float] = (6, 3.6),
                legend_size: int = 8, legend_cols: int = 1) -> Iterator[Any]:
    """Axes to draw lines on; on exit labelled, gridded, legended and saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        _decorate(ax, xlabel, title, legend_size, legend_cols)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _decorate(ax: Any, xlabel: str, title: str, legend_size: int = 8,
              legend_cols: int = 1) -> None:
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, ncol=legend_cols)


def _lines(ax: Any, series: list[tuple[str, list, list]]) -> None:
    """One line per non-empty (label, x, y), with markers when there are few points."""
    for label, x, y in series:
        if x:
            ax.plot(x, y, marker="o" if len(x) < 20 else None, ms=3, label=label)


def _plot(path: Path, series: list[tuple[str, list, list]], xlabel: str, title: str) -> None:
    with line_figure(path, xlabel, title) as ax:
        _lines(ax, series)


def smooth(y: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (the first values average what exists)."""
    out, total = [], 0.0
    for i, v in enumerate(y):
        total += v - (y[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _plot_smoothed(path: Path, series: list[tuple[str, list, list]], xlabel: str,
                   title: str) -> None:
    """Each series raw (thin, faint) with its trailing mean over ~10% of the points (bold)."""
    with line_figure(path, xlabel, title) as ax:
        for label, x, y in series:
            if not x:
                continue
            w = max(3, len(y) // 10)
            (line,) = ax.plot(x, y, lw=0.8, alpha=0.35)
            ax.plot(x, smooth(y, w), lw=2, color=line.get_color(),
                    label=f"{label} (mean of {w})")


Panel = tuple[str, list[tuple[str, list, list]]]
"""(title, [(label, x, y), ...]): one axis of `_plot_panels`."""


def _plot_panels(path: Path, panels: list[Panel], xlabel: str,
                 hlines: dict[int, tuple[float, str]] | None = None) -> None:
    """One row of line panels sharing the x axis, e.g. held-out scores beside the monitors;
    ``hlines`` {panel index: (y, label)} draws a dashed reference line on a panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    try:
        for i, (ax, (title, series)) in enumerate(zip(axes[0], panels, strict=True)):
            _lines(ax, series)
            if hlines and i in hlines:
                ax.axhline(hlines[i][0], color="grey", ls="--", lw=1, label=hlines[i][1])
            _decorate(ax, xlabel, title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _col(rows: list[dict], key: str, x: str = "iteration") -> tuple[list, list]:
    pts = [(r[x], r[key]) for r in rows if key in r and x in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_report(run_dir: Path) -> Path:
    """Plots (reward per iteration and per second, held-out scores, monitors, phase times)
    and a Markdown summary with before/after numbers and sample grids."""
    run_dir = Path(run_dir)
    train, evals = split_evals(read_metrics(run_dir))
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    rkeys = sorted({k for r in train for k in r if k.startswith("reward/") and "zero" not in k})
    _plot_smoothed(plots / "reward_per_iteration.png", [(k, *_col(train, k)) for k in rkeys],
                   "iteration", "training reward (rollout leaves): raw and smoothed")
    _plot(plots / "reward_per_second.png",
          [(k, *_col(train, k, "time/elapsed")) for k in rkeys],
          "training seconds (evaluation excluded)", "training reward vs time")
    ekeys = sorted({k for r in evals for k in r if k.startswith("eval/") and k != "eval/tag"
                    and isinstance(r[k], float)})
    small = ("eval/grid", "eval/brightness")  # near 0: on their own axis, not saturation's
    grid0 = next((r["eval/grid"] for r in evals if "eval/grid" in r), None)
    _plot_panels(plots / "heldout.png", [
        ("held-out scores (ODE samples, fixed noise)",
         [(k, *_col(evals, k)) for k in ekeys if k not in (*small, "eval/saturation")]),
        ("held-out grid and brightness (same samples)", [(k, *_col(evals, k)) for k in small]),
        ("held-out saturation", [("eval/saturation", *_col(evals, "eval/saturation"))])],
        "iteration", {1: (grid_alert_level(grid0), "grid: train warns above")}
        if grid0 is not None else None)
    _plot_panels(plots / "monitors.png", [
        ("training monitors: grid, brightness, diversity",
         [(k, *_col(train, f"monitor/{k}")) for k in ("grid", "brightness", "diversity")]),
        ("training monitor: saturation", [("saturation", *_col(train, "monitor/saturation"))])],
        "iteration")
    tkeys = sorted({k for r in train for k in r if k.startswith("time/")
                    and k not in ("time/elapsed",)})
    _plot(plots / "phase_times.png", [(k, *_col(train, k)) for k in tkeys], "iteration",
          "seconds per phase")
    lines = [f"# Run report: `{run_dir.name}`", ""]
    before = next((r for r in evals if r["eval/tag"] == "before"), None)
    after = next((r for r in reversed(evals) if r["eval/tag"] == "after"), None)
    if before and after:
        lines += ["## Held-out scores (before -> after)", "",
                  "| metric | before | after | change |", "|---|---|---|---|"]
        for k in sorted(k for k in before if k.startswith("eval/") and k != "eval/tag"):
            b, a = before[k], after.get(k, float("nan"))
            rel = f"{(a - b) / abs(b) * 100:+.1f}%" if b else "n/a"
            lines.append(f"| {k[5:]} | {b:.4f} | {a:.4f} | {rel} |")
        lines.append("")
    if train:
        last = train[-1]
        per_it = sum(r["time/iteration"] for r in train) / len(train)
        lines += [f"Iterations: {last['iteration']}, training time "
                  f"{last.get('time/elapsed', 0):.0f} s, mean {per_it:.2f} s per iteration.", ""]
    for name, title in [("reward_per_iteration", "Training reward per iteration"),
                        ("reward_per_second", "Training reward per training second"),
                        ("heldout", "Held-out judge, rewards and monitors"),
                        ("monitors", "Reward-hacking monitors"),
                        ("phase_times", "Time per phase")]:
        lines += [f"## {title}", "", f"![{name}](plots/{name}.png)", ""]
    for tag in ("before", "after"):
        if (run_dir / "samples" / f"{tag}.png").exists():
            lines += [f"## Samples {tag} training (held-out prompts)", "",
                      f"![{tag}](samples/{tag}.png)", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out

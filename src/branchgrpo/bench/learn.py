"""``branchgrpo bench learn``: learning curves of every method on the embedded default.

Each (method, seed) trains in this process for the same budget of *training* seconds
(``train.time_budget``; evaluation is off the clock, and so is the one-off pretraining of the
tiny base model and judge, which happens in set-up and is cached in ``model.cache_dir``).
Held-out evaluations every ``eval_every_seconds`` training seconds (``log.eval_every_seconds``)
put every method's curve on a comparable time axis, whatever its cost per iteration.

Per method: mean and min-max band over seeds of the held-out judge against training seconds
and against iterations (each seed linearly interpolated onto a common grid that stops at the
shortest seed, so nothing is extrapolated); a table of final scores and the time to reach a
target judge score. Outputs: ``learn.md``, ``learn.json``, ``learn_time.png``,
``learn_iterations.png`` and one run directory per (method, seed) under ``runs/``.

Caveats: each method evaluates with its own sampling schedule (its ``num_steps``, e.g. 11 for
mix_flash, 25 for mix), so "judge before" differs by method; compare changes as well as levels.
``train.iterations`` is set very high so that the budget stops every run; schedules that depend
on it (``train.lr_schedule`` linear/cosine, ``selection.until`` < 1) are then stretched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError
from .common import machine
from .iteration import DEFAULT_METHODS as ITERATION_METHODS

DEFAULT_METHODS = tuple(m for m in ITERATION_METHODS if m != "branch_width")
DEFAULT_BUDGET_S = 100.0  # 9 methods x 3 seeds: about an hour with evaluations, 2 cores
TARGET_FACTOR = 1.2  # default target: this times the mean held-out judge before training
MAX_ITERATIONS = 1_000_000  # "until the budget is spent"
QUICK = {"methods": ("dance", "branch"), "seeds": 1, "budget_s": 5.0,
         "overrides": ("model.pretrain_steps=5", "data.eval_samples=4")}
GRID_POINTS = 60
OUTPUTS = ("learn.md", "learn.json", "learn_time.png", "learn_iterations.png")


@dataclass
class Run:
    """One (method, seed) training run and its held-out evaluations."""

    method: str
    seed: int
    run_dir: str
    evals: list[dict[str, float]] = field(default_factory=list)  # iteration time judge strict grid
    iterations: int = 0
    train_s: float = 0.0
    wall_s: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and len(self.evals) >= 2


def run_overrides(method: str, seed: int, budget_s: float, eval_every_s: float, run_dir: Path,
                  overrides: Sequence[str]) -> list[str]:
    """The overrides of one run: bench settings first, the user's last (they win)."""
    return [f"rollout.method={method}", f"train.seed={seed}", f"train.time_budget={budget_s}",
            f"train.iterations={MAX_ITERATIONS}", f"log.eval_every_seconds={eval_every_s}",
            "log.eval_every=0", f"log.checkpoint_every={MAX_ITERATIONS}", "log.keep_last=1",
            "log.tensorboard=false", "log.progress=false", f"log.run_dir={run_dir}",
            *overrides]


def read_run(run: Run) -> None:
    """Fill ``run`` from its ``metrics.jsonl``: eval points, iterations and training seconds."""
    from ..log import read_metrics, split_evals

    train, evals = split_evals(read_metrics(Path(run.run_dir)))
    run.evals = [{"iteration": r["iteration"], "time": r.get("time/elapsed", 0.0),
                  "judge": r["eval/judge"], "strict": r.get("eval/judge_strict", math.nan),
                  "grid": r.get("eval/grid", math.nan)}
                 for r in evals if "eval/judge" in r]
    if train:
        run.iterations, run.train_s = train[-1]["iteration"], train[-1]["time/elapsed"]


def train_one(method: str, seed: int, budget_s: float, eval_every_s: float, out_dir: Path,
              overrides: Sequence[str]) -> Run:
    """Train one (method, seed) in this process; a failure is recorded, not raised. The run's
    stdout and stderr go to ``<run_dir>/train.log``."""
    from ..config import load_config
    from ..train import train

    run_dir = out_dir / "runs" / f"{method}-s{seed}"
    run = Run(method, seed, str(run_dir))
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl appends: a stale run would mix in
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            cfg = load_config(None, run_overrides(method, seed, budget_s, eval_every_s,
                                                  run_dir, overrides))
            train(cfg)
        except Exception as e:  # noqa: BLE001 - one run's failure must not lose the others
            traceback.print_exc()
            run.error = f"{type(e).__name__}: {e}"
    run.wall_s = time.perf_counter() - t0
    read_run(run)
    if run.error is None and len(run.evals) < 2:
        run.error = "no before/after held-out judge in metrics.jsonl (reward.judge='' ?)"
    return run


def check_configs(methods: Sequence[str], seeds: Sequence[int], overrides: Sequence[str]) -> None:
    """Load every run's config up front: a bad override fails before any training."""
    from ..config import load_config

    for m in methods:
        load_config(None, run_overrides(m, seeds[0], 1.0, 0.0, Path("unused"), overrides))


# ----------------------------------------------------------------------------- aggregation
def _std(x: Sequence[float]) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def crossing(evals: list[dict[str, float]], target: float, x: str) -> float | None:
    """First ``x`` (time or iteration) where the judge reaches ``target``, linearly
    interpolated between the two evaluations around the crossing; None if never."""
    prev = None
    for e in evals:
        if e["judge"] >= target:
            if prev is None:
                return e[x]
            frac = (target - prev["judge"]) / (e["judge"] - prev["judge"])
            return prev[x] + frac * (e[x] - prev[x])
        prev = e
    return None


def curve(runs: list[Run], x: str) -> dict[str, list[float]]:
    """Judge over seeds on a common grid of ``x`` (0 .. the shortest seed's last eval)."""
    end = min(r.evals[-1][x] for r in runs)
    grid = np.linspace(0.0, end, GRID_POINTS) if end > 0 else np.zeros(1)
    ys = np.stack([np.interp(grid, [e[x] for e in r.evals], [e["judge"] for e in r.evals])
                   for r in runs])
    return {x: grid.round(4).tolist(), "mean": ys.mean(0).round(5).tolist(),
            "min": ys.min(0).round(5).tolist(), "max": ys.max(0).round(5).tolist()}


def default_target(runs: list[Run]) -> float:
    """``TARGET_FACTOR`` x the mean held-out judge before training over every finished run."""
    before = [r.evals[0]["judge"] for r in runs if r.ok]
    return TARGET_FACTOR * float(np.mean(before)) if before else math.nan


def method_row(method: str, runs: list[Run], target: float) -> dict[str, Any]:
    """One table row: iterations, s/iteration, judge before/final, strict, the token-grid
    monitor before/final (`evaluate.grid_energy`: a judge can rise while the grid grows),
    time to target."""
    ok = [r for r in runs if r.ok]
    row: dict[str, Any] = {"method": method, "seeds_ok": len(ok), "seeds": len(runs)}
    if not ok:
        return row
    before = [r.evals[0]["judge"] for r in ok]
    final = [r.evals[-1]["judge"] for r in ok]
    strict = [r.evals[-1]["strict"] for r in ok]
    hits = [c for c in (crossing(r.evals, target, "time") for r in ok) if c is not None]
    hits_it = [c for c in (crossing(r.evals, target, "iteration") for r in ok) if c is not None]
    row |= {"iterations": float(np.mean([r.iterations for r in ok])),
            "s_per_iteration": float(np.mean([r.train_s / max(r.iterations, 1) for r in ok])),
            "train_s": float(np.mean([r.train_s for r in ok])),
            "judge_before": float(np.mean(before)), "judge_final": float(np.mean(final)),
            "judge_final_std": _std(final), "strict_final": float(np.mean(strict)),
            "strict_final_std": _std(strict),
            "grid_before": float(np.mean([r.evals[0]["grid"] for r in ok])),
            "grid_final": float(np.mean([r.evals[-1]["grid"] for r in ok])),
            "relative_change": float(np.mean(final) / np.mean(before) - 1),
            "time_to_target_s": float(np.mean(hits)) if hits else None,
            "iterations_to_target": float(np.mean(hits_it)) if hits_it else None,
            "reached_target": len(hits)}
    return row


def summarise(runs: list[Run], methods: Sequence[str], target: float | None) -> dict[str, Any]:
    """Rows and curves per method (methods without a finished run get a row, no curve)."""
    tgt = default_target(runs) if target is None else target
    by = {m: [r for r in runs if r.method == m] for m in methods}
    curves = {m: {x: curve([r for r in rs if r.ok], x) for x in ("time", "iteration")}
              for m, rs in by.items() if any(r.ok for r in rs)}
    return {"target": tgt, "target_rule": (f"{TARGET_FACTOR} x mean judge before training"
                                           if target is None else "given (--target)"),
            "rows": [method_row(m, rs, tgt) for m, rs in by.items()], "curves": curves}


# ----------------------------------------------------------------------------- outputs
def plot(path: Path, curves: dict[str, dict], x: str, xlabel: str, target: float) -> None:
    """Mean judge per method against ``x`` with a min-max band over seeds."""
    from ..report import line_figure

    with line_figure(path, xlabel, "held-out judge (mean over seeds, band: min-max)",
                     size=(7, 4.2), legend_size=7, legend_cols=2) as ax:
        for m, c in curves.items():
            d = c[x]
            (line,) = ax.plot(d[x], d["mean"], label=m, lw=1.5)
            ax.fill_between(d[x], d["min"], d["max"], color=line.get_color(), alpha=0.15, lw=0)
        if math.isfinite(target):
            ax.axhline(target, color="k", ls="--", lw=0.8, label=f"target {target:.3f}")
        ax.set_ylabel("held-out judge")


def _pm(row: dict, key: str) -> str:
    return f"{row[key]:.4f} ± {row[key + '_std']:.4f}"


def table(rows: list[dict[str, Any]], target: float) -> list[str]:
    """The Markdown table of final scores and time to target."""
    out = ["| method | iterations | s/iteration | judge before | judge final (± std) | "
           f"strict final (± std) | change | grid before → final | time to {target:.3f} (s) | "
           "iterations to it | seeds reaching it |", "|---" * 11 + "|"]
    for r in rows:
        if "judge_final" not in r:
            out.append(f"| {r['method']} | failed ({r['seeds'] - r['seeds_ok']} of "
                       f"{r['seeds']} seeds) |" + " |" * 9)
            continue
        tt = "—" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f}"
        ti = "—" if r["iterations_to_target"] is None else f"{r['iterations_to_target']:.1f}"
        out.append(f"| {r['method']} | {r['iterations']:.1f} | {r['s_per_iteration']:.2f} | "
                   f"{r['judge_before']:.4f} | {_pm(r, 'judge_final')} | "
                   f"{_pm(r, 'strict_final')} | {r['relative_change'] * 100:+.1f}% | "
                   f"{r['grid_before']:.3f} → {r['grid_final']:.3f} | {tt} | "
                   f"{ti} | {r['reached_target']}/{r['seeds_ok']} |")
    return out


def write_outputs(out_dir: Path, runs: list[Run], summary: dict[str, Any],
                  info: dict[str, Any]) -> None:
    """``learn.json``, ``learn.md`` and the two plots."""
    t = summary["target"]
    plot(out_dir / "learn_time.png", summary["curves"], "time", "training seconds "
         "(evaluation excluded)", t)
    plot(out_dir / "learn_iterations.png", summary["curves"], "iteration", "iteration", t)
    (out_dir / "learn.json").write_text(json.dumps(
        {**info, **summary, "runs": [asdict(r) for r in runs]}, indent=1))
    failed = [r for r in runs if not r.ok]
    m = info["machine"]
    lines = ["# bench learn: held-out judge vs training time, every method", "",
             f"Command: `{info['command']}`", "",
             f"Machine: {m['cpu']} ({m['cpu_count']} cores), {m['platform']}, Python "
             f"{m['python']}, torch {m['torch']} with {m['torch_threads']} threads "
             f"(OMP_NUM_THREADS={m['OMP_NUM_THREADS']}), GPU: {m['gpu']}.", "",
             f"Budget {info['budget_s']:g} training seconds per run (evaluation and "
             f"pretraining excluded; the iteration that crosses the budget finishes), "
             f"seeds {info['seeds']}, held-out evaluation every {info['eval_every_s']:g} "
             f"training seconds; overrides: `{' '.join(info['overrides']) or 'none'}`. "
             f"Bench wall time {info['wall_s'] / 60:.1f} min.", "",
             f"Target judge {t:.4f} ({summary['target_rule']}). Time to target: mean over the "
             "seeds that reached it, interpolated between evaluations. Final = the `after` "
             "evaluation; ± is the std over seeds; change = final / before - 1 of the means. "
             "Each method samples held-out images with its own schedule, so `judge before` "
             "differs by method.", "", *table(summary["rows"], t), "",
             "## Held-out judge vs training seconds", "", "![time](learn_time.png)", "",
             "## Held-out judge vs iterations", "", "![iterations](learn_iterations.png)", ""]
    if failed:
        lines += ["## Failed runs", ""] + [f"- {r.method} seed {r.seed}: {r.error} "
                                           f"(log: `{r.run_dir}/train.log`)" for r in failed]
    (out_dir / "learn.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- entry point
def learn(methods: Sequence[str], seeds: Sequence[int], budget_s: float,
          overrides: Sequence[str], out_dir: Path, eval_every_seconds: float | None = None,
          target: float | None = None, progress: bool = True,
          command: str = "") -> dict[str, Any]:
    """Train every (method, seed) for ``budget_s`` training seconds and write the report.

    ``eval_every_seconds`` None: a fifth of the budget. ``target`` None: ``TARGET_FACTOR`` x
    the mean judge before training. Raises ConfigError (before training anything) when an
    override does not fit a method. Returns what ``learn.json`` holds."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    every = budget_s / 5 if eval_every_seconds is None else eval_every_seconds
    check_configs(methods, seeds, overrides)
    info = {"command": command, "machine": machine(), "methods": list(methods),
            "seeds": list(seeds), "budget_s": budget_s, "eval_every_s": every,
            "overrides": list(overrides), "wall_s": 0.0}
    jobs = [(m, s) for s in seeds for m in methods]  # seed-major: early stop keeps all methods
    if progress:
        print(f"bench learn: {len(jobs)} runs x {budget_s:g} s of training -> {out_dir}",
              flush=True)
    runs: list[Run] = []
    t0 = time.perf_counter()
    for k, (m, s) in enumerate(jobs, 1):
        run = train_one(m, s, budget_s, every, out_dir, overrides)
        runs.append(run)
        if progress:
            print(f"[{k}/{len(jobs)}] {_describe(run)}", flush=True)
        info["wall_s"] = time.perf_counter() - t0
        summary = summarise(runs, [x for x in methods if any(r.method == x for r in runs)],
                            target)
        write_outputs(out_dir, runs, summary, info)
    return {**info, **summary, "runs": [asdict(r) for r in runs]}


def _describe(run: Run) -> str:
    head = f"{run.method} seed {run.seed}"
    if not run.ok:
        return f"{head}: FAILED {run.error} (log: {run.run_dir}/train.log)"
    b, a = run.evals[0], run.evals[-1]
    return (f"{head}: {run.iterations} it in {run.train_s:.0f} s ({run.wall_s:.0f} s wall), "
            f"judge {b['judge']:.4f} -> {a['judge']:.4f}, strict {a['strict']:.3f}")


def check_pipeline(result: dict[str, Any], out_dir: Path) -> list[str]:
    """What ``--quick`` asserts: every run finished with finite judges and >= 1 iteration,
    and the outputs exist. Returns the problems (empty: the pipeline works)."""
    problems = [f"{r['method']} seed {r['seed']}: {r['error']}" for r in result["runs"]
                if r["error"]]
    problems += [f"{f} was not written" for f in OUTPUTS if not (Path(out_dir) / f).is_file()]
    for row in result["rows"]:
        vals = [row.get(k) for k in ("judge_before", "judge_final", "strict_final")]
        if not all(isinstance(v, float) and math.isfinite(v) for v in vals):
            problems.append(f"{row['method']}: non-finite or missing judge {vals}")
        if row.get("iterations", 0) < 1:
            problems.append(f"{row['method']}: no training iteration")
    return problems


def command(args: argparse.Namespace) -> int:
    """``branchgrpo bench learn``."""
    q = args.quick
    methods = args.methods.split(",") if args.methods else list(
        QUICK["methods"] if q else DEFAULT_METHODS)
    seeds = list(range(args.seeds if args.seeds is not None else QUICK["seeds"] if q else 3))
    budget = args.budget if args.budget is not None else (
        QUICK["budget_s"] if q else DEFAULT_BUDGET_S)
    overrides = [*(QUICK["overrides"] if q else ()), *args.overrides]
    every = args.eval_every if args.eval_every is not None else (budget / 2 if q else None)
    bad = [o for o in overrides if "=" not in o]
    if bad or not seeds or budget <= 0:
        print(f"error: overrides look like key.sub=value (got {bad}), --seeds >= 1, "
              "--budget > 0", file=sys.stderr)
        return 2
    cmd = ["branchgrpo", "bench", "learn", "--methods", ",".join(methods), "--seeds",
           str(len(seeds)), "--budget", f"{budget:g}", "--out", str(args.out)]
    cmd += ["--eval-every", f"{every:g}"] if every is not None else []
    cmd += ["--target", f"{args.target:g}"] if args.target is not None else []
    try:
        result = learn(methods, seeds, budget, overrides, Path(args.out), every, args.target,
                       progress=True, command=shlex.join([*cmd, *overrides]))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    failed = [r for r in result["runs"] if r["error"]]
    print(f"report: {Path(args.out) / 'learn.md'}" + (f" ({len(failed)} of "
          f"{len(result['runs'])} runs failed)" if failed else ""))
    problems = check_pipeline(result, Path(args.out)) if q else []
    for p in problems:
        print(f"quick check failed: {p}", file=sys.stderr)
    return 1 if problems or len(failed) == len(result["runs"]) else 0

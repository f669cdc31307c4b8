"""``branchgrpo bench iteration``: every method on the same policy, prompts and hardware, in
one process: rollout forwards, trained edges, wall time of rollout, reward and update, and
each ratio to the baseline (DanceGRPO).

The iteration timed is `branchgrpo.train.iteration` itself, on a `branchgrpo.train.assemble`d
state of the method's resolved config (``rollout.method=<method>`` over the embedded default or
the FLUX.1-dev schedule, one optimizer step per rollout): the phases are the ``time/<phase>``
metrics ``branchgrpo train`` logs, so the bench measures the code a training run runs. Columns:
``rollout_s`` = ``time/rollout`` (prompt encoding + tree rollout), ``reward_s`` =
``time/decode`` + ``time/reward``, ``update_s`` = ``time/advantage`` + ``time/select`` +
``time/update``. Every method runs once untimed first (warm-up), then ``repeats`` timed runs;
the best is kept.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import Config, load_config
from ..engine.policy import Policy
from ..rewards import RewardSet
from ..train import assemble, iteration
from .common import bench_policy, machine, markdown

DEFAULT_METHODS = ("dance_full", "dance", "flow_grpo", "mix", "mix_flash", "g2rpo", "branch",
                   "branch_width", "branch_depth", "branch_mix", "branch_mix_flash",
                   "branch_sibling")
PHASES = {"rollout_s": ("rollout",), "reward_s": ("decode", "reward"),
          "update_s": ("advantage", "select", "update")}


@dataclass
class IterationTiming:
    method: str
    forwards: int
    trained_edges: int
    rollout_s: float
    reward_s: float
    update_s: float

    @property
    def total_s(self) -> float:
        return self.rollout_s + self.reward_s + self.update_s


def timing(method: str, metrics: dict[str, float]) -> IterationTiming:
    """The bench's columns from the metrics of one `branchgrpo.train.iteration`."""
    sec = {col: sum(metrics[f"time/{p}"] for p in phases) for col, phases in PHASES.items()}
    return IterationTiming(method, int(metrics["tree/forwards"]),
                           int(metrics["tree/trained_edges"]), **sec)


def method_config(method: str, prompts: int, overrides: Sequence[str] = ()) -> Config:
    """The config a method's bench iteration runs: the embedded default (or ``overrides``)
    with ``rollout.method=<method>``, ``prompts`` trees and one optimizer step per rollout,
    without a KL reference unless ``overrides`` set one (the methods publish none; the tiny
    family's anchor would add a reference forward per trained edge to every row)."""
    return load_config(None, ["train.kl_coef=0", *overrides, f"rollout.method={method}",
                              f"train.prompts_per_iteration={prompts}",
                              "train.updates_per_rollout=1"])


def iteration_table(policy: Policy, prompts: Sequence[str], reward: Callable | None = None, *,
                    methods: Sequence[str] = DEFAULT_METHODS, baseline: str = "dance_full",
                    overrides: Sequence[str] = (), repeats: int = 1, max_batch: int = 64,
                    edge_chunk: int = 64, per_sample_baseline: bool = True,
                    progress: bool = True) -> list[dict]:
    """Rows per method (best of ``repeats`` after a warm-up) with ratios to ``baseline``.

    ``reward`` (media, prompts) -> scores replaces the config's rewards, under their names
    (None: keep them).
    ``per_sample_baseline`` adds the baseline run the way the published DanceGRPO and
    BranchGRPO code runs it, one sample per forward and one edge per backward
    (docs/algorithms.md §2.1, §5.1), as a last row ``<baseline> (batch 1)``, and every row's
    ``ratio_batch1`` to it."""
    from tqdm import tqdm

    device = next(iter(policy.encode(list(prompts[:1])).values())).device
    run_dir = Path(tempfile.gettempdir())  # a state's logger is off: nothing is written there

    def best(name: str, warm_up: bool, mb: int, chunk: int) -> IterationTiming:
        """The fastest of ``repeats`` timed iterations of ``name`` (after one untimed)."""
        cfg = method_config(name, len(prompts), [*overrides, f"rollout.max_batch={mb}",
                                                 f"train.edge_chunk={chunk}"])
        s = assemble(cfg, policy, device, (list(prompts), list(prompts)), run_dir)
        if reward is not None:
            w = dict(cfg.reward.weights)
            s.rewards = RewardSet(w, rewards=dict.fromkeys(w, reward))
        if hasattr(policy, "family"):  # a diffusers family: the method's timestep rule
            policy.family.quantize_timestep = s.spec.quantize_timestep
        if warm_up:
            iteration(s)
        return min((timing(name, iteration(s)) for _ in range(repeats)),
                   key=lambda r: r.total_s)

    results = {name: best(name, True, max_batch, edge_chunk)
               for name in tqdm(methods, desc="bench iteration", disable=not progress)}
    if per_sample_baseline and baseline in results:  # the model is warm by now
        results[f"{baseline} (batch 1)"] = best(baseline, False, 1, 1)
    return rows_of(results, baseline)


def rows_of(results: dict[str, IterationTiming], baseline: str) -> list[dict]:
    """Table rows, with ratios to ``baseline`` and to its batch-1 row where present."""
    base = results.get(baseline)
    slow = results.get(f"{baseline} (batch 1)")
    rows = []
    for name, r in results.items():
        row = {"method": name, "forwards": r.forwards, "trained_edges": r.trained_edges,
               "rollout_s": round(r.rollout_s, 3), "reward_s": round(r.reward_s, 3),
               "update_s": round(r.update_s, 3), "total_s": round(r.total_s, 3)}
        if base is not None:
            row["ratio_total"] = round(r.total_s / base.total_s, 3)
            row["ratio_rollout"] = round(r.rollout_s / base.rollout_s, 3)
        if slow is not None:
            row["ratio_batch1"] = round(r.total_s / slow.total_s, 3)
        rows.append(row)
    return rows


def with_compiled(eager: list[dict], compiled: list[dict]) -> list[dict]:
    """``eager`` rows with each method's compiled ``total_s`` (``compiled_total_s``) and
    ``speedup_compiled`` = eager / compiled (above 1: compiling pays); rows without a compiled
    run (the batch-1 baseline) get empty cells."""
    by = {r["method"]: r["total_s"] for r in compiled}
    return [{**r, "compiled_total_s": by.get(r["method"], ""),
             "speedup_compiled": (round(r["total_s"] / by[r["method"]], 3)
                                  if r["method"] in by else "")} for r in eager]


def flux_dev_overrides(policy: Any) -> list[str]:
    """The config of FLUX.1-dev at the bench's size (the family's documented schedule), bf16
    storage and autocast."""
    from ..models.flux import FLUX_DEV

    return ["model.kind=flux", f"model.path={FLUX_DEV}", f"model.height={policy.family.height}",
            f"model.width={policy.family.width}", "model.storage_dtype=bf16", "train.amp=bf16"]


def command(args: argparse.Namespace) -> int:
    """``branchgrpo bench iteration``."""
    device = torch.device(args.device)
    policy, _, prompts = bench_policy(args.model, args.prompts, device)
    if args.model == "flux-dev":
        overrides = flux_dev_overrides(policy)
        reward: Callable | None = lambda media, p: media.float().flatten(1).mean(1)  # noqa: E731
    else:
        overrides, reward = [], None  # the embedded default's own reward (shapes)
    kw = dict(methods=args.methods or DEFAULT_METHODS, overrides=overrides,
              repeats=args.repeats, max_batch=args.max_batch, edge_chunk=args.edge_chunk)
    rows = iteration_table(policy, prompts, reward, per_sample_baseline=not args.no_batch1,
                           **kw)
    if args.compile:
        from ..models.factory import ModelOptions, speed_up

        speed_up(policy, ModelOptions(compile=True))
        rows = with_compiled(rows, iteration_table(policy, prompts, reward,
                                                   per_sample_baseline=False, **kw))
    info = {"device": device.type, "model": args.model, "prompts": args.prompts,
            "machine": machine()}
    print(json.dumps({**info, "rows": rows}, indent=2) if args.json else
          f"{json.dumps(info)}\n\n" + markdown(rows))
    return 0

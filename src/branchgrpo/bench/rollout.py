"""``branchgrpo bench rollout``: the batched tree engine against per-node evaluation (batch 1,
as the published BranchGRPO) and the sequential DanceGRPO rollout, in wall time per tree."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..engine.plans import build_plan
from ..engine.tree import chain_plan, rollout
from .common import bench_policy, markdown


@dataclass
class Timing:
    name: str
    seconds: float
    forwards: int


def _best_of(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    best, fw = float("inf"), 0
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fw = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, fw


def rollout_timings(policy, cond, *, trees: int, max_batch: int = 256, repeats: int = 3,
                    seed: int = 0, storage_dtype: torch.dtype = torch.float32,
                    branch_kw: dict | None = None, dance_kw: dict | None = None) -> list[Timing]:
    """Wall time per BranchGRPO tree: batched frontier vs per-node (batch 1, as the published
    BranchGRPO), and the sequential DanceGRPO rollout (each sample alone, batch 1) on the same
    policy. ``cond`` has one row per tree. The best of ``repeats`` runs after one warm-up."""
    bplan = build_plan("branch", **(branch_kw or {}))
    dplan = build_plan("dance", **(dance_kw or {}))
    gen = lambda: torch.Generator(device=next(iter(cond.values())).device).manual_seed(seed)  # noqa: E731

    def run(plan, mb: int) -> int:
        return rollout(policy, cond, plan, generator=gen(), max_batch=mb,
                       storage_dtype=storage_dtype).forwards

    def sequential_dance() -> int:
        # DanceGRPO generates one sample at a time: G chains of T forwards at batch 1 per tree
        chain = chain_plan("sequential", dplan.sigmas, [1] * dplan.num_steps,
                           ["sde"] * dplan.num_steps, kernel=dplan.kernel, level=dplan.level)
        fw = 0
        for row in range(trees):
            one = {k: v[row:row + 1] for k, v in cond.items()}
            for _ in range(dplan.info["group_size"]):
                fw += rollout(policy, one, chain, generator=gen(), max_batch=1,
                              storage_dtype=storage_dtype).forwards
        return fw

    run(bplan, max_batch)  # warm-up
    out = []
    for name, fn in [("branch_batched", lambda: run(bplan, max_batch)),
                     ("branch_per_node", lambda: run(bplan, 1)),
                     ("dance_batched", lambda: run(dplan, max_batch)),
                     ("dance_sequential", sequential_dance)]:
        sec, fw = _best_of(fn, repeats)
        out.append(Timing(name, sec / trees, fw // trees))
    return out


def command(args: argparse.Namespace) -> int:
    """``branchgrpo bench rollout``."""
    device = torch.device(args.device)
    policy, cond, _ = bench_policy(args.model, args.trees, device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.storage_dtype]
    t = rollout_timings(policy, cond, trees=args.trees, max_batch=args.max_batch,
                        repeats=args.repeats, storage_dtype=dtype)
    base = {x.name: x.seconds for x in t}
    rows = [{"rollout": x.name, "forwards_per_tree": x.forwards,
             "seconds_per_tree": round(x.seconds, 5),
             "ratio_vs_branch_per_node": round(x.seconds / base["branch_per_node"], 4),
             "ratio_vs_dance_sequential": round(x.seconds / base["dance_sequential"], 4)}
            for x in t]
    print(json.dumps({"device": str(device), "model": args.model, "trees": args.trees,
                      "rows": rows}, indent=2) if args.json else markdown(rows))
    return 0

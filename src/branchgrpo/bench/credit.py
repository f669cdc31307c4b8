"""``branchgrpo bench credit``: how much of the advantage a method gives each trained edge its
own action earned (the G2RPO paper's "cleaner credit" claim, docs/algorithms.md §6.1, measured).

For a trained edge e = (u -> v) at grid step t, the *true* advantage of its action is

    A*(e) = V(v) - V(u),   V(x) = E[reward | the method's sampler continues from x],

the change in expected reward that this one stochastic step caused. V is estimated by K
independent continuations from the stored node, each following the single path the method's
own plan takes from there (`continuation`): the SDE fork wherever the node has one (the action
the method trains), else its first fork. Deterministic continuations (ODE tails) run once.

Per method, over all trained edges of one rollout batch:
  * ``corr``: Pearson correlation of the method's advantage A(e) with A*(e), with A* divided by
    the reward std of the edge's tree (scale-free across prompts);
  * ``reliability``: split-half correlation of A* from two halves of the K continuations,
    Spearman-Brown corrected to K; ``corr_corrected`` = corr / sqrt(reliability), the
    correlation with the exact A* (disattenuation; Monte-Carlo noise only lowers ``corr``);
  * per grid step, the same correlation (``by_step``).

A method whose advantage is the final reward of the trajectory (DanceGRPO, Flow-GRPO) gives
every step the reward deviation that all T steps caused together, so each step's A(e) is
mostly other steps' noise: ``corr`` ~ sqrt(share of the reward variance that step caused).
With ODE everywhere but the trained step (G2RPO) the reward differences within a group are
that step's doing alone. The last step of a chain has A* = 0 exactly: the image is the x0
prediction of its parent's forward (docs/algorithms.md §1.8).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError
from ..engine.advantages import compute_advantages
from ..engine.methods import METHODS
from ..engine.plans import build_plan
from ..engine.policy import Cond, Policy, select_cond
from ..engine.pruning import select_edges
from ..engine.tree import RolloutPlan, Tree, chain_plan, decode_leaves, rollout

DEFAULT_METHODS = ("dance_full", "flow_grpo", "mix", "g2rpo", "branch", "branch_depth",
                   "branch_mix", "branch_mix_flash", "branch_sibling")

RewardFn = Callable[[Tensor, list[str], Tensor], Tensor]
"""(media [B, ...], prompts [B], group ids [B]) -> total reward [B] fp32 on the CPU."""


@dataclass(frozen=True)
class Continuation:
    """The single path from a node to a leaf: grid indices after the start, solvers, lambdas."""

    grids: tuple[int, ...]
    solvers: tuple[str, ...]
    scales: tuple[float, ...]

    @property
    def stochastic(self) -> bool:
        return "sde" in self.solvers


def continuation(plan: RolloutPlan, lane: int, grid: int) -> Continuation:
    """The path the plan's sampler takes from a node at (``lane``, ``grid``): at each position
    the SDE fork if there is one, else the first fork, one child each."""
    grids, solvers, scales = [], [], []
    while grid != plan.lanes[lane].track[-1]:
        ln = plan.lanes[lane]
        forks = ln.forks[ln.track.index(grid)]
        f = next((f for f in forks if f.solver == "sde"), forks[0])
        grid = plan.next_grid(f.lane, grid)
        lane = f.lane
        grids.append(grid)
        solvers.append(f.solver)
        scales.append(f.noise_scale)
    return Continuation(tuple(grids), tuple(solvers), tuple(scales))


def node_values(policy: Policy, cond: Cond, prompts: Sequence[str], plan: RolloutPlan,
                tree: Tree, nodes: Tensor, leaf_reward: Tensor, reward: RewardFn, k: int,
                generator: torch.Generator, max_batch: int = 256) -> tuple[Tensor, Tensor]:
    """Two independent halves of a K-continuation estimate of V for ``nodes`` [n]: returns
    (V_a [n], V_b [n]), each the mean of K/2 continuation rewards (equal for deterministic
    paths and for leaves, whose V is their own reward ``leaf_reward`` [L], leaf_ids order)."""
    half = max(k // 2, 1)
    va = torch.empty(len(nodes))
    vb = torch.empty(len(nodes))
    leaf_pos = torch.full((tree.num_nodes,), -1, dtype=torch.long)
    leaf_pos[tree.leaf_ids.cpu()] = torch.arange(len(tree.leaf_ids))
    by_path: dict[Continuation, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes.tolist()):
        if leaf_pos[n] >= 0:
            va[i] = vb[i] = leaf_reward[leaf_pos[n]]
        else:
            by_path[continuation(plan, int(tree.lane[n]), int(tree.grid[n]))].append(i)
    for path, rows in by_path.items():
        ids = nodes[rows]
        reps = 2 * half if path.stochastic else 1
        start = int(tree.grid[ids[0]])
        sig = (plan.sigmas[start], *(plan.sigmas[g] for g in path.grids))
        chain = chain_plan("continue", sig, [1] * len(path.grids), list(path.solvers),
                           list(path.scales), kernel=plan.kernel, level=plan.level)
        group = tree.group[ids].cpu().repeat_interleave(reps)
        x = tree.latents[ids].repeat_interleave(reps, dim=0)
        dev = x.device
        cont = rollout(policy, select_cond(cond, group.to(dev)), chain, generator=generator,
                       max_batch=max_batch, x_start=x, device=dev)
        order = cont.group[cont.leaf_ids].argsort().cpu()
        media = decode_leaves(policy, cont, max_batch)
        r = reward(media[order], [prompts[g] for g in group.tolist()], group).view(-1, reps)
        va[rows] = r[:, :half].mean(1) if reps > 1 else r[:, 0]
        vb[rows] = r[:, half:].mean(1) if reps > 1 else r[:, 0]
    return va, vb


def weighted(weights: dict[str, float], scores: dict[str, Tensor]) -> Tensor:
    """The training reward: sum of weight x score over the named rewards [B]."""
    return torch.stack([weights[n] * s.float() for n, s in scores.items()]).sum(0)


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two [n] vectors (nan when either is constant or n < 2)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else math.nan


def credit_stats(adv: Tensor, true_a: Tensor, true_b: Tensor, step: Tensor) -> dict[str, Any]:
    """Fidelity of advantages ``adv`` [E] to the true ones (two half estimates [E], already
    scaled per tree); ``step`` [E] the edges' grid step. See the module docstring."""
    true = (true_a + true_b) / 2
    half = pearson(true_a, true_b)
    rel = 2 * half / (1 + half) if half > 0 else math.nan
    corr = pearson(adv, true)
    by_step = {int(s): pearson(adv[step == s], true[step == s])
               for s in sorted(set(step.tolist()))}
    return {"edges": int(adv.numel()), "corr": corr, "reliability": rel,
            "corr_corrected": corr / math.sqrt(rel) if rel > 0 else math.nan,
            "by_step": by_step}


def _true(v: Tensor, child: Tensor, parent: Tensor, scale: Tensor) -> Tensor:
    """A* = (V(child) - V(parent)) / tree std [E]; |A*| < 1e-5 is round-off (a mean of K equal
    rewards against one of them, e.g. the last step) and set to 0."""
    a = (v[child] - v[parent]) / scale
    return torch.where(a.abs() < 1e-5, torch.zeros_like(a), a)


def measure(policy: Policy, prompts: Sequence[str], method: str, plan_kw: dict[str, Any],
            reward_set: Any, rules: tuple[str, str, dict], advantage_kw: dict[str, Any], *,
            k: int = 16, seed: int = 0, max_batch: int = 256) -> dict[str, Any]:
    """One rollout batch of ``method`` over ``prompts``, its advantages and trained edges as
    training computes them (``rules``: advantage rule, selector, selector kwargs), and the
    credit statistics of those edges against K-continuation estimates of A*."""
    plan = build_plan(METHODS.get(method).plan, **plan_kw)
    rule, sel, sel_kw = rules
    gen = torch.Generator().manual_seed(seed)
    cond = policy.encode(list(prompts))
    tree = rollout(policy, cond, plan, generator=gen, max_batch=max_batch)

    def total(media: Tensor, ps: list[str], group: Tensor) -> Tensor:
        return weighted(reward_set.weights, reward_set.score(media, ps, group))

    media = decode_leaves(policy, tree, max_batch)
    group = tree.group[tree.leaf_ids].cpu()
    scores = reward_set.score(media, [prompts[g] for g in group.tolist()], group)
    leaf_r = weighted(reward_set.weights, scores)
    adv = compute_advantages(tree, scores, rule, reward_set.weights, **advantage_kw).cpu()
    mask = select_edges(tree, adv, sel, generator=torch.Generator().manual_seed(seed), **sel_kw)
    child = mask.cpu().nonzero().squeeze(1)
    parent = tree.parent.cpu()[child]
    nodes, inv = torch.unique(torch.cat([child, parent]), return_inverse=True)
    va, vb = node_values(policy, cond, prompts, plan, tree, nodes, leaf_r, total, k, gen,
                         max_batch)
    c, p = inv[: len(child)], inv[len(child):]
    tree_std = torch.stack([leaf_r[group == g].std() for g in range(len(prompts))])
    scale = tree_std[tree.group.cpu()[child]].clamp_min(1e-8)
    stats = credit_stats(adv[child], _true(va, c, p, scale), _true(vb, c, p, scale),
                         tree.grid.cpu()[parent])
    return {"method": method, "forwards": tree.forwards, "valued_nodes": len(nodes), **stats}


def credit(methods: Sequence[str], num_prompts: int, k: int, overrides: Sequence[str],
           out_dir: Path, *, seed: int = 0, command: str = "",
           progress: bool = True) -> dict[str, Any]:
    """Measure every method on the embedded default's base model and training reward (the
    policy ``branchgrpo train`` starts from, with ``overrides`` applied); write credit.md,
    credit.json and credit_by_step.png to ``out_dir``."""
    from ..config import load_config
    from ..models.factory import build_policy, load_prompts
    from ..scoring import reward_set
    from ..spec import advantage_kw, model_options, resolve, resolved_rules
    from .common import machine

    base = load_config(None, list(overrides))
    policy = build_policy(model_options(base, progress=progress), torch.device("cpu"))
    train_prompts, _ = load_prompts(base.data.prompts, base.data.eval_prompts)
    prompts = train_prompts[:num_prompts]
    rewards = reward_set(base)
    rows = []
    t0 = time.perf_counter()
    for m in methods:
        cfg = load_config(None, [*overrides, f"rollout.method={m}"])
        rules = resolved_rules(cfg)
        t = time.perf_counter()
        row = measure(policy, prompts, m, resolve(cfg).plan_kwargs, rewards, rules,
                      advantage_kw(cfg, rules[0]), k=k, seed=seed,
                      max_batch=cfg.rollout.max_batch)
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        if progress:
            print(f"{m}: corr {row['corr']:.3f} (corrected {row['corr_corrected']:.3f}), "
                  f"{row['edges']} edges, {row['seconds']:.0f} s", flush=True)
    info = {"command": command, "machine": machine(), "methods": list(methods),
            "prompts": list(prompts), "continuations": k, "seed": seed,
            "overrides": list(overrides), "wall_s": time.perf_counter() - t0}
    write_outputs(Path(out_dir), rows, info)
    return {**info, "rows": rows}


def _f(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The Markdown table, one row per method."""
    out = ["| method | trained edges | corr(A, A*) | reliability of A* | corr, corrected | "
           "rollout forwards |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['edges']} | {_f(r['corr'])} | "
                   f"{_f(r['reliability'])} | {_f(r['corr_corrected'])} | "
                   f"{r['forwards']} |")
    return out


def write_outputs(out_dir: Path, rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """credit.md (table, plot, command, machine), credit.json, credit_by_step.png."""
    from ..report import line_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "credit.json").write_text(json.dumps({**info, "rows": rows}, indent=1))
    with line_figure(out_dir / "credit_by_step.png", "grid step t of the trained edge",
                     "corr(A, A*) of the edges trained at each step", legend_cols=2) as ax:
        for r in rows:
            steps = [s for s, c in r["by_step"].items() if math.isfinite(c)]
            ax.plot(steps, [r["by_step"][s] for s in steps], marker="o", ms=3, label=r["method"])
        ax.axhline(0, color="k", lw=0.6)
        ax.set_ylabel("correlation")
    m = info["machine"]
    md = ["# bench credit: does each trained edge get the credit its action earned?", "",
          f"Command: `{info['command']}`", "",
          f"Machine: {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, "
          f"{m['torch_threads']} threads. Wall time {info['wall_s'] / 60:.1f} min.", "",
          f"Prompts: {', '.join(info['prompts'])}; K = {info['continuations']} continuations per "
          f"node with a stochastic path (1 for deterministic ones); seed {info['seed']}; "
          f"overrides: `{' '.join(info['overrides']) or 'none'}`.", "",
          "A*(e) = V(child) - V(parent), V = mean reward of K continuations of the method's "
          "own sampler, scaled by the tree's reward std. corr: Pearson correlation of the "
          "method's advantage with A* over all trained edges; reliability: split-half "
          "reliability of A* (Spearman-Brown, K); corrected = corr / sqrt(reliability).",
          "", *table(rows), "",
          "![by step](credit_by_step.png)", ""]
    (out_dir / "credit.md").write_text("\n".join(md))


def command(args: argparse.Namespace) -> int:
    """``branchgrpo bench credit``."""
    methods = args.methods.split(",") if args.methods else list(DEFAULT_METHODS)
    if any("=" not in o for o in args.overrides) or args.prompts < 1 or args.continuations < 2:
        print("error: overrides look like key.sub=value, --prompts >= 1, --continuations >= 2",
              file=sys.stderr)
        return 2
    cmd = ["branchgrpo", "bench", "credit", "--methods", ",".join(methods), "--prompts",
           str(args.prompts), "--continuations", str(args.continuations), "--seed",
           str(args.seed), "--out", str(args.out), *args.overrides]
    try:
        credit(methods, args.prompts, args.continuations, args.overrides, Path(args.out),
               seed=args.seed, command=shlex.join(cmd))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"report: {Path(args.out) / 'credit.md'}")
    return 0

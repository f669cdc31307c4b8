"""``branchgrpo bench iteration``: every method on the same policy, prompts and hardware, in
one process: rollout forwards, trained edges, wall time of rollout, reward and update, and
each ratio to the baseline (DanceGRPO).

One iteration per method = rollout -> decode -> reward -> advantages -> edge selection -> one
optimizer step over all selected edges (gradients accumulated in chunks of ``edge_chunk``).
Every method runs once untimed first (warm-up), then ``repeats`` timed runs; the best is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .engine.advantages import compute_advantages
from .engine.losses import policy_loss
from .engine.methods import METHODS
from .engine.plans import build_plan, plan_parameters
from .engine.policy import Policy
from .engine.pruning import select_edges
from .engine.tree import decode_leaves, edge_log_prob, rollout

DEFAULT_METHODS = ("dance_full", "dance", "flow_grpo", "mix", "mix_flash", "g2rpo", "branch",
                   "branch_width", "branch_depth", "branch_mix")


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


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def one_iteration(policy: Policy, prompts: Sequence[str], method: str,
                  reward: Callable, optimizer: torch.optim.Optimizer, *,
                  plan_kw: dict | None = None, max_batch: int = 64, edge_chunk: int = 64,
                  storage_dtype: torch.dtype = torch.float32, seed: int = 0,
                  autocast: torch.dtype | None = None) -> IterationTiming:
    """Run and time one iteration of ``method`` (its preset plan, rule and selection)."""
    m = METHODS.get(method)
    plan = build_plan(m.plan, **{**m.plan_kw, **(plan_kw or {})})
    device = next(iter(policy.encode(prompts[:1]).values())).device
    ctx = (torch.autocast(device.type, dtype=autocast) if autocast is not None
           else torch.autocast(device.type, enabled=False))
    _sync()
    t0 = time.perf_counter()
    cond = policy.encode(list(prompts))
    with ctx:
        tree = rollout(policy, cond, plan, generator=torch.Generator(device).manual_seed(seed),
                       max_batch=max_batch, storage_dtype=storage_dtype, device=device)
    _sync()
    t1 = time.perf_counter()
    media = decode_leaves(policy, tree, max_batch)
    group = tree.group[tree.leaf_ids].cpu()
    scores = {"r": reward(media, [prompts[g] for g in group.tolist()]).float().cpu()}
    _sync()
    t2 = time.perf_counter()
    adv = compute_advantages(tree, scores, m.advantage, **m.advantage_kw)
    mask = select_edges(tree, adv, m.selection, generator=torch.Generator().manual_seed(seed),
                        **m.selection_kw)
    edges = tree.edges(mask, adv)
    optimizer.zero_grad(set_to_none=True)
    n = len(edges)
    for chunk in torch.arange(n).split(edge_chunk):
        e = edges.index(chunk.to(edges.child.device))
        with ctx:
            lp, *_ = edge_log_prob(policy, e, cond, plan, max_batch=max_batch,
                                   storage_dtype=storage_dtype)
        loss, _ = policy_loss(lp, e.old_log_prob, e.adv, m.clip_eps)
        (loss * len(chunk) / n).backward()
    optimizer.step()
    _sync()
    t3 = time.perf_counter()
    return IterationTiming(method, tree.forwards, n, t1 - t0, t2 - t1, t3 - t2)


def iteration_table(policy: Policy, prompts: Sequence[str], reward: Callable, *,
                    methods: Sequence[str] = DEFAULT_METHODS, baseline: str = "dance_full",
                    plan_kw: dict | Callable[[str], dict] | None = None, repeats: int = 1,
                    lr: float = 1e-5,
                    per_sample_baseline: bool = True, progress: bool = True,
                    **kw) -> list[dict]:
    """Rows per method (best of ``repeats`` after a warm-up) with ratios to ``baseline``.

    ``plan_kw`` overrides apply to every method's plan where the plan takes the key, or, when
    it is a function of the method's name, give each method its own (its resolved
    `branchgrpo.spec.RunSpec.plan_kwargs`). ``per_sample_baseline``
    adds the baseline run the way the published DanceGRPO and BranchGRPO code runs it, one
    sample per forward and one edge per backward (docs/algorithms.md §2.1, §5.1), as a last row
    ``<baseline> (batch 1)``, and every row's ``ratio_batch1`` to it."""
    from tqdm import tqdm


    params = [p for p in policy.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=lr)

    def best(name: str, warm_up: bool, **over) -> IterationTiming:
        """The fastest of ``repeats`` timed iterations of ``name`` (after one untimed)."""
        valid = plan_parameters(METHODS.get(name).plan)
        kw_ = plan_kw(name) if callable(plan_kw) else plan_kw or {}
        own = {k: v for k, v in kw_.items() if k in valid}
        args = {**kw, **over}
        if warm_up:
            one_iteration(policy, prompts, name, reward, opt, plan_kw=own, **args)
        runs = [one_iteration(policy, prompts, name, reward, opt, plan_kw=own, **args)
                for _ in range(repeats)]
        return min(runs, key=lambda r: r.total_s)

    results = {name: best(name, True)
               for name in tqdm(methods, desc="bench iteration", disable=not progress)}
    if per_sample_baseline and baseline in results:  # the model is warm by now
        results[f"{baseline} (batch 1)"] = best(baseline, False, max_batch=1, edge_chunk=1)
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

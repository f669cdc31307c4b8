"""``branchgrpo bench nfe``: forwards, edges and trained edges per tree, per method.

Numbers are measured, not derived: each method's preset plan runs through the real engine on
the analytic policy, counting model rows, edges and the edges its selection trains.
"""

from __future__ import annotations

import argparse
import json

import torch

from ..engine.advantages import compute_advantages
from ..engine.methods import METHODS
from ..engine.plans import build_plan
from ..engine.pruning import select_edges
from ..engine.tree import rollout
from ..models.analytic import GaussianPolicy
from .common import markdown


def nfe_table(methods: list[str] | None = None, seed: int = 0) -> list[dict]:
    """Per method, for one tree (one prompt) of its default plan: forwards, edges, trained
    edges, leaves, and the per-leaf ratios."""
    policy = GaussianPolicy(dim=4)
    cond = policy.encode(["a prompt"])
    rows = []
    for name in methods or METHODS.names():
        m = METHODS.get(name)
        plan = build_plan(m.plan, **m.plan_kw)
        tree = rollout(policy, cond, plan, generator=torch.Generator().manual_seed(seed))
        reward = tree.leaf_x0.float().sum(1)
        adv = compute_advantages(tree, {"r": reward}, m.advantage, **m.advantage_kw)
        mask = select_edges(tree, adv, m.selection, generator=torch.Generator().manual_seed(seed),
                            **m.selection_kw)
        leaves = int(tree.leaf.sum())
        rows.append({
            "method": name, "plan": plan.name, "steps": plan.num_steps,
            "forwards": tree.forwards, "edges": int(tree.edge_mask.sum()),
            "trained_edges": int(mask.sum()), "leaves": leaves,
            "forwards_per_leaf": round(tree.forwards / leaves, 4),
            "trained_per_leaf": round(int(mask.sum()) / leaves, 4),
        })
    return rows


def command(args: argparse.Namespace) -> int:
    """``branchgrpo bench nfe``."""
    rows = nfe_table(args.methods or None)
    print(json.dumps(rows, indent=2) if args.json else markdown(rows))
    return 0

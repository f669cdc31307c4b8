"""Edge selection ("pruning"): which stochastic edges of a rollout tree get gradients.

A selector maps (tree, node advantages [N], iteration, generator) to a mask [N] over the edges
into each node; only SDE edges can be selected (an ODE edge has no density). Sampling and
rewards are unchanged by selection (docs/algorithms.md §2.1 step 7, §5.5, §5.6).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .registry import Registry
from .tree import Tree

Selector = Callable[..., Tensor]
SELECTORS: Registry[Selector] = Registry("edge selection")


def trainable(tree: Tree) -> Tensor:
    """Every stochastic edge [N] bool (Mix: ODE edges are never trained)."""
    return tree.edge_mask & tree.sde


def leaf_count(tree: Tree) -> Tensor:
    """Number of leaf descendants of each node [N] (a leaf counts itself)."""
    cnt = tree.leaf.long().cpu().clone()
    depth, par = tree.depth.cpu(), tree.parent.cpu()
    for d in range(int(depth.max()), 0, -1):
        c = (depth == d).nonzero().squeeze(1)
        cnt.index_add_(0, par[c], cnt[c])
    return cnt


def single_leaf(tree: Tree) -> Tensor:
    """For each node with exactly one leaf below it, that leaf's node id; -1 otherwise [N]."""
    cnt = leaf_count(tree)
    out = torch.where(tree.leaf.cpu(), torch.arange(tree.num_nodes), -1)
    depth, par = tree.depth.cpu(), tree.parent.cpu()
    for d in range(int(depth.max()), 0, -1):
        c = (depth == d).nonzero().squeeze(1)
        c = c[(cnt[c] == 1) & (cnt[par[c]] == 1)]
        out[par[c]] = out[c]
    return out


@SELECTORS.register("all")
def select_all(tree: Tree, adv: Tensor, iteration: int = 0,
               generator: torch.Generator | None = None) -> Tensor:
    """Every stochastic edge (BranchGRPO without pruning; Mix variants)."""
    return trainable(tree).cpu()


@SELECTORS.register("timestep_fraction")
def timestep_fraction(tree: Tree, adv: Tensor, iteration: int = 0,
                      generator: torch.Generator | None = None, fraction: float = 0.6,
                      random: bool = True) -> Tensor:
    """DanceGRPO: per leaf, a random permutation of steps 0..T-2 (the last step is always
    excluded) keeps the first int((T - 1) * fraction); ``random=False`` keeps them in order
    (Flow-GRPO's first steps). An edge is kept if a leaf below it chose its step."""
    if not 0 < fraction <= 1:
        raise ValueError(f"timestep fraction must lie in (0, 1], got {fraction}")
    t = len(tree.sigmas) - 1
    n_keep = int((t - 1) * fraction)
    if n_keep < 1:
        raise ValueError(f"fraction {fraction} keeps no step of {t - 1}; raise it")
    lids = tree.leaf_ids.cpu()
    chosen = torch.zeros(tree.num_nodes, t, dtype=torch.int32)
    for lid in lids.tolist():
        steps = torch.randperm(t - 1, generator=generator)[:n_keep] if random else \
            torch.arange(n_keep)
        chosen[lid, steps] = 1
    depth, par = tree.depth.cpu(), tree.parent.cpu()
    for d in range(int(depth.max()), 0, -1):
        c = (depth == d).nonzero().squeeze(1)
        chosen.index_add_(0, par[c], chosen[c])
    edge = tree.edge_mask.cpu()
    step = tree.grid.cpu()[par.clamp_min(0)]
    keep = chosen[torch.arange(tree.num_nodes), step.clamp_max(t - 1)] > 0
    return trainable(tree).cpu() & edge & keep


@SELECTORS.register("width")
def width(tree: Tree, adv: Tensor, iteration: int = 0,
          generator: torch.Generator | None = None, ratio: float = 0.5) -> Tensor:
    """BranchGRPO width pruning (published mode 2, docs/algorithms.md §5.5, §13.6): among edges
    below the last split (whose parent has one leaf), keep the chains of the best and worst
    ratio * L / 2 leaves of each tree by advantage; edges above the last split are all kept."""
    if not 0 < ratio <= 1:
        raise ValueError(f"width ratio must lie in (0, 1], got {ratio}")
    par = tree.parent.cpu()
    one = single_leaf(tree)
    below = tree.edge_mask.cpu() & (one[par.clamp_min(0)] >= 0)
    lids = tree.leaf_ids.cpu()
    a = adv.cpu().float()
    groups = tree.group.cpu()[lids]
    keep_leaf = torch.zeros(tree.num_nodes, dtype=torch.bool)
    for g in groups.unique().tolist():
        ids = lids[groups == g]
        k = max(int(round(ratio * len(ids) / 2)), 1)
        order = torch.argsort(a[ids], stable=True)
        keep_leaf[ids[order[:k]]] = True
        keep_leaf[ids[order[-k:]]] = True
    keep = ~below | keep_leaf[one.clamp_min(0)]
    return trainable(tree).cpu() & keep


def _depth_mask(tree: Tree, depths: Sequence[int]) -> Tensor:
    drop = torch.isin(tree.depth.cpu(), torch.tensor(sorted(set(depths)), dtype=torch.long))
    return trainable(tree).cpu() & ~drop


@SELECTORS.register("depth")
def depth(tree: Tree, adv: Tensor, iteration: int = 0,
          generator: torch.Generator | None = None,
          depths: Sequence[int] = (16, 17, 18, 19, 20)) -> Tensor:
    """BranchGRPO depth pruning: drop edges whose child depth is in ``depths``. The default
    drops 5 full-width depths, giving the published 138 trained edges per tree
    (docs/algorithms.md §5.5)."""
    return _depth_mask(tree, depths)


@SELECTORS.register("depth_slide")
def depth_slide(tree: Tree, adv: Tensor, iteration: int = 0,
                generator: torch.Generator | None = None,
                depths: Sequence[int] = (16, 17, 18, 19, 20), interval: int = 30,
                stop_depth: int = 9) -> Tensor:
    """Sliding depth pruning: at iteration t the set is {d - min(t // interval, min(depths) -
    stop_depth)}, moving toward shallower depths (``--depth_pruning_slide``)."""
    if interval < 1:
        raise ValueError(f"depth_slide interval must be >= 1, got {interval}")
    shift = max(min(iteration // interval, min(depths) - stop_depth), 0)
    return _depth_mask(tree, [d - shift for d in depths])


def select_edges(tree: Tree, adv: Tensor, name: str = "all", iteration: int = 0,
                 generator: torch.Generator | None = None, **kw) -> Tensor:
    """Run the selector ``name`` with its parameters; returns the edge mask [N]."""
    return SELECTORS.get(name)(tree, adv, iteration=iteration, generator=generator, **kw)

"""Advantage rules over a rollout `Tree` (docs/algorithms.md §1.5, §5.2-5.3, §6.2).

Rewards arrive per leaf ([L], in ``tree.leaf_ids`` order); a rule returns an advantage per
node [N], and an edge parent -> child is trained with the child's advantage. All rules are
pure functions, registered by name, computed in float64 and returned as fp32.

Reward fusion (leaves -> inner nodes) and normalisation are scatter operations over the flat
parent index, processed one depth level at a time from the deepest level up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .registry import Registry
from .tree import Tree

AdvantageRule = Callable[..., Tensor]
ADVANTAGES: Registry[AdvantageRule] = Registry("advantage rule")


class RewardValueError(ValueError):
    """A reward returned NaN/inf; the message names the reward."""


def check_rewards(rewards: Mapping[str, Tensor]) -> None:
    """Raise `RewardValueError` naming every reward with non-finite values."""
    for name, r in rewards.items():
        bad = ~torch.isfinite(r)
        if bool(bad.any()):
            raise RewardValueError(
                f"reward {name!r} returned {int(bad.sum())} non-finite value(s) out of "
                f"{r.numel()}; fix the reward model or its inputs (the run was stopped before "
                "the update, so the last checkpoint is intact)")


def _leaf_tensor(tree: Tree, leaf_reward: Tensor) -> Tensor:
    """Leaf rewards [L] scattered onto nodes [N] (float64, 0 elsewhere)."""
    leaves = tree.leaf_ids
    if leaf_reward.shape != (len(leaves),):
        raise ValueError(f"expected one reward per leaf ({len(leaves)}), got shape "
                         f"{tuple(leaf_reward.shape)}")
    out = torch.zeros(tree.num_nodes, dtype=torch.float64, device=leaf_reward.device)
    out[leaves.to(out.device)] = leaf_reward.double()
    return out


def _levels(tree: Tree):
    """(child ids, parent ids) per depth level, deepest first (only nodes with a parent)."""
    depth = tree.depth.cpu()
    for d in range(int(depth.max()), 0, -1):
        c = (depth == d).nonzero().squeeze(1)
        yield c, tree.parent.cpu()[c]


def _scatter_logsumexp(src: Tensor, index: Tensor, size: int) -> Tensor:
    mx = torch.full((size,), -torch.inf, dtype=src.dtype).scatter_reduce(
        0, index, src, "amax", include_self=True)
    safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    acc = torch.zeros(size, dtype=src.dtype).index_add(0, index, torch.exp(src - safe[index]))
    return torch.where(acc > 0, acc.log() + safe, torch.full_like(mx, -torch.inf))


def path_log_prob(tree: Tree) -> Tensor:
    """Sum of edge log-probs from the root to each node [N] (float64)."""
    cum = tree.log_prob.double().cpu().clone()
    depth = tree.depth.cpu()
    for d in range(1, int(depth.max()) + 1):
        c = (depth == d).nonzero().squeeze(1)
        cum[c] += cum[tree.parent.cpu()[c]]
    return cum


def fuse(tree: Tree, leaf_reward: Tensor, rule: str = "mean", alpha: float = 1.0) -> Tensor:
    """Node rewards R [N] from leaf rewards [L] (docs/algorithms.md §5.2, §13.5).

    - ``mean``: R(n) = mean of R over all leaf descendants of n (published default).
    - ``child_softmax``: R(n) = sum_c softmax_c(alpha * l_c) R(c) over n's children, l_c the
      child edge's log-prob (the published ``--tree_prob_weighted``).
    - ``path``: R(n) = sum over leaves l below n of softmax_l(alpha * log p(path to l)) R(l):
      true path-probability weighting, as the paper's text describes.
    """
    if rule not in ("mean", "child_softmax", "path"):
        raise ValueError(f"unknown fusion {rule!r}; use 'mean', 'child_softmax' or 'path'")
    n = tree.num_nodes
    r = _leaf_tensor(tree, leaf_reward.cpu())
    leaf = tree.leaf.cpu()
    if rule == "path":
        logw = torch.where(leaf, alpha * path_log_prob(tree), torch.full((n,), -torch.inf,
                                                                         dtype=torch.float64))
    else:
        logw = torch.where(leaf, torch.zeros(n, dtype=torch.float64),
                           torch.full((n,), -torch.inf, dtype=torch.float64))
    lp = tree.log_prob.double().cpu()
    for c, p in _levels(tree):
        # weights of each child inside its parent's combination
        wlog = alpha * lp[c] if rule == "child_softmax" else logw[c]
        norm = _scatter_logsumexp(wlog, p, n)
        w = torch.exp(wlog - norm[p])
        r.index_add_(0, p, w * r[c])
        if rule != "child_softmax":
            logw = torch.where(torch.isfinite(norm), norm, logw)
    return r.to(leaf_reward.device)


def normalize(values: Tensor, key: Tensor, eps: float = 1e-8, unbiased: bool = True,
              min_std: float = 0.0, std: Tensor | float | None = None) -> Tensor:
    """(x - mean_key) / (std_key + eps) within each key group; values, key [M] -> [M] float64.

    Groups of one member, or with std <= ``min_std`` when min_std > 0, get 0. ``std`` replaces
    the per-group std (e.g. a global std, Flow-GRPO's tracker)."""
    x = values.double()
    uniq, inv = torch.unique(key, return_inverse=True)
    g = len(uniq)
    cnt = torch.zeros(g, dtype=torch.float64).index_add(0, inv, torch.ones_like(x))
    mean = torch.zeros(g, dtype=torch.float64).index_add(0, inv, x) / cnt
    dev = x - mean[inv]
    ss = torch.zeros(g, dtype=torch.float64).index_add(0, inv, dev**2)
    s = (ss / (cnt - 1).clamp_min(1)).sqrt() if unbiased else (ss / cnt).sqrt()
    s_row = s[inv] if std is None else torch.as_tensor(std, dtype=torch.float64).expand_as(x)
    out = dev / (s_row + eps)
    dead = cnt[inv] < 2
    if min_std > 0:
        dead |= s[inv] < min_std
    return torch.where(dead, torch.zeros_like(out), out)


def _leaf_groups(tree: Tree) -> Tensor:
    g = tree.group.cpu()[tree.leaf_ids.cpu()]
    counts = torch.bincount(g)
    if bool((counts[counts > 0] < 2).any()):
        raise ValueError("this advantage rule normalises over each tree's leaves, but a tree has "
                         "only 1 leaf: use a plan with group_size >= 2 (or branch_factor >= 2)")
    return g


def _spread(tree: Tree, leaf_adv: Tensor) -> Tensor:
    """Node advantages from leaf advantages: each node gets the mean over its leaves."""
    return fuse(tree, leaf_adv, "mean")


@ADVANTAGES.register("group")
def group_advantage(tree: Tree, leaf_reward: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-group (per-tree) normalisation with unbiased std (DanceGRPO ``--use_group``, MixGRPO):
    A = (r - mean_G r) / (std_G r + eps) at each leaf; inner nodes get their leaves' mean."""
    g = _leaf_groups(tree)
    return _spread(tree, normalize(leaf_reward.cpu(), g, eps)).float()


@ADVANTAGES.register("prompt_global_std")
def prompt_global_std_advantage(tree: Tree, leaf_reward: Tensor, eps: float = 1e-4,
                                global_std: float | None = None) -> Tensor:
    """Flow-GRPO's tracker: per-prompt mean, population std over all rewards of the batch
    (``global_std`` overrides it, e.g. gathered over ranks), + 1e-4 (docs/algorithms.md §3.1)."""
    g = _leaf_groups(tree)
    r = leaf_reward.cpu().double()
    std = r.std(unbiased=False) if global_std is None else torch.tensor(global_std)
    return _spread(tree, normalize(r, g, eps, std=std)).float()


@ADVANTAGES.register("depth")
def depth_advantage(tree: Tree, leaf_reward: Tensor, fusion: str = "mean", alpha: float = 1.0,
                    eps: float = 1e-8, min_std: float = 1e-6) -> Tensor:
    """BranchGRPO: fuse leaf rewards to every node, then normalise per (tree, depth) with
    unbiased std; depths with one node or std < 1e-6 get 0 (docs/algorithms.md §5.3)."""
    r = fuse(tree, leaf_reward, fusion, alpha).cpu()
    has_edge = tree.edge_mask.cpu()
    key = tree.group.cpu() * (int(tree.depth.max()) + 1) + tree.depth.cpu()
    out = torch.zeros(tree.num_nodes, dtype=torch.float64)
    out[has_edge] = normalize(r[has_edge], key[has_edge], eps, min_std=min_std)
    return out.float()


def sde_ancestor(tree: Tree) -> Tensor:
    """For each node, the nearest node at or above it whose incoming edge is SDE (-1: none)."""
    anc = torch.full((tree.num_nodes,), -1, dtype=torch.long)
    sde, par, depth = tree.sde.cpu(), tree.parent.cpu(), tree.depth.cpu()
    for d in range(1, int(depth.max()) + 1):
        c = (depth == d).nonzero().squeeze(1)
        anc[c] = torch.where(sde[c], c, anc[par[c]])
    return anc


@ADVANTAGES.register("g2rpo")
def g2rpo_advantage(tree: Tree, leaf_reward: Tensor, eps: float = 1e-8) -> Tensor:
    """G2RPO multi-granularity advantage (docs/algorithms.md §6.2): for the SDE child c_j of a
    split, A(c_j) = sum_g (r_g(c_j) - mean_j r_g) / (std_j r_g + eps), siblings j of one split,
    g the tail lane (granularity). Leaves without a stochastic step above them (the anchor) are
    logged but not used. Needs exactly one stochastic step on every path."""
    anc = sde_ancestor(tree)
    sde, par = tree.sde.cpu(), tree.parent.cpu()
    lids = tree.leaf_ids.cpu()
    count = torch.zeros(tree.num_nodes, dtype=torch.long)
    depth = tree.depth.cpu()
    for d in range(1, int(depth.max()) + 1):
        c = (depth == d).nonzero().squeeze(1)
        count[c] = count[par[c]] + sde[c].long()
    if bool((count[lids] > 1).any()):
        raise ValueError("rule 'g2rpo' needs one stochastic step per path (the g2rpo plan); "
                         "use 'group' or 'depth' for this plan")
    la = anc[lids]
    used = la >= 0
    if not bool(used.any()):
        raise ValueError("rule 'g2rpo' found no stochastic step above any leaf")
    lane = tree.lane.cpu()[lids]
    key = par[la[used]] * (int(lane.max()) + 1) + lane[used]
    z = normalize(leaf_reward.cpu()[used], key, eps)
    out = torch.zeros(tree.num_nodes, dtype=torch.float64).index_add(0, la[used], z)
    return out.float()


@ADVANTAGES.register("sibling")
def sibling_advantage(tree: Tree, leaf_reward: Tensor, eps: float = 1e-8) -> Tensor:
    """Sibling-relative (leave-one-out) advantage (docs/algorithms.md §15.1): for the SDE
    child c of a parent u with K >= 2 SDE children,

        A(c) = (R(c) - mean_{siblings j != c} R(j)) / (std_tree r + eps),

    R the mean-fused reward of each node's leaves, std_tree the unbiased std of the tree's
    leaf rewards. Siblings share u's state, so R(c) - R(j) contains no prefix noise: given u
    it is an unbiased estimate of V(c) - V(u) (the action's own effect) when the steps below
    the children are the same sampler. SDE edges without a sibling, and every deterministic
    edge, get 0: plans for this rule are SDE only at their splits (``branch_flash`` with
    ``mix_window`` 0)."""
    r = fuse(tree, leaf_reward, "mean").cpu()
    par, n = tree.parent.cpu(), tree.num_nodes
    c = ((par >= 0) & tree.sde.cpu()).nonzero().squeeze(1)
    p = par[c]
    cnt = torch.zeros(n, dtype=torch.float64).index_add(0, p, torch.ones(len(c),
                                                                         dtype=torch.float64))
    tot = torch.zeros(n, dtype=torch.float64).index_add(0, p, r[c])
    k = cnt[p]
    loo = (tot[p] - r[c]) / (k - 1).clamp_min(1)
    a = torch.where(k >= 2, r[c] - loo, torch.zeros_like(loo))
    g = _leaf_groups(tree)
    lr = leaf_reward.cpu().double()
    m = int(g.max()) + 1
    num = torch.bincount(g, minlength=m).double()
    mean = torch.zeros(m, dtype=torch.float64).index_add(0, g, lr) / num.clamp_min(1)
    ss = torch.zeros(m, dtype=torch.float64).index_add(0, g, (lr - mean[g]) ** 2)
    std = (ss / (num - 1).clamp_min(1)).sqrt()
    out = torch.zeros(n, dtype=torch.float64)
    out[c] = a / (std[tree.group.cpu()[c]] + eps)
    return out.float()


def compute_advantages(
    tree: Tree, rewards: Mapping[str, Tensor], rule: str = "group",
    weights: Mapping[str, float] | None = None, combine: str = "reward_sum",
    clip: float = 5.0, **rule_kw,
) -> Tensor:
    """Node advantages [N] from one or more leaf rewards {name: [L]}.

    ``combine="reward_sum"``: r = sum_k w_k r_k, then one advantage (Flow-GRPO).
    ``combine="advantage_sum"``: A = sum_k w_k A(r_k) (MixGRPO, G2RPO). Clamped to +-clip."""
    if not rewards:
        raise ValueError("no rewards given")
    n_leaf = int(tree.leaf.sum())
    for name, r in rewards.items():
        if r.shape != (n_leaf,):
            raise ValueError(f"reward {name!r}: expected one reward per leaf ({n_leaf}), got "
                             f"shape {tuple(r.shape)}")
    check_rewards(rewards)
    w = {k: 1.0 for k in rewards} if weights is None else dict(weights)
    missing = sorted(set(rewards) - set(w))
    if missing:
        raise ValueError(f"no weight for reward(s) {missing}; add them to reward weights")
    fn = ADVANTAGES.get(rule)
    if combine == "reward_sum":
        total = sum(w[k] * rewards[k].double() for k in rewards)
        adv = fn(tree, total, **rule_kw)
    elif combine == "advantage_sum":
        adv = sum(w[k] * fn(tree, rewards[k], **rule_kw).double() for k in rewards)
    else:
        raise ValueError(f"unknown combine {combine!r}; use 'reward_sum' or 'advantage_sum'")
    return adv.float().clamp(-clip, clip)


def zero_std_fraction(tree: Tree, leaf_reward: Tensor) -> float:
    """Fraction of trees whose leaf rewards are all equal (no learning signal)."""
    g = tree.group.cpu()[tree.leaf_ids.cpu()]
    r = leaf_reward.cpu().double()
    mx = torch.zeros(int(g.max()) + 1, dtype=torch.float64).scatter_reduce(0, g, r, "amax",
                                                                           include_self=False)
    mn = torch.zeros_like(mx).scatter_reduce(0, g, r, "amin", include_self=False)
    present = torch.bincount(g) > 0
    return float(((mx - mn).abs() < 1e-12)[present].double().mean())

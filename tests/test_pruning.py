import pytest
import torch

from branchgrpo.engine.advantages import compute_advantages
from branchgrpo.engine.plans import build_plan
from branchgrpo.engine.pruning import leaf_count, select_edges
from branchgrpo.engine.tree import rollout
from branchgrpo.models.analytic import GaussianPolicy


@pytest.fixture(scope="module")
def branch_tree():
    pol = GaussianPolicy(dim=3)
    tree = rollout(pol, pol.encode(["a", "b"]), build_plan("branch"),
                   generator=torch.Generator().manual_seed(0))
    r = tree.leaf_x0.sum(1)
    return tree, compute_advantages(tree, {"r": r}, "depth"), r


def test_timestep_fraction_excludes_last_step_and_keeps_nine_per_sample():
    pol = GaussianPolicy(dim=3)
    tree = rollout(pol, pol.encode(["a"]), build_plan("dance"), generator=torch.Generator())
    adv = torch.zeros(tree.num_nodes)
    mask = select_edges(tree, adv, "timestep_fraction", generator=torch.Generator(),
                        fraction=0.6)
    steps = tree.grid[tree.parent.clamp_min(0)]
    assert int(mask.sum()) == 12 * 9
    assert not bool((mask & (steps == 15)).any())
    ordered = select_edges(tree, adv, "timestep_fraction", fraction=1.0, random=False)
    assert sorted(steps[ordered].unique().tolist()) == list(range(15))


def test_width_keeps_chains_of_best_and_worst_leaves(branch_tree):
    tree, adv, r = branch_tree
    mask = select_edges(tree, adv, "width", ratio=0.5)
    assert int(mask.sum()) == 2 * 138
    below = tree.grid[tree.parent.clamp_min(0)] > 9
    for g in (0, 1):
        leaves = tree.leaf_ids[tree.group[tree.leaf_ids] == g]
        order = torch.argsort(adv[leaves], stable=True)
        kept = set(leaves[order[:4]].tolist()) | set(leaves[order[-4:]].tolist())
        for leaf in leaves.tolist():
            chain = [leaf]
            while tree.grid[tree.parent[chain[-1]]] > 9:
                chain.append(int(tree.parent[chain[-1]]))
            assert all(bool(mask[n]) == (leaf in kept) for n in chain[:-1])
    assert bool(mask[~below & tree.edge_mask].all())


def test_depth_and_sliding_depth(branch_tree):
    tree, adv, _ = branch_tree
    mask = select_edges(tree, adv, "depth", depths=(16, 17, 18, 19, 20))
    assert int(mask.sum()) == 2 * 138
    assert not bool((mask & (tree.depth >= 16)).any())
    slid = select_edges(tree, adv, "depth_slide", iteration=65, depths=(16, 17), interval=30,
                        stop_depth=9)
    assert not bool((slid & torch.isin(tree.depth, torch.tensor([14, 15]))).any())
    assert bool((slid & (tree.depth == 16)).any())
    capped = select_edges(tree, adv, "depth_slide", iteration=10_000, depths=(16,),
                          interval=30, stop_depth=9)
    assert not bool((capped & (tree.depth == 9)).any())


def test_mix_trains_only_sde_edges():
    pol = GaussianPolicy(dim=3)
    tree = rollout(pol, pol.encode(["a"]), build_plan("branch_mix"), generator=torch.Generator())
    mask = select_edges(tree, torch.zeros(tree.num_nodes), "all")
    assert int(mask.sum()) == 34 and bool((tree.sde[mask]).all())
    with pytest.raises(ValueError, match="deterministic"):
        tree.edges(tree.edge_mask)


def test_leaf_count(branch_tree):
    tree, _, _ = branch_tree
    cnt = leaf_count(tree)
    assert cnt[tree.parent == -1].tolist() == [16, 16]
    assert bool((cnt[tree.leaf] == 1).all())

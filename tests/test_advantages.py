import math

import pytest
import torch

from branchgrpo.engine.advantages import (
    RewardValueError,
    compute_advantages,
    fuse,
    g2rpo_advantage,
    normalize,
    zero_std_fraction,
)
from branchgrpo.engine.plans import build_plan
from branchgrpo.engine.tree import rollout
from branchgrpo.models.analytic import GaussianPolicy

R = torch.tensor([1.0, 2.0, 3.0, 5.0])


@pytest.fixture
def small_tree():
    """Root -> 2 children (depth 1) -> 2 leaves each (depth 2): nodes 0 | 1 2 | 3 4 5 6."""
    pol = GaussianPolicy(dim=3)
    plan = build_plan("branch", num_steps=2, split_steps=(0, 1), branch_factor=2)
    tree = rollout(pol, pol.encode(["p"]), plan, generator=torch.Generator().manual_seed(0))
    assert tree.parent.tolist() == [-1, 0, 0, 1, 1, 2, 2]
    return tree


def test_depthwise_normalisation_by_hand(small_tree):
    adv = compute_advantages(small_tree, {"r": R}, "depth")
    # depth 1: fused means 1.5 and 4; unbiased std of two values = |d| / sqrt 2
    assert adv[1].item() == pytest.approx(-1 / math.sqrt(2), abs=1e-6)
    assert adv[2].item() == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    m, s = 2.75, math.sqrt((1.75**2 + 0.75**2 + 0.25**2 + 2.25**2) / 3)
    assert adv[3:].tolist() == pytest.approx([(r - m) / s for r in R.tolist()], abs=1e-6)
    assert adv[0] == 0  # the root has no edge


def test_mean_fusion_by_hand(small_tree):
    assert fuse(small_tree, R, "mean").tolist() == pytest.approx([2.75, 1.5, 4, 1, 2, 3, 5])


def test_child_softmax_fusion_by_hand(small_tree):
    small_tree.log_prob = torch.tensor([0, 0.0, math.log(3), 0, math.log(3), math.log(2), 0])
    r = fuse(small_tree, R, "child_softmax", alpha=1.0)
    n1 = 0.25 * 1 + 0.75 * 2  # children 3, 4 with weights 1:3
    n2 = 2 / 3 * 3 + 1 / 3 * 5  # children 5, 6 with weights 2:1
    assert r[1].item() == pytest.approx(n1)
    assert r[2].item() == pytest.approx(n2)
    assert r[0].item() == pytest.approx(0.25 * n1 + 0.75 * n2)


def test_path_probability_fusion_by_hand(small_tree):
    lp = [0, 0.0, math.log(3), 0, math.log(3), math.log(2), 0]
    small_tree.log_prob = torch.tensor(lp)
    r = fuse(small_tree, R, "path", alpha=1.0)
    w = torch.tensor([1 * 1, 1 * 3, 3 * 2, 3 * 1], dtype=torch.float64)  # path products
    assert r[0].item() == pytest.approx(float((w * R.double()).sum() / w.sum()))
    assert r[1].item() == pytest.approx(0.25 * 1 + 0.75 * 2)
    # alpha = 0 path weighting is the uniform mean over leaves
    assert fuse(small_tree, R, "path", alpha=0.0).tolist() == pytest.approx(
        fuse(small_tree, R, "mean").tolist())


def test_group_rule_unbiased_std_and_clamp(small_tree):
    adv = compute_advantages(small_tree, {"r": R}, "group", clip=1.0)
    m, s = 2.75, R.std().item()
    assert adv[3:].tolist() == pytest.approx([max(min((r - m) / s, 1), -1) for r in R.tolist()],
                                             abs=1e-6)


def test_prompt_mean_global_std():
    pol = GaussianPolicy(dim=2)
    plan = build_plan("flow_grpo", num_steps=2, group_size=2)
    tree = rollout(pol, pol.encode(["a", "b"]), plan, generator=torch.Generator())
    adv = compute_advantages(tree, {"r": R}, "prompt_global_std")
    g = R.double().std(unbiased=False).item()
    expect = [(1 - 1.5) / (g + 1e-4), (2 - 1.5) / (g + 1e-4), (3 - 4) / (g + 1e-4),
              (5 - 4) / (g + 1e-4)]
    assert adv[tree.leaf_ids].tolist() == pytest.approx(expect, rel=1e-5)


def test_multi_reward_combinations(small_tree):
    r2 = torch.tensor([4.0, 1.0, 1.0, 2.0])
    rs = compute_advantages(small_tree, {"a": R, "b": r2}, "group", {"a": 1.0, "b": 2.0})
    ref = compute_advantages(small_tree, {"x": R + 2 * r2}, "group")
    torch.testing.assert_close(rs, ref)
    asum = compute_advantages(small_tree, {"a": R, "b": r2}, "group", {"a": 1.0, "b": 2.0},
                              combine="advantage_sum", clip=100)
    ref2 = (compute_advantages(small_tree, {"a": R}, "group", clip=100)
            + 2 * compute_advantages(small_tree, {"b": r2}, "group", clip=100))
    torch.testing.assert_close(asum, ref2)
    with pytest.raises(ValueError, match="no weight"):
        compute_advantages(small_tree, {"a": R, "b": r2}, "group", {"a": 1.0})


def test_g2rpo_multi_granularity_sum_by_hand():
    pol = GaussianPolicy(dim=2)
    plan = build_plan("g2rpo", num_steps=5, group_size=2, split_steps=(1,),
                      granularities=(1, 2))
    tree = rollout(pol, pol.encode(["a"]), plan, generator=torch.Generator())
    lids, lane = tree.leaf_ids, tree.lane[tree.leaf_ids]
    r = torch.arange(len(lids), dtype=torch.float32) ** 2
    adv = g2rpo_advantage(tree, r)
    kids = (tree.sde).nonzero().squeeze(1)
    assert len(kids) == 2
    from branchgrpo.engine.advantages import sde_ancestor

    anc = sde_ancestor(tree)[lids]
    total = 0.0
    for g in lane[anc >= 0].unique().tolist():
        vals = [r[(anc == k) & (lane == g)].item() for k in kids.tolist()]
        m, s = sum(vals) / 2, abs(vals[0] - vals[1]) / math.sqrt(2)
        total += (vals[0] - m) / (s + 1e-8)
    assert adv[kids[0]].item() == pytest.approx(total, abs=1e-5)
    assert adv[kids[1]].item() == pytest.approx(-total, abs=1e-5)
    assert int((anc < 0).sum()) == 1  # the anchor leaf is logged, not used


def test_rule_plan_mismatches_and_nan_rewards(small_tree):
    with pytest.raises(ValueError, match="one stochastic step per path"):
        g2rpo_advantage(small_tree, R)
    pol = GaussianPolicy(dim=2)
    single = build_plan("branch", num_steps=2, split_steps=(0,), branch_factor=1)
    t1 = rollout(pol, pol.encode(["a"]), single, generator=torch.Generator())
    with pytest.raises(ValueError, match="only 1 leaf"):
        compute_advantages(t1, {"r": torch.ones(1)}, "group")
    with pytest.raises(RewardValueError, match="reward 'hps'.*1 non-finite"):
        compute_advantages(small_tree, {"hps": torch.tensor([1, float("nan"), 2, 3])})
    with pytest.raises(ValueError, match="one reward per leaf"):
        compute_advantages(small_tree, {"r": torch.ones(3)})


def test_normalize_zero_std_groups_and_stats(small_tree):
    out = normalize(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0, 0, 1]), min_std=1e-6)
    assert out.tolist() == [0, 0, 0]
    assert zero_std_fraction(small_tree, torch.ones(4)) == 1.0
    assert zero_std_fraction(small_tree, R) == 0.0

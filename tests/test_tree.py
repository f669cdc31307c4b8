import json

import pytest
import torch

from branchgrpo.engine.advantages import compute_advantages
from branchgrpo.engine.methods import METHODS
from branchgrpo.engine.plans import PLANS, build_plan
from branchgrpo.engine.schedule import shifted
from branchgrpo.engine.sde import log_prob
from branchgrpo.engine.tree import Fork, Lane, RolloutPlan, chain_plan, edge_log_prob, rollout
from branchgrpo.models.analytic import GaussianPolicy
from testlib import cli

SMALL = {
    "dance": {"num_steps": 6, "group_size": 3},
    "flow_grpo": {"num_steps": 6, "group_size": 3},
    "mix": {"num_steps": 8, "group_size": 3, "window": 2, "iteration": 30},
    "mix_flash": {"num_steps": 10, "group_size": 3, "window": 2, "iteration": 25},
    "g2rpo": {"num_steps": 6, "group_size": 3, "split_steps": (0, 2), "granularities": (1, 2)},
    "branch": {"num_steps": 6, "split_steps": (0, 2), "branch_factor": 3,
               "split_noise_scale": 2.0},
    "branch_mix": {"num_steps": 6, "split_steps": (0, 3), "mix_window": 2, "mix_stride": 4},
    "branch_flash": {"num_steps": 10, "split_steps": (0, 3), "mix_window": 2,
                     "compression": 0.6},
}

# SDE (trained) edges per tree of each SMALL plan, from the plan arithmetic:
SDE_EDGES = {
    "dance": 3 * 6,  # x_T split into G = 3 at step 0, then SDE at all 6 steps of each chain
    "flow_grpo": 3 * 6,  # G = 3 roots, SDE at all 6 steps
    # window start l = (30 // 25) % ((8 - 2) + 1) = 1, W = {1, 2}: split into 3 at step 1,
    # SDE at steps 1 and 2 only (ODE at 0 and 3..7)
    "mix": 3 * 2,
    # l = (25 // 20) % 9 = 1, W = {1, 2}; DPM-Solver++ after it
    "mix_flash": 3 * 2,
    "g2rpo": 2 * 3,  # one SDE step into G = 3 children at each of the 2 split steps
    # K = 3 at steps 0 and 2: 3 (step 0) + 3 (step 1) + 9 (step 2) + 3 x 9 (steps 3-5)
    "branch": 3 + 3 + 9 + 27,
    # K = 2 at 0 and 3; SDE iff i % 4 < 2 or a split: steps 0, 1 (2 nodes), 3, 4, 5 (4 nodes)
    "branch_mix": 2 + 2 + 4 + 4 + 4,
    # K = 2 at 0 and 3, SDE at {0, 1} and the splits; ODE at 2; after step 3 the flash tail
    # (int(7 x 0.6) = 4 points: Euler, then DPM-Solver++ twice)
    "branch_flash": 2 + 2 + 4,
}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def policy():
    return GaussianPolicy(dim=6, mean=0.3, std=0.8, prompt_scale=0.5)


def test_bench_nfe_json_gives_the_published_counts(capsys):
    out = cli(capsys, "bench", "nfe", "--json")[1]
    rows = {r["method"]: r for r in json.loads(out)}
    assert (rows["branch"]["forwards"], rows["branch"]["edges"]) == (203, 218)
    assert rows["branch_depth"]["trained_edges"] == 138
    assert rows["branch_width"]["trained_edges"] == 138
    assert rows["branch"]["forwards_per_leaf"] == pytest.approx(12.6875)
    assert rows["flow_grpo"]["forwards"] == 192
    assert rows["dance"]["forwards"] == 181
    assert rows["dance"]["trained_edges"] == 12 * 9  # int(15 * 0.6) random steps per sample
    assert rows["branch_mix"]["trained_edges"] == 34
    assert rows["mix_flash"]["forwards"] == 1 + 12 * (3 + 7)  # l = 0: 4 SDE + 7 DPM steps


@pytest.mark.parametrize("method", sorted(SMALL))
def test_batched_frontier_equals_per_node(policy, method):
    plan = build_plan(method, **SMALL[method])
    cond = policy.encode(["a", "b"])
    t1 = rollout(policy, cond, plan, generator=_gen(), max_batch=256)
    t2 = rollout(policy, cond, plan, generator=_gen(), max_batch=1)
    for name in ("latents", "parent", "log_prob", "leaf_x0", "group", "sde"):
        assert torch.equal(getattr(t1, name), getattr(t2, name)), name
    assert t1.forwards == t2.forwards


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", sorted(SMALL))
def test_ratio_is_exactly_one_before_update(policy, method, dtype):
    plan = build_plan(method, **SMALL[method])
    cond = policy.encode(["a", "b"])
    tree = rollout(policy, cond, plan, generator=_gen(), storage_dtype=dtype)
    assert tree.latents.dtype == dtype
    edges = tree.edges()
    assert len(edges) == 2 * SDE_EDGES[method]  # two trees
    assert torch.bincount(edges.group).tolist() == [SDE_EDGES[method]] * 2
    with torch.no_grad():
        lp, *_ = edge_log_prob(policy, edges, cond, plan, max_batch=5, storage_dtype=dtype)
    assert torch.equal(lp, edges.old_log_prob)


def test_split_log_prob_uses_the_std_actually_sampled_with(policy):
    plan = build_plan("branch", num_steps=4, split_steps=(1,), branch_factor=2,
                      split_noise_scale=4.0)
    cond = policy.encode(["a"])
    tree = rollout(policy, cond, plan, generator=_gen(), keep_mean=True)
    split = (tree.grid == 2).nonzero().squeeze(1)  # children of the step-1 split
    assert torch.all(tree.noise_scale[split] == 4.0)
    sig = tree.sigmas
    std = 0.3 * (sig[1] - sig[2]).sqrt() * 4.0
    ref = log_prob(tree.latents[split], tree.old_mean[split], std.expand(len(split)))
    torch.testing.assert_close(tree.log_prob[split], ref)


def test_split_only_at_root_equals_flat_grpo(policy):
    g, t = 4, 6
    cond = policy.encode(["a", "b"])
    flat = build_plan("dance", num_steps=t, group_size=g)
    tree_plan = build_plan("branch", num_steps=t, split_steps=(0,), branch_factor=g)
    f = rollout(policy, cond, flat, generator=_gen())
    b = rollout(policy, cond, tree_plan, generator=_gen())
    assert torch.equal(f.latents, b.latents) and torch.equal(f.parent, b.parent)
    r = {"r": f.leaf_x0.sum(1)}
    a_flat = compute_advantages(f, r, "group")
    a_tree = compute_advantages(b, r, "depth")
    torch.testing.assert_close(a_flat, a_tree, atol=1e-6, rtol=0)
    ef, eb = f.edges(adv=a_flat), b.edges(adv=a_tree)
    assert torch.equal(ef.child, eb.child) and torch.equal(ef.step, eb.step)


def _leaf_sample(policy, plan, n, seed):
    cond = {"shift": torch.zeros(n, policy.latent_shape[0])}
    tree = rollout(policy, cond, plan, generator=_gen(seed))
    leaves = tree.latents[tree.leaf_ids].reshape(n, -1, policy.latent_shape[0])
    pick = torch.randint(0, leaves.shape[1], (n,), generator=_gen(seed + 1))
    return leaves[torch.arange(n), pick]  # one leaf per tree: i.i.d. across trees


@pytest.mark.parametrize("lam,same", [(1.0, True), (4.0, False)])
def test_leaf_marginals_match_sequential_sampling_lemma2(lam, same):
    # BranchGRPO Lemma 2: with lambda = 1 each leaf is distributed as a sequential sample
    policy = GaussianPolicy(dim=16, mean=0.5, std=1.5)
    n = 1000
    seq = chain_plan("seq", shifted(20), [1] * 20, ["sde"] * 20, kernel="dance", level=0.3)
    xs = _leaf_sample(policy, seq, n, 10)
    plan = build_plan("branch", split_noise_scale=lam, shared_noise=False)
    xt = _leaf_sample(policy, plan, n, 20)
    z_mean = (xt.mean(0) - xs.mean(0)) / (xt.var(0) / n + xs.var(0) / n).sqrt()
    var_ratio = (xt.var(0) / xs.var(0)).mean()  # se of the mean over 16 dims ~ 0.016
    cov_gap = (torch.cov(xt.T) - torch.cov(xs.T)).abs().mean() / torch.cov(xs.T).diag().mean()
    if same:
        assert z_mean.abs().max() < 4.0
        assert abs(var_ratio - 1) < 0.06
        assert cov_gap < 0.06
    else:
        assert var_ratio > 1.08  # lambda = 4 inflates the leaf variance: detected


def test_every_plan_has_a_registered_method():
    used = {METHODS.get(m).plan for m in METHODS.names()}
    assert used == set(PLANS.names())


def test_bad_plans_raise_clear_errors():
    with pytest.raises(ValueError, match=r"split steps must lie in \[0, 19\]"):
        build_plan("branch", split_steps=(0, 20))
    with pytest.raises(ValueError, match="branch_factor must be >= 1"):
        build_plan("branch", branch_factor=0)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        build_plan("dance", group_size=1)
    with pytest.raises(ValueError, match="no parameter"):
        build_plan("dance", split_steps=(1,))
    with pytest.raises(KeyError, match="Did you mean 'branch'"):
        build_plan("brnch")
    with pytest.raises(ValueError, match="g2rpo split_steps"):
        build_plan("g2rpo", num_steps=6, split_steps=(5,))
    lane = Lane((0, 1, 2), ((Fork(1, "sde", 1),), (Fork(),)))
    with pytest.raises(ValueError, match="missing lane"):
        RolloutPlan("bad", (1.0, 0.5, 0.0), (lane,))
    with pytest.raises(ValueError, match="branch factor must be >= 1"):
        chain_plan("bad", shifted(2), [0, 1], ["sde", "sde"])
    with pytest.raises(ValueError, match="sigmas must decrease"):
        chain_plan("bad", (1.0, 1.0, 0.0), [1, 1], ["sde", "sde"])


def test_g2rpo_tree_shares_the_first_tail_step(policy):
    plan = build_plan("g2rpo", num_steps=6, group_size=2, split_steps=(0,),
                      granularities=(1, 2))
    tree = rollout(policy, policy.encode(["a"]), plan, generator=_gen())
    # anchor: 6 forwards; each child: forward at 1, shared forward at 2, then g=1: 3,4,5;
    # g=2: grid 4 -> 6 (one forward at 4)
    assert tree.forwards == 6 + 2 * (1 + 1 + 3 + 1)
    assert int(tree.leaf.sum()) == 1 + 2 * 2
    assert int(tree.sde.sum()) == 2


@pytest.mark.parametrize("split", [3, 4])
def test_g2rpo_late_splits_give_every_granularity_its_leaves(policy, split):
    """A split near the end (k + 2 + g > T) leaves a granularity's tail only the fine first
    step (k = 3, g = 2, T = 6: sigma[4] -> sigma[5]) or nothing else (k = T - 2): each
    granularity still scores its G children, taking the leaf from the shared first step,
    with no extra forward."""
    plan = build_plan("g2rpo", num_steps=6, group_size=2, split_steps=(split,),
                      granularities=(1, 2))
    tree = rollout(policy, policy.encode(["a"]), plan, generator=_gen())
    leaves = tree.leaf_ids
    lanes = tree.lane[leaves]
    assert [int((lanes == ln).sum()) for ln in (0, 1, 2)] == [1, 2, 2]
    tail = 6 - split - 1  # fine tail forwards per child, the g = 2 leaf adds none
    assert tree.forwards == 6 + 2 * tail

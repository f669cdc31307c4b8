"""The flash tree and the sibling-relative advantage (docs/algorithms.md §15): counts, the
high-order check, leaf marginals, the rule by hand, and its credit on a one-split tree."""

import pytest
import torch

from branchgrpo.bench.credit import measure
from branchgrpo.bench.nfe import nfe_table
from branchgrpo.engine.advantages import compute_advantages, sibling_advantage
from branchgrpo.engine.plans import build_plan, check_high_order
from branchgrpo.engine.tree import chain_plan, rollout
from branchgrpo.models.analytic import GaussianPolicy
from branchgrpo.rewards import RewardSet


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def policy():
    return GaussianPolicy(dim=4, mean=0.3, std=0.8, prompt_scale=0.5)


def _sde_pairs(plan):
    """(sigma, sigma_next, branch factor) of every SDE step of a one-lane plan."""
    lane = plan.lanes[0]
    return [(plan.sigmas[g], plan.sigmas[lane.track[p + 1]], fs[0].count)
            for p, (g, fs) in enumerate(zip(lane.track, lane.forks, strict=False))
            if fs[0].solver == "sde"]


def test_flash_tree_costs_under_0_6_of_branch_mix_with_the_same_trained_steps():
    rows = {r["method"]: r for r in nfe_table(["branch_mix", "branch_mix_flash",
                                               "branch_sibling"])}
    mix, flash = rows["branch_mix"], rows["branch_mix_flash"]
    # 1 + 2 x 3 + 4 x 3 + 8 x 3 + 16 x 3: int(11 x 0.4) = 4 tail points, 3 forwards per leaf
    assert flash["forwards"] == 91 and mix["forwards"] == 203
    assert flash["forwards"] <= 0.6 * mix["forwards"]
    assert flash["trained_edges"] == mix["trained_edges"] == 34
    assert flash["leaves"] == mix["leaves"] == 16
    # the sibling tree: K 4 at steps 0 and 2 -> 4 + 16 trained edges; 1 + 4 + 4 + 16 x 3
    assert rows["branch_sibling"]["forwards"] == 57
    assert rows["branch_sibling"]["trained_edges"] == 20
    assert rows["branch_sibling"]["forwards"] / 20 <= 3


def test_every_sde_step_of_the_flash_tree_is_branch_mixs_step():
    mix = build_plan("branch_mix")
    flash = build_plan("branch_flash")
    assert _sde_pairs(flash) == _sde_pairs(mix)
    solvers = [fs[0].solver for fs in flash.lanes[0].forks]
    assert solvers[10:] == ["ode", "dpm2", "dpm2"]  # tail after the last split (step 9)
    assert flash.sigmas[:11] == mix.sigmas[:11] and flash.sigmas[-1] == 0.0


def test_high_order_steps_may_not_cross_a_split_or_an_sde_step():
    sig = (1.0, 0.8, 0.6, 0.4, 0.2, 0.0)
    with pytest.raises(ValueError, match="right after a stochastic step"):
        check_high_order(chain_plan("x", sig, [2, 1, 1, 1, 1], ["sde", "dpm2", "dpm2",
                                                                "dpm2", "dpm2"]))
    with pytest.raises(ValueError, match="before the last SDE step"):
        check_high_order(chain_plan("x", sig, [2, 1, 1, 1, 1], ["sde", "ode", "dpm2", "sde",
                                                                "ode"]))
    with pytest.raises(ValueError, match="before the last SDE step or split"):
        check_high_order(chain_plan("x", sig, [1, 1, 1, 2, 1], ["ode", "ode", "dpm2", "ode",
                                                                "ode"]))
    check_high_order(chain_plan("ok", sig, [2, 1, 1, 1, 1], ["sde", "ode", "ode", "dpm2",
                                                             "dpm2"]))
    # MixGRPO-Flash as published takes its first DPM step's history across the window
    with pytest.raises(ValueError, match="right after"):
        check_high_order(build_plan("mix_flash"))
    with pytest.raises(ValueError, match="no ODE tail"):
        build_plan("branch_flash", num_steps=6, split_steps=(0, 5))
    with pytest.raises(ValueError, match="schedule: shifted"):
        build_plan("branch_flash", schedule="flux_dynamic")


def _leaves(policy, plan, n, seed):
    cond = {"shift": torch.zeros(n, policy.latent_shape[0])}
    tree = rollout(policy, cond, plan, generator=_gen(seed))
    leaves = tree.latents[tree.leaf_ids].reshape(n, -1, policy.latent_shape[0])
    pick = torch.randint(0, leaves.shape[1], (n,), generator=_gen(seed + 1))
    return leaves[torch.arange(n), pick]  # one leaf per tree: i.i.d. across trees


def test_flash_tree_leaves_are_distributed_as_its_one_chain_lemma2():
    """lambda 1: each leaf of the branched flash tree is distributed as a sample of the same
    plan with branch factor 1 (same grid, same solvers)."""
    policy = GaussianPolicy(dim=16, mean=0.5, std=1.5)
    kw = {"split_steps": (0, 2), "mix_window": 0, "kernel": "flow", "level": 0.7,
          "compression": 0.25, "shared_noise": False}
    n = 1000
    xs = _leaves(policy, build_plan("branch_flash", branch_factor=1, **kw), n, 10)
    xt = _leaves(policy, build_plan("branch_flash", branch_factor=4, **kw), n, 20)
    z = (xt.mean(0) - xs.mean(0)) / (xt.var(0) / n + xs.var(0) / n).sqrt()
    assert z.abs().max() < 4.0
    assert abs((xt.var(0) / xs.var(0)).mean() - 1) < 0.06


def test_sibling_advantage_by_hand(policy):
    """Root -> 2 SDE children -> 2 SDE children each (leaves): nodes 0 | 1 2 | 3 4 5 6."""
    plan = build_plan("branch_flash", num_steps=4, split_steps=(0, 1), branch_factor=2,
                      mix_window=0, compression=0.7)
    tree = rollout(policy, policy.encode(["p"]), plan, generator=_gen())
    depth2 = (tree.depth == 2).nonzero().squeeze(1)
    assert tree.parent[depth2].tolist() == [1, 1, 2, 2]
    r = torch.tensor([1.0, 2.0, 3.0, 5.0])
    adv = sibling_advantage(tree, r)
    s = float(r.std())
    # depth 1: fused 1.5 vs 4 (leave-one-out: the one sibling); depth 2: within each pair
    assert adv[1:3].tolist() == pytest.approx([-2.5 / s, 2.5 / s], abs=1e-6)
    assert adv[depth2].tolist() == pytest.approx([-1 / s, 1 / s, -2 / s, 2 / s], abs=1e-6)
    assert adv[0] == 0 and bool((adv[~tree.sde] == 0).all())  # root, ODE edges


def test_sibling_advantage_gives_single_child_sde_edges_zero(policy):
    plan = build_plan("branch_flash", num_steps=6, split_steps=(0,), branch_factor=3,
                      mix_window=2, compression=0.6)
    tree = rollout(policy, policy.encode(["p", "q"]), plan, generator=_gen())
    adv = compute_advantages(tree, {"r": tree.leaf_x0.sum(1)}, "sibling")
    lone = tree.sde & (tree.grid == 2)  # step 1 is SDE with one child per node
    assert int(lone.sum()) == 6 and bool((adv[lone] == 0).all())
    assert bool((adv[tree.sde & (tree.grid == 1)] != 0).all())


def test_one_split_with_deterministic_tails_gets_exact_sibling_credit(policy):
    """One split into K children, ODE after it: R(child) is its leaf's reward and
    V(parent) is shared by the group, so the sibling advantage is affine in A* (corr 1)."""
    rewards = RewardSet({"r": 1.0}, rewards={"r": lambda m, p: -(m.float() - 0.5).pow(2)
                                             .mean(1)})
    kw = {"num_steps": 6, "split_steps": (2,), "branch_factor": 5, "mix_window": 0,
          "compression": 0.6}
    r = measure(policy, ["a"], "branch_sibling", kw, rewards, ("sibling", "all", {}), {}, k=4)
    assert r["edges"] == 5
    assert r["corr"] == pytest.approx(1.0, abs=1e-6)


def test_cli_trains_the_sibling_tree(tmp_path, cache_dir, capsys):
    from testlib import cli, small_args, train_rows

    run = tmp_path / "run"  # (one held-out sample: the evaluation is not what is tested)
    cli(capsys, "train", *small_args(cache_dir, run, "rollout.method=branch_sibling",
                                     "train.iterations=1", "data.eval_samples=1"))
    (r,) = train_rows(run)
    assert r["ratio/first"] == 1.0
    # 2 trees, K 4 at steps 0 and 1 of T 4, one tail step: 1 + 4 + 16 forwards, 4 + 16 SDE
    # edges, 16 ODE tail edges each
    assert (r["tree/forwards"], r["tree/trained_edges"], r["tree/edges"]) == (42, 40, 72)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sibling_preset_batched_equals_per_node_and_ratio_is_one(policy, dtype):
    """The invariants of tests/test_tree.py on the branch_sibling preset's own plan (Flow-SDE
    only at the splits, K 4, the DPM tail), which SMALL's branch_flash entry does not cover."""
    from branchgrpo.engine.methods import METHODS
    from branchgrpo.engine.tree import edge_log_prob

    m = METHODS.get("branch_sibling")
    plan = build_plan(m.plan, **m.plan_kw)
    cond = policy.encode(["a", "b"])
    t1 = rollout(policy, cond, plan, generator=_gen(), storage_dtype=dtype)
    t2 = rollout(policy, cond, plan, generator=_gen(), storage_dtype=dtype, max_batch=1)
    for name in ("latents", "parent", "log_prob", "leaf_x0"):
        assert torch.equal(getattr(t1, name), getattr(t2, name)), name
    edges = t1.edges()
    assert len(edges) == 2 * 20
    with torch.no_grad():
        lp, *_ = edge_log_prob(policy, edges, cond, plan, max_batch=7, storage_dtype=dtype)
    assert torch.equal(lp, edges.old_log_prob)

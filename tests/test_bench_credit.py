import json
import math

import pytest
import torch

from branchgrpo.bench.credit import continuation, credit_stats, measure, node_values
from branchgrpo.engine.plans import build_plan
from branchgrpo.engine.tree import rollout
from branchgrpo.models.analytic import GaussianPolicy
from branchgrpo.rewards import RewardSet
from plot_testlib import LEGEND_SWATCH, curve_pixels
from testlib import cli

PROMPTS = ["a", "b"]


def _reward(media, prompts):
    return -(media.float() - 0.5).pow(2).mean(1)


@pytest.fixture
def policy():
    return GaussianPolicy(dim=4, mean=0.3, std=0.8, prompt_scale=0.5)


@pytest.fixture
def rewards():
    return RewardSet({"r": 1.0}, rewards={"r": _reward})


def test_continuation_takes_the_trained_sde_fork_then_the_childs_lane():
    g = build_plan("g2rpo", num_steps=6, group_size=3, split_steps=(1, 3), granularities=(1, 2))
    # from the anchor at a split step: the SDE step into the fine tail, then ODE to the end
    assert continuation(g, 0, 1).solvers == ("sde", "ode", "ode", "ode", "ode")
    assert continuation(g, 0, 1).grids == (2, 3, 4, 5, 6)
    # from the root: ODE along the anchor up to the first split, which is stochastic
    assert continuation(g, 0, 0).solvers[:2] == ("ode", "sde")
    b = build_plan("branch", num_steps=6, split_steps=(0, 2), branch_factor=2,
                   split_noise_scale=2.0)
    c = continuation(b, 0, 0)
    assert c.solvers == ("sde",) * 6 and c.scales == (2.0, 1.0, 2.0, 1.0, 1.0, 1.0)


def test_the_last_step_earns_nothing_the_image_is_its_parents_prediction(policy, rewards):
    plan = build_plan("dance", num_steps=5, group_size=3)
    cond = policy.encode(PROMPTS)
    tree = rollout(policy, cond, plan, generator=torch.Generator().manual_seed(0))
    leaves = tree.leaf_ids
    nodes = torch.cat([leaves, tree.parent[leaves]])
    leaf_r = _reward(tree.leaf_x0, None)
    va, vb = node_values(policy, cond, PROMPTS, plan, tree, nodes, leaf_r,
                         lambda m, p, g: _reward(m, p), 4, torch.Generator().manual_seed(1))
    n = len(leaves)
    assert torch.equal(va[:n], leaf_r) and torch.equal(vb[:n], leaf_r)
    torch.testing.assert_close(va[n:], leaf_r)  # V(parent) = V(leaf): A* of the last step = 0
    torch.testing.assert_close(vb[n:], leaf_r)


def test_one_stochastic_step_per_group_gets_exact_credit(policy, rewards):
    """G2RPO with one split step and one granularity: every reward difference in the group is
    that step's doing, so its advantage is an affine function of A* (corr 1), whatever the
    Monte-Carlo noise of V(anchor), which all edges share."""
    kw = {"num_steps": 6, "group_size": 5, "split_steps": (2,), "granularities": (1,)}
    r = measure(policy, PROMPTS[:1], "g2rpo", kw, rewards, ("g2rpo", "all", {}), {}, k=4)
    assert r["edges"] == 5
    assert r["corr"] == pytest.approx(1.0, abs=1e-6)


def test_trajectory_wide_advantages_give_each_step_diluted_credit(policy, rewards):
    """DanceGRPO-style: every step of a chain gets the whole trajectory's normalised reward,
    most of which other steps caused; the correlation with A* is far below G2RPO's 1."""
    r = measure(policy, PROMPTS, "dance", {"num_steps": 6, "group_size": 6}, rewards,
                ("group", "all", {}), {}, k=16)
    assert r["edges"] == 2 * 6 * 6
    assert 0.0 < r["corr"] < 0.8
    assert r["by_step"][5] != r["by_step"][5]  # nan: A* is 0 at the last step


def test_bench_credit_cli_writes_its_report(tmp_path, capsys):
    out = tmp_path / "credit"
    cli(capsys, "bench", "credit", "--methods", "dance_full,branch_depth", "--prompts", "1",
        "--continuations", "2", "--out", str(out), "model.pretrain_steps=5",
        f"model.cache_dir={tmp_path / 'cache'}")
    result = json.loads((out / "credit.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["dance_full", "branch_depth"]
    assert [r["edges"] for r in result["rows"]] == [304, 138]  # the methods' trained edges
    md = (out / "credit.md").read_text()
    for r in result["rows"]:  # the table shows the measured correlations, by step too
        assert f"| {r['method']} | {r['edges']} | {r['corr']:.3f} |" in md
    # dance_full trains one edge per leaf (16) at each of the 19 SDE steps: 304 edges
    assert set(result["rows"][0]["by_step"]) == {str(t) for t in range(304 // 16)}
    # one curve per method, not only its legend entry
    assert min(curve_pixels(out / "credit_by_step.png", 2)) > 3 * LEGEND_SWATCH


def test_corr_is_the_pearson_correlation_of_the_advantage_with_the_true_one():
    """corr(A, A*) is +1 for an increasing affine A, -1 for a decreasing one, ~0 for noise;
    corr_corrected divides by the square root of the split-half reliability; by step too."""
    g = torch.Generator().manual_seed(0)
    true = torch.randn(400, generator=g, dtype=torch.float64)
    a, b = true + 0.3 * torch.randn(400, generator=g, dtype=torch.float64), true.clone()
    step = torch.arange(400) % 4
    exact = credit_stats(2 * (a + b) / 2 + 1, a, b, step)
    assert exact["corr"] == pytest.approx(1.0) and exact["by_step"][3] == pytest.approx(1.0)
    assert credit_stats(-(a + b) / 2, a, b, step)["corr"] == pytest.approx(-1.0)
    noise = credit_stats(torch.randn(400, generator=g, dtype=torch.float64), a, b, step)
    assert abs(noise["corr"]) < 0.15
    half = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert exact["reliability"] == pytest.approx(2 * half / (1 + half))
    assert exact["corr_corrected"] == pytest.approx(1.0 / math.sqrt(exact["reliability"]))

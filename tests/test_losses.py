import pytest
import torch

from branchgrpo.losses import clipped_surrogate, guard_log_ratio, kl_v, kl_x, policy_loss
from branchgrpo.models.analytic import GaussianPolicy
from branchgrpo.plans import build_plan
from branchgrpo.sde import log_prob
from branchgrpo.tree import edge_log_prob, rollout


def test_clipped_surrogate_by_hand():
    lr = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    out = clipped_surrogate(lr, adv, 0.2)
    # A>0: max(-1.5, -1.2) = -1.2; max(-0.5, -0.8) = -0.5; A<0: max(1.5, 1.2) = 1.5; max(.5,.8)
    assert out.tolist() == pytest.approx([-1.2, -0.5, 1.5, 0.8])


def test_guard_log_ratio_is_noise_projection():
    g = torch.Generator().manual_seed(0)
    old_mu, new_mu = torch.randn(3, 50, generator=g), torch.randn(3, 50, generator=g)
    std = torch.tensor([0.1, 0.3, 0.7])
    xi = torch.randn(3, 50, generator=g)
    x = old_mu + std[:, None] * xi
    lr = guard_log_ratio(log_prob(x, new_mu, std), log_prob(x, old_mu, std), new_mu, old_mu, std)
    torch.testing.assert_close(lr, (xi * (new_mu - old_mu)).mean(1), atol=1e-4, rtol=1e-4)


def test_kl_estimators():
    a, b = torch.zeros(2, 3), torch.ones(2, 3) * 2
    assert kl_x(a, b).tolist() == [4.0, 4.0] and kl_v(a, b).tolist() == [4.0, 4.0]


def test_policy_loss_stats_and_update_direction():
    torch.manual_seed(0)
    pol = GaussianPolicy(dim=4)
    cond = pol.encode(["a"])
    plan = build_plan("dance", num_steps=4, group_size=4)
    tree = rollout(pol, cond, plan, generator=torch.Generator().manual_seed(0))
    adv = torch.zeros(tree.num_nodes)
    adv[tree.edge_mask] = torch.linspace(-1, 1, int(tree.edge_mask.sum()))
    edges = tree.edges(adv=adv)
    lp, *_ = edge_log_prob(pol, edges, cond, plan)
    loss, stats = policy_loss(lp, edges.old_log_prob, edges.adv, 1e-3, step=edges.step)
    assert stats["ratio/mean"] == 1.0 and stats["ratio/clip_frac"] == 0.0
    assert stats["ratio/approx_kl"] == 0.0 and "ratio/step_03" in stats
    opt = torch.optim.SGD(pol.parameters(), lr=1e-2)
    loss.backward()
    opt.step()
    with torch.no_grad():
        lp2, *_ = edge_log_prob(pol, edges, cond, plan)
    # a policy-gradient step raises the log-prob of positive-advantage edges relative to the
    # negative ones
    d = lp2 - edges.old_log_prob
    assert (d * edges.adv).sum() > 0
    with pytest.raises(ValueError, match="clip_eps"):
        clipped_surrogate(lr := torch.zeros(1), torch.ones(1), 0.0)
    del lr

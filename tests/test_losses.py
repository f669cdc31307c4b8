import pytest
import torch

from branchgrpo.engine.losses import (
    KL_KINDS,
    clipped_surrogate,
    flow_grpo_kl_std,
    guard_log_ratio,
    kl_penalty,
    kl_v,
    kl_x,
    kl_x_flow_grpo,
    policy_loss,
)
from branchgrpo.engine.plans import build_plan
from branchgrpo.engine.sde import flow_sde, log_prob
from branchgrpo.engine.tree import edge_log_prob, rollout
from branchgrpo.models.analytic import GaussianPolicy


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


def test_kl_flow_grpo_by_hand_including_sigma_one():
    # a = 0.7. sigma 1 -> 0.75: the guard takes 1 - sigma_next = 0.25, s = 0.7 * 2 = 1.4;
    # sigma 0.5: s = 0.7; sigma 0.75: s^2 = 0.49 * 3 = 1.47.
    sigma, nxt = torch.tensor([1.0, 0.5, 0.75]), torch.tensor([0.75, 0.25, 0.5])
    assert flow_grpo_kl_std(sigma, nxt, 0.7).tolist() == pytest.approx([1.4, 0.7, 0.7 * 3**0.5])
    mean = torch.zeros(3, 2, 2)
    ref = torch.tensor([2.0, 1.0, 3.0]).view(3, 1, 1).expand(3, 2, 2)  # kl_x = 4, 1, 9
    kl = kl_x_flow_grpo(mean, ref, sigma, nxt, 0.7)
    assert kl.tolist() == pytest.approx([4 / 3.92, 1 / 0.98, 9 / 2.94])
    assert kl.tolist() == pytest.approx((kl_x(mean, ref) / (2 * flow_grpo_kl_std(sigma, nxt, 0.7)
                                                            ** 2)).tolist())


def test_kl_flow_grpo_std_is_the_flow_sde_std_without_sqrt_delta():
    sigma = torch.tensor([1.0, 0.9, 0.4, 0.1])
    nxt = torch.tensor([0.9, 0.4, 0.1, 0.0])
    x, v = torch.randn(4, 3), torch.randn(4, 3)
    _, std = flow_sde(v, x, sigma, nxt, level=0.7)
    torch.testing.assert_close(flow_grpo_kl_std(sigma, nxt, 0.7), std / (sigma - nxt).sqrt())


def test_kl_conversion_under_the_flow_sde_kernel():
    # docs/algorithms.md §9: kl_x = delta^2 c^2 kl_v, c = 1 + a^2 / 2 (sigma < 1), 1 at sigma = 1
    a = 0.7
    sigma, nxt = torch.tensor([1.0, 0.8, 0.3]), torch.tensor([0.8, 0.3, 0.1])
    g = torch.Generator().manual_seed(1)
    x, v, ref_v = (torch.randn(3, 6, generator=g) for _ in range(3))
    mean, _ = flow_sde(v, x, sigma, nxt, level=a)
    ref_mean, _ = flow_sde(ref_v, x, sigma, nxt, level=a)
    c = torch.tensor([1.0, 1 + a**2 / 2, 1 + a**2 / 2])
    factor = (sigma - nxt) ** 2 * c**2
    torch.testing.assert_close(kl_x(mean, ref_mean), factor * kl_v(v, ref_v))
    torch.testing.assert_close(kl_x_flow_grpo(mean, ref_mean, sigma, nxt, a),
                               factor / (2 * flow_grpo_kl_std(sigma, nxt, a) ** 2)
                               * kl_v(v, ref_v))


def test_kl_penalty_dispatch_and_errors():
    mean, ref = torch.zeros(2, 3), torch.ones(2, 3)
    v, ref_v = torch.zeros(2, 3), torch.full((2, 3), 3.0)
    sigma, nxt = torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.25])
    kw = dict(mean=mean, ref_mean=ref, v=v, ref_v=ref_v, sigma=sigma, sigma_next=nxt,
              kernel="flow", level=0.7)
    assert set(KL_KINDS) == {"x", "v", "x_flow_grpo"}
    assert kl_penalty("x", **kw).tolist() == [1.0, 1.0]
    assert kl_penalty("v", **kw).tolist() == [9.0, 9.0]
    torch.testing.assert_close(kl_penalty("x_flow_grpo", **kw),
                               kl_x_flow_grpo(mean, ref, sigma, nxt, 0.7))
    with pytest.raises(ValueError, match="rollout.kernel flow"):
        kl_penalty("x_flow_grpo", **(kw | {"kernel": "dance"}))
    with pytest.raises(ValueError, match="rollout.level"):
        kl_penalty("x_flow_grpo", **(kw | {"level": 0.0}))
    with pytest.raises(ValueError, match="train.kl_kind"):
        kl_penalty("k3", **kw)


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

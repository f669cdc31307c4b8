import math

import numpy as np
import pytest
import torch

from branchgrpo.engine.schedule import flux_dynamic, flux_mu, make_sigmas, shifted
from branchgrpo.engine.sde import KERNELS, cps_log_prob, dpm2, log_prob, ode


def _inputs(n=5, d=(3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *d, generator=g)
    v = torch.randn(n, *d, generator=g)
    sig = shifted(10)
    i = torch.tensor([0, 1, 3, 6, 9])[:n]
    return v, x, sig[i], sig[i + 1]


def test_log_prob_equals_torch_normal_mean_and_sum():
    g = torch.Generator().manual_seed(1)
    mean, x = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0])
    ref = torch.distributions.Normal(mean, std.view(-1, 1, 1)).log_prob(x)
    torch.testing.assert_close(log_prob(x, mean, std), ref.flatten(1).mean(1))
    torch.testing.assert_close(log_prob(x, mean, std, "sum"), ref.flatten(1).sum(1))
    with pytest.raises(ValueError, match="std > 0"):
        log_prob(x, mean, torch.zeros(4))


@pytest.mark.parametrize("kernel", ["dance", "flow", "cps"])
def test_zero_noise_kernel_equals_euler(kernel):
    v, x, s, n = _inputs()
    mean, std = KERNELS.get(kernel)(v, x, s, n, 0.0)
    torch.testing.assert_close(mean, ode(v, x, s, n)[0], atol=1e-6, rtol=1e-6)
    assert torch.all(std == 0)


def test_dance_mean_matches_published_score_form():
    # flux_step: mean = x + dsigma v - 0.5 eta^2 score dsigma, score = -(x - (1-s) x0)/s^2
    v, x, s, n = _inputs()
    eta = 0.3
    sc = s.view(-1, 1, 1)
    x0 = x - sc * v
    score = -(x - x0 * (1 - sc)) / sc**2
    dsig = (n - s).view(-1, 1, 1)
    ref = x + dsig * v + (-0.5 * eta**2 * score) * dsig
    mean, std = KERNELS.get("dance")(v, x, s, n, eta)
    torch.testing.assert_close(mean, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, eta * (s - n).sqrt())


def test_flow_sde_matches_flow_grpo_form_and_guards_sigma_one():
    v, x, s, n = _inputs()
    a = 0.7
    mean, std = KERNELS.get("flow")(v, x, s, n, a)
    sig_max = n[0]  # sigma == 1 only at row 0; Flow-GRPO uses sigmas[1] there
    s_t = torch.sqrt(s / (1 - torch.where(s == 1, sig_max, s))) * a
    dt = (n - s).view(-1, 1, 1)
    st, sc = s_t.view(-1, 1, 1), s.view(-1, 1, 1)
    ref = x * (1 + st**2 / (2 * sc) * dt) + v * (1 + st**2 * (1 - sc) / (2 * sc)) * dt
    torch.testing.assert_close(mean, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, s_t * (s - n).sqrt())
    assert s[0] == 1 and torch.isfinite(std).all()
    # the clamp-to-0.999 alternative is several times larger at sigma = 1 (docs/algorithms.md §13.4)
    clamped = a * math.sqrt(0.999 / 0.001) * math.sqrt(s[0] - n[0])
    assert clamped / std[0] > 5


def test_cps_std_and_surrogate_log_prob():
    v, x, s, n = _inputs()
    _, std = KERNELS.get("cps")(v, x, s, n, 0.8)
    torch.testing.assert_close(std, n * math.sin(0.8 * math.pi / 2))
    xn, mu = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.equal(cps_log_prob(xn, mu, torch.ones(2)), -torch.ones(2))


def test_kernel_rejects_increasing_sigma():
    v, x, s, n = _inputs()
    with pytest.raises(ValueError, match="decrease"):
        KERNELS.get("dance")(v, x, n, s, 0.3)


def test_first_order_dpm_equals_euler_and_second_order_uses_history():
    v, x, s, n = _inputs(n=4)
    s, n = s[1:], n[1:]
    v, x = v[1:], x[1:]
    torch.testing.assert_close(dpm2(v, x, s, n, None, None), ode(v, x, s, n)[0],
                               atol=1e-5, rtol=1e-5)
    prev = torch.randn_like(x)
    assert not torch.allclose(dpm2(v, x, s, n, prev, s + 0.05), ode(v, x, s, n)[0])
    # a step to sigma = 0 lands on x0_hat
    z = torch.zeros_like(s)
    torch.testing.assert_close(dpm2(v, x, s, z, prev, s + 0.05), x - s.view(-1, 1, 1) * v)


def test_shifted_schedule_endpoints_and_formula():
    sig = shifted(4, 3.0)
    assert sig[0] == 1 and sig[-1] == 0 and torch.all(sig[1:] < sig[:-1])
    t = 0.75
    assert sig[1].item() == pytest.approx(3 * t / (1 + 2 * t))


def test_flux_dynamic_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                          max_shift=1.15, base_image_seq_len=256,
                                          max_image_seq_len=4096)
    t, seq = 8, 1024
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / t, t), mu=flux_mu(seq))
    torch.testing.assert_close(flux_dynamic(t, seq), sch.sigmas.float(), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_sigmas("cosine", 4)

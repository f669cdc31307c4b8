"""Stateless step kernels and the Gaussian log-prob of a transition (docs/algorithms.md §1.2-1.3).

Every kernel maps one step ``sigma -> sigma_next`` (sigma > sigma_next) to the Gaussian
transition ``x_next ~ N(mean, std^2 I)``. All math runs in fp32. Notation: ``delta = sigma -
sigma_next > 0``; model predictions ``x0_hat = x - sigma v`` and ``x1_hat = x + (1 - sigma) v``.

- ode:   std = 0; mean = x - delta v (Euler)
- dance: std = eta sqrt(delta); mean = x - delta [v + eta^2 / (2 sigma) x1_hat]
- flow:  std = s sqrt(delta), s = a sqrt(sigma / (1 - sigma));
         mean = x - delta [v + s^2 / (2 sigma) x1_hat]
- cps:   std = sigma_next sin(a pi / 2);
         mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat

With zero noise (eta = a = 0) every kernel reduces to the Euler step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .registry import Registry

Kernel = Callable[[Tensor, Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
"""(v, x, sigma, sigma_next, level) -> (mean, std); v, x [N, ...]; sigma, sigma_next [N]."""

KERNELS: Registry[Kernel] = Registry("SDE kernel")


def _col(t: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-row tensor [N] against ``like`` [N, ...] (fp32)."""
    return t.to(torch.float32).reshape(-1, *([1] * (like.dim() - 1)))


def _check_steps(sigma: Tensor, sigma_next: Tensor) -> None:
    if bool((sigma_next >= sigma).any()):
        raise ValueError("every step must decrease sigma (sigma_next < sigma); check the schedule")


@KERNELS.register("ode")
def ode(v: Tensor, x: Tensor, sigma: Tensor, sigma_next: Tensor, level: float = 0.0):
    """Euler step of the probability-flow ODE: mean = x + (sigma_next - sigma) v, std = 0."""
    v, x = v.float(), x.float()
    mean = x + _col(sigma_next - sigma, x) * v
    return mean, torch.zeros_like(sigma, dtype=torch.float32)


def _score_sde(v: Tensor, x: Tensor, sigma: Tensor, sigma_next: Tensor, g: Tensor):
    """Shared form of Dance-SDE and Flow-SDE with diffusion coefficient g [N]
    (docs/algorithms.md §1.2): mean = x - delta [v + g^2/(2 sigma) x1_hat], std = g sqrt(delta)."""
    v, x = v.float(), x.float()
    delta = (sigma - sigma_next).float()
    s = _col(sigma, x)
    x1_hat = x + (1.0 - s) * v
    mean = x - _col(delta, x) * (v + _col(g, x) ** 2 / (2.0 * s) * x1_hat)
    return mean, g * delta.sqrt()


@KERNELS.register("dance")
def dance_sde(v: Tensor, x: Tensor, sigma: Tensor, sigma_next: Tensor, level: float = 0.3):
    """DanceGRPO's SDE (``flux_step`` with ``sde_solver=True``): constant g = eta = ``level``."""
    _check_steps(sigma, sigma_next)
    g = torch.full_like(sigma, float(level), dtype=torch.float32)
    return _score_sde(v, x, sigma, sigma_next, g)


@KERNELS.register("flow")
def flow_sde(v: Tensor, x: Tensor, sigma: Tensor, sigma_next: Tensor, level: float = 0.7):
    """Flow-GRPO's SDE: g = a sqrt(sigma / (1 - sigma)), a = ``level``.

    At sigma = 1 the denominator takes ``1 - sigma_next`` (as Flow-GRPO's ``sigma_max`` guard);
    clamping sigma to 0.999 instead would make the std 4-6x and the drift's s^2 14-36x too
    large at T = 10-25, shift 3 (docs/algorithms.md §13.4).
    """
    _check_steps(sigma, sigma_next)
    sigma32, nxt = sigma.float(), sigma_next.float()
    denom = torch.where(sigma32 >= 1.0, 1.0 - nxt, 1.0 - sigma32)
    g = float(level) * (sigma32 / denom).sqrt()
    return _score_sde(v, x, sigma, sigma_next, g)


@KERNELS.register("cps")
def cps(v: Tensor, x: Tensor, sigma: Tensor, sigma_next: Tensor, level: float = 0.8):
    """Coefficient-preserving sampling: std = sigma_next sin(a pi / 2), a = ``level``;
    mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat."""
    _check_steps(sigma, sigma_next)
    v, x = v.float(), x.float()
    s, n = _col(sigma, x), _col(sigma_next, x)
    std = sigma_next.float() * math.sin(float(level) * math.pi / 2.0)
    x0_hat, x1_hat = x - s * v, x + (1.0 - s) * v
    coef = (n**2 - _col(std, x) ** 2).clamp_min(0.0).sqrt()
    return (1.0 - n) * x0_hat + coef * x1_hat, std


def dpm2(
    v: Tensor, x: Tensor, sigma: Tensor, sigma_next: Tensor, prev_x0: Tensor | None,
    prev_sigma: Tensor | None,
) -> Tensor:
    """DPM-Solver++(2M) ODE step in data prediction (MixGRPO-Flash's post-window solver).

    With lambda = log((1 - sigma) / sigma), h = lambda_next - lambda:
    x_next = (sigma_next / sigma) x - (1 - sigma_next) (e^{-h} - 1) D, where
    D = (1 + 1/(2r)) x0_hat - 1/(2r) prev_x0 and r = h_prev / h (first order when no previous
    prediction). A step to sigma_next = 0 returns D's first-order value x0_hat.
    Shapes: x, v, prev_x0 [N, ...]; sigmas [N]. Returns x_next [N, ...] fp32.
    """
    x, v = x.float(), v.float()
    x0 = x - _col(sigma, x) * v
    if bool((sigma_next <= 0).all()):
        return x0
    lam = lambda s: torch.log((1.0 - s.float()) / s.float())  # noqa: E731
    h = lam(sigma_next) - lam(sigma)
    d = x0
    if prev_x0 is not None and prev_sigma is not None:
        r = (lam(sigma) - lam(prev_sigma)) / h
        d = x0 + _col(1.0 / (2.0 * r), x) * (x0 - prev_x0.float())
    ratio = _col(sigma_next / sigma, x)
    return ratio * x - _col((1.0 - sigma_next) * (torch.exp(-h) - 1.0), x) * d


Reduce = Literal["mean", "sum"]


def log_prob(x_next: Tensor, mean: Tensor, std: Tensor, reduce: Reduce = "mean") -> Tensor:
    """Gaussian log-density of ``x_next`` under N(mean, std^2 I), reduced over latent dims.

    ``reduce="mean"`` averages the per-element log-density over all non-batch dims, as every
    published repository does (docs/algorithms.md §1.3), which is why clip ranges are 1e-5..1e-3;
    ``"sum"`` gives the true joint log-density. x_next, mean [N, ...]; std [N] > 0 -> [N] fp32.
    """
    if bool((std <= 0).any()):
        raise ValueError("log_prob needs std > 0; ODE edges carry no density and are not trained")
    x_next, mean = x_next.float(), mean.float()
    s = _col(std, mean)
    elem = -((x_next - mean) ** 2) / (2.0 * s**2) - torch.log(s) - 0.5 * math.log(2.0 * math.pi)
    flat = elem.flatten(1)
    return flat.mean(1) if reduce == "mean" else flat.sum(1)


def cps_log_prob(x_next: Tensor, mean: Tensor, std: Tensor, reduce: Reduce = "mean") -> Tensor:
    """CPS's published surrogate ``-mean((x_next - mean)^2)`` (no constants, no 1/(2 std^2)),
    kept so CPS hyper-parameters (clip 1e-5) transfer (docs/algorithms.md §1.3). [N, ...] -> [N]."""
    flat = (-((x_next.float() - mean.float()) ** 2)).flatten(1)
    return flat.mean(1) if reduce == "mean" else flat.sum(1)


def transition_log_prob(
    kernel: str, x_next: Tensor, mean: Tensor, std: Tensor, reduce: Reduce = "mean"
) -> Tensor:
    """The log-prob a kernel's transitions are scored with (CPS uses its surrogate)."""
    fn = cps_log_prob if kernel == "cps" else log_prob
    return fn(x_next, mean, std, reduce)

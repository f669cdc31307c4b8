"""Sigma schedules (docs/algorithms.md §1.1). Every schedule returns sigmas [T + 1], sigma_0 = 1 >
sigma_1 > ... > sigma_T = 0, in fp32."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_steps(num_steps: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")


def shift_sigmas(t: Tensor, shift: float) -> Tensor:
    """SD3 time shift ``sigma = shift t / (1 + (shift - 1) t)`` applied to unshifted times t."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1.0 + (shift - 1.0) * t)


def shifted(num_steps: int, shift: float = 3.0) -> Tensor:
    """The FastVideo repos' schedule (DanceGRPO, MixGRPO, BranchGRPO, G2RPO): linspace(1, 0,
    T + 1) shifted by ``shift`` (3 for FLUX/Wan-as-T2I, 5 for HunyuanVideo)."""
    _check_steps(num_steps)
    return shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).float()


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift ``mu``: linear in the packed token count."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flux_dynamic(num_steps: int, image_seq_len: int) -> Tensor:
    """Flow-GRPO's / diffusers' FLUX schedule: t = linspace(1, 1/T, T), sigma = e^mu /
    (e^mu + 1/t - 1) with mu = flux_mu(image_seq_len), then a final 0."""
    _check_steps(num_steps)
    t = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    em = math.exp(flux_mu(image_seq_len))
    sig = em / (em + (1.0 / t - 1.0))
    return torch.cat([sig, sig.new_zeros(1)]).float()


def make_sigmas(kind: str, num_steps: int, shift: float = 3.0, image_seq_len: int = 256) -> Tensor:
    """Dispatch by name: ``"shifted"`` or ``"flux_dynamic"``."""
    if kind == "shifted":
        return shifted(num_steps, shift)
    if kind == "flux_dynamic":
        return flux_dynamic(num_steps, image_seq_len)
    raise ValueError(f"unknown schedule {kind!r}; use 'shifted' or 'flux_dynamic'")

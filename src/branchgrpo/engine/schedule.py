"""Sigma schedules (docs/algorithms.md §1.1). Every schedule returns sigmas [T + 1],
sigma_0 = 1 > sigma_1 > ... > sigma_T = 0, in fp32.

- `shifted`: the FastVideo repos' shifted linspace (DanceGRPO, BranchGRPO, MixGRPO, G2RPO).
- `flux_pipeline`: FluxPipeline's grid (linspace(1, 1/T, T), dynamic shift mu or a static shift).
- `diffusers_static`: FlowMatchEulerDiscreteScheduler.set_timesteps(T) (StableDiffusion3Pipeline).
- `flow_sigmas`: UniPCMultistepScheduler's ``use_flow_sigmas`` grid (WanPipeline).
- `qwen_image_pipeline`: QwenImagePipeline's grid (FluxPipeline's, then the scheduler's
  ``time_shift_type`` and ``shift_terminal`` stretch).
- `transformer_timesteps`: the timestep a transformer receives for each sigma.
"""

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
    return flux_pipeline(num_steps, mu=flux_mu(image_seq_len))


def time_shift(mu: float, t: Tensor) -> Tensor:
    """Diffusers' exponential time shift ``e^mu / (e^mu + 1/t - 1)`` of times t in (0, 1]."""
    em = math.exp(mu)
    return em / (em + (1.0 / t - 1.0))


def flux_pipeline(num_steps: int, mu: float | None = None, shift: float = 1.0) -> Tensor:
    """FluxPipeline: ``sigmas = linspace(1, 1/T, T)`` passed to the scheduler, which applies
    the dynamic shift ``mu`` (``use_dynamic_shifting``) or else its static ``shift``; then a
    final 0."""
    _check_steps(num_steps)
    t = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    sig = time_shift(mu, t) if mu is not None else shift_sigmas(t, shift)
    return torch.cat([sig, sig.new_zeros(1)]).float()


def flux2_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Flux2Pipeline's ``compute_empirical_mu`` (diffusers 0.42.1): the time-shift mu of FLUX.2
    fitted on image tokens and step count: above 4300 tokens ``a2 seq + b2``; else the line
    through the T = 10 fit (``a1 seq + b1``) and the T = 200 fit (``a2 seq + b2``), at T."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    m_200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(m_200)
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + m_200 - 200.0 * a)


def diffusers_static(
    num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000, mu: float | None = None,
) -> Tensor:
    """``FlowMatchEulerDiscreteScheduler.set_timesteps(T)`` without ``sigmas`` (what
    StableDiffusion3Pipeline calls): times linspace(sigma_max, sigma_min, T) of the scheduler's
    own training grid (sigma_min = the shifted 1/N, N = ``num_train_timesteps``; unshifted
    under dynamic shifting), shifted again (``shift``, or ``mu`` when dynamic), then a final 0.
    SD3.5 (shift 3) at T = 6: [1, .923, .819, .668, .432, .009, 0]."""
    _check_steps(num_steps)
    lo = 1.0 / num_train_timesteps
    sigma_min = lo if mu is not None else float(shift_sigmas(torch.tensor(lo), shift))
    t = torch.linspace(1.0, sigma_min, num_steps, dtype=torch.float64)
    sig = time_shift(mu, t) if mu is not None else shift_sigmas(t, shift)
    return torch.cat([sig, sig.new_zeros(1)]).float()


def flow_sigmas(num_steps: int, flow_shift: float = 3.0, num_train_timesteps: int = 1000,
                ) -> Tensor:
    """UniPCMultistepScheduler's ``use_flow_sigmas`` grid (WanPipeline's ``set_timesteps(T)``):
    linspace(1, 1/N, T + 1)[:-1] shifted by ``flow_shift``, then a final 0
    (``final_sigmas_type="zero"``). UniPC also lowers sigma_0 = 1 by 1e-6 to keep its log-SNR
    finite; SDE steps need sigma_0 = 1 exactly (Flow-SDE's guard at sigma 1), so it stays 1."""
    _check_steps(num_steps)
    t = torch.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1, dtype=torch.float64)[:-1]
    sig = shift_sigmas(t, flow_shift)
    return torch.cat([sig, sig.new_zeros(1)]).float()


def stretch_to_terminal(sigmas: Tensor, terminal: float) -> Tensor:
    """FlowMatchEulerDiscreteScheduler's ``stretch_shift_to_terminal``: sigmas [T] rescaled in
    ``1 - sigma`` so the last one equals ``terminal`` (``shift_terminal``; the first, 1, stays
    1). A grid that is all ones (T = 1) is returned as it is (diffusers divides 0 by 0)."""
    one_minus = 1.0 - sigmas
    if float(one_minus[-1]) < 1e-9:  # the last sigma is 1 up to rounding
        return sigmas
    return 1.0 - one_minus / (one_minus[-1] / (1.0 - terminal))


def qwen_image_pipeline(num_steps: int, mu: float | None = None, shift: float = 1.0,
                        time_shift_type: str = "exponential",
                        shift_terminal: float | None = None) -> Tensor:
    """QwenImagePipeline (diffusers 0.42): ``sigmas = linspace(1, 1/T, T)`` passed to
    ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=..., mu=mu)``, which applies the
    dynamic time shift of ``mu`` (``time_shift_type`` "exponential": e^mu / (e^mu + 1/t - 1);
    "linear": mu / (mu + 1/t - 1)) or, without ``mu``, its static ``shift``; then, with
    ``shift_terminal``, `stretch_to_terminal`; then a final 0. Qwen-Image (base/max shift 0.5 /
    0.9 over 256 / 8192 tokens, exponential, terminal 0.02) at 1328 px (6889 tokens, mu
    0.834), T = 4: [1, .781, .476, .02, 0]."""
    _check_steps(num_steps)
    t = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    if mu is None:
        sig = shift_sigmas(t, shift)
    elif time_shift_type == "exponential":
        sig = time_shift(mu, t)
    elif time_shift_type == "linear":
        sig = mu / (mu + (1.0 / t - 1.0))
    else:
        raise ValueError(f"unknown time_shift_type {time_shift_type!r}; diffusers knows "
                         "'exponential' and 'linear'")
    if shift_terminal:
        sig = stretch_to_terminal(sig, shift_terminal)
    return torch.cat([sig, sig.new_zeros(1)]).float()


UNIPC_SIGMA_MAX = 1 - 1e-6
"""UniPC's flow-sigma grid starts at 1 - 1e-6, not 1: WanPipeline's transformer sees int64(1000
sigma) of that grid, 999 at the first step."""


def transformer_timesteps(sigmas: Tensor, scale: float = 1000.0, quantize: bool = False,
                          max_sigma: float = 1.0) -> Tensor:
    """The transformer's ``timestep`` [N] fp32 for sigmas [N]: ``1000 sigma`` (SD3, Wan:
    ``scale`` 1000) or ``(1000 sigma) / 1000`` (FLUX, which diffusers calls with timestep /
    1000: ``scale`` 1). ``quantize`` floors 1000 min(sigma, ``max_sigma``) first: the FastVideo
    repos' ``int(1000 sigma)`` (FLUX: int(1000 sigma) / 1000), or with ``max_sigma`` =
    `UNIPC_SIGMA_MAX` the int64 timesteps UniPC hands Wan's transformer."""
    t = sigmas.float() * 1000
    if quantize:
        t = (sigmas.float().clamp(max=max_sigma) * 1000).double().floor().float()
    return t if scale == 1000.0 else t / 1000


def make_sigmas(kind: str, num_steps: int, shift: float = 3.0, image_seq_len: int = 256) -> Tensor:
    """Dispatch by name: ``"shifted"`` or ``"flux_dynamic"`` (FLUX.1-dev's mu constants)."""
    if kind == "shifted":
        return shifted(num_steps, shift)
    if kind == "flux_dynamic":
        return flux_dynamic(num_steps, image_seq_len)
    raise ValueError(f"unknown schedule {kind!r}; use 'shifted' or 'flux_dynamic'")

"""Policy losses over edges, with the statistics worth logging (docs/algorithms.md §1.4, §3.3, §9).

All inputs are per edge [E]; log-probs and means in fp32. Each function is pure.
"""

from __future__ import annotations

import torch
from torch import Tensor


def clipped_surrogate(log_ratio: Tensor, adv: Tensor, clip_eps: float) -> Tensor:
    """PPO-clip per edge: max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(log_ratio) [E]."""
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped)


def guard_log_ratio(log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor,
                    std: Tensor) -> Tensor:
    """GRPO-Guard's normalised log-ratio (Flow-Factory's form, docs/algorithms.md §3.3):
    log r' = s (l_new - l_old) + mean((mu_new - mu_old)^2) / (2 s), s the step std [E]. For a
    per-dim-mean Gaussian log-prob this equals mean(xi * (mu_new - mu_old)): the negative
    bias -|dmu|^2 / (2 s^2) is removed and every step is put on the same scale."""
    s = std.float()
    dmu2 = (mean.float() - old_mean.float()).pow(2).flatten(1).mean(1)
    return s * (log_prob - old_log_prob) + dmu2 / (2.0 * s)


def kl_x(mean: Tensor, ref_mean: Tensor) -> Tensor:
    """x-based KL surrogate mean((mu_theta - mu_ref)^2) per edge [E] (Flow-Factory, no 1/std^2)."""
    return (mean.float() - ref_mean.float()).pow(2).flatten(1).mean(1)


def kl_v(v: Tensor, ref_v: Tensor) -> Tensor:
    """v-based KL surrogate mean((v_theta - v_ref)^2) per edge [E] (Flow-Factory, no 1/std^2)."""
    return (v.float() - ref_v.float()).pow(2).flatten(1).mean(1)


def flow_grpo_kl_std(sigma: Tensor, sigma_next: Tensor, level: float) -> Tensor:
    """Flow-GRPO's KL denominator coefficient s_i = a sqrt(sigma_i / (1 - sigma_i)) per edge [E]
    (docs/algorithms.md §9): the Flow-SDE coefficient without the sqrt(delta_i) of the step std.
    At sigma_i = 1 the denominator is 1 - sigma_next, the Flow-SDE kernel's guard
    (docs/algorithms.md §13.4), so s_i there is a sqrt(1 / (1 - sigma_next)).

    sigma, sigma_next [E] -> [E] fp32; a = ``level`` > 0."""
    if level <= 0:
        raise ValueError(f"the Flow-GRPO KL divides by the Flow-SDE level a; got a = {level}: "
                         "set rollout.level > 0 or use train.kl_kind x or v")
    s, nxt = sigma.float(), sigma_next.float()
    denom = torch.where(s >= 1.0, 1.0 - nxt, 1.0 - s)
    return float(level) * (s / denom).sqrt()


def kl_x_flow_grpo(mean: Tensor, ref_mean: Tensor, sigma: Tensor, sigma_next: Tensor,
                   level: float) -> Tensor:
    """Flow-GRPO's KL per edge [E] (docs/algorithms.md §9):
    mean((mu_theta - mu_ref)^2) / (2 s_i^2), s_i from `flow_grpo_kl_std`.

    Equals `kl_x` times 1 / (2 s_i^2), so a Flow-GRPO beta keeps its meaning. mean, ref_mean
    [E, *D]; sigma, sigma_next [E]; a = ``level``."""
    s = flow_grpo_kl_std(sigma.to(mean.device), sigma_next.to(mean.device), level)
    return kl_x(mean, ref_mean) / (2.0 * s.pow(2))


KL_KINDS = ("x", "v", "x_flow_grpo")
"""``train.kl_kind`` values: Flow-Factory's undivided x and v forms, and Flow-GRPO's form."""


def kl_penalty(
    kind: str, *, mean: Tensor, ref_mean: Tensor, v: Tensor, ref_v: Tensor, sigma: Tensor,
    sigma_next: Tensor, kernel: str, level: float,
) -> Tensor:
    """The KL estimator ``kind`` (one of `KL_KINDS`) per edge [E] (docs/algorithms.md §9).

    mean, ref_mean, v, ref_v [E, *D]; sigma, sigma_next [E]; ``kernel`` and ``level`` are the
    rollout's SDE kernel and its level (``x_flow_grpo`` needs the Flow-SDE kernel ``flow``)."""
    if kind == "x":
        return kl_x(mean, ref_mean)
    if kind == "v":
        return kl_v(v, ref_v)
    if kind == "x_flow_grpo":
        if kernel != "flow":
            raise ValueError(f"train.kl_kind=x_flow_grpo is Flow-GRPO's KL for the Flow-SDE "
                             f"kernel; this rollout uses kernel {kernel!r}: set rollout.kernel "
                             "flow (method flow_grpo) or use train.kl_kind x or v")
        return kl_x_flow_grpo(mean, ref_mean, sigma, sigma_next, level)
    raise ValueError(f"unknown train.kl_kind {kind!r}; choose one of {KL_KINDS}")


def policy_loss(
    log_prob: Tensor, old_log_prob: Tensor, adv: Tensor, clip_eps: float, *,
    step: Tensor | None = None, log_ratio: Tensor | None = None, kl: Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Mean clipped-surrogate loss over E edges (+ kl_coef * mean KL) and its statistics.

    ``log_ratio`` overrides log_prob - old_log_prob (GRPO-Guard). Stats: clip fraction
    (|r - 1| > eps), approx-KL 0.5 mean(dl^2), mean ratio, and mean ratio per step."""
    lr = log_prob - old_log_prob if log_ratio is None else log_ratio
    per_edge = clipped_surrogate(lr, adv, clip_eps)
    loss = per_edge.mean()
    stats: dict[str, float] = {"loss/policy": float(loss.detach())}
    if kl is not None:
        kl_mean = kl.mean()
        loss = loss + kl_coef * kl_mean
        stats["loss/kl"] = float(kl_mean.detach())
    with torch.no_grad():
        dl = log_prob.detach() - old_log_prob
        ratio = torch.exp(lr.detach())
        stats["ratio/mean"] = float(ratio.mean())
        stats["ratio/clip_frac"] = float(((ratio - 1).abs() > clip_eps).float().mean())
        stats["ratio/approx_kl"] = float(0.5 * (dl**2).mean())
        if step is not None:
            for s in step.unique().tolist():
                stats[f"ratio/step_{int(s):02d}"] = float(ratio[step == s].mean())
    stats["loss/total"] = float(loss.detach())
    return loss, stats

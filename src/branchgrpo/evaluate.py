"""Held-out evaluation, sampling, reward-hacking monitors and sample grids.

Evaluation samples with the deterministic ODE (Euler, the plan's sigma schedule) from fixed
initial noise, so before/after scores compare the same prompts and noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .models.base import Policy
from .rewards.base import check_scores
from .tree import chain_plan, rollout


@torch.no_grad()
def sample(policy: Policy, prompts: Sequence[str], sigmas: Tensor, *, seed: int = 0,
           max_batch: int = 256, device: torch.device | str = "cpu") -> Tensor:
    """One ODE sample per prompt: media [B, ...] in [0, 1] (fixed noise from ``seed``)."""
    t = len(sigmas) - 1
    plan = chain_plan("eval", sigmas, [1] * t, ["ode"] * t, shared_noise=False)
    cond = policy.encode(list(prompts))
    gen = torch.Generator(device=device).manual_seed(seed)
    tree = rollout(policy, cond, plan, generator=gen, max_batch=max_batch, device=device)
    return policy.decode(tree.leaf_x0)


def image_stats(media: Tensor) -> dict[str, float]:
    """Brightness and HSV saturation means of images [B, 3, H, W] (or video frames)."""
    x = media.float().clamp(0, 1)
    if x.dim() == 5:
        x = x.flatten(0, 1)
    mx, mn = x.max(1).values, x.min(1).values
    sat = torch.where(mx > 1e-6, (mx - mn) / mx.clamp_min(1e-6), torch.zeros_like(mx))
    return {"monitor/brightness": float(x.mean()), "monitor/saturation": float(sat.mean())}


def group_diversity(media: Tensor, group: Tensor) -> float:
    """Mean pairwise RMS distance between media of the same group (within-group diversity)."""
    flat = media.float().flatten(1)
    out = []
    for g in group.unique().tolist():
        m = flat[group == g]
        if len(m) > 1:
            d = torch.cdist(m, m) / m.shape[1] ** 0.5
            out.append(d.sum() / (len(m) * (len(m) - 1)))
    return float(torch.stack(out).mean()) if out else 0.0


def evaluate(policy: Policy, prompts: Sequence[str], sigmas: Tensor, scorers: dict,
             *, seed: int = 0, max_batch: int = 256,
             device: torch.device | str = "cpu") -> tuple[dict[str, float], Tensor]:
    """Score held-out samples with every scorer {name: reward}; returns (metrics, media).

    A scorer with a ``strict`` method (the judge) also reports GenEval-style accuracy. Scores
    are checked as in training (shape [B], finite): a bad one raises `RewardError` naming the
    scorer, instead of a NaN in the log."""
    media = sample(policy, prompts, sigmas, seed=seed, max_batch=max_batch, device=device)
    out: dict[str, float] = {}
    for name, fn in scorers.items():
        scores = check_scores(name, fn(media, list(prompts)), len(prompts))
        out[f"eval/{name}"] = float(scores.mean())
        if hasattr(fn, "strict"):
            strict = check_scores(f"{name}.strict", fn.strict(media, list(prompts)),
                                  len(prompts))
            out[f"eval/{name}_strict"] = float(strict.mean())
    out.update({k.replace("monitor/", "eval/"): v for k, v in image_stats(media).items()})
    return out, media


def save_grid(media: Tensor, prompts: Sequence[str], path: Path, n: int = 16,
              title: str = "") -> Path:
    """A grid PNG of the first ``n`` images (video: first frame), each titled by its prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = media[:n].float().clamp(0, 1).cpu()
    if x.dim() == 5:
        x = x[:, 0]
    cols = min(8, len(x))
    rows = (len(x) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[: len(x)]):
        ax.imshow(x[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title("\n".join(_wrap(prompts[i])), fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 22) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + ([cur] if cur else [])

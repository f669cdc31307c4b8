"""Held-out evaluation, sampling, reward-hacking monitors and sample grids.

Evaluation samples with the deterministic ODE (Euler, the plan's sigma schedule) from fixed
initial noise, so before/after scores compare the same prompts and noise.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .engine.policy import Policy
from .engine.tree import chain_plan, rollout
from .rewards.base import check_scores


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


def token_period(policy: object) -> int:
    """The policy's token period in pixels (``token_period`` attribute: 2 for the tiny model's
    2x2 packing, VAE factor x patch size for latent models); 1 (no token grid, so
    `grid_energy` reads 0) for a policy without one."""
    return max(1, int(getattr(policy, "token_period", 1)))


GRID_ALERT = 1.5
"""Training warns when held-out ``eval/grid`` exceeds this multiple of the base model's."""


def grid_alert_level(base: float) -> float:
    """The ``eval/grid`` above which training warns, given the base model's value: `GRID_ALERT`
    times it and 0.02 above it (64 samples' grid moves by about 0.01-0.03 between evaluations,
    so the absolute margin keeps a low base from warning on noise)."""
    return max(GRID_ALERT * base, base + 0.02)


def grid_warning(grid: float, base: float, tag: str) -> str | None:
    """The warning for held-out samples that grow a token-period grid (``eval/grid`` over
    `grid_alert_level` of the base model's ``base``), None below it: the drift that optimizer
    noise gives every direction the reward cannot see, identical in every flat region because
    their tokens have one input (docs/algorithms.md §14)."""
    if grid <= grid_alert_level(base):
        return None
    return (f"warning: {tag}: monitor eval/grid {grid:.3f} is {grid / max(base, 1e-9):.1f}x "
            f"the base model's {base:.3f}: the samples grow a grid of one dot per token; "
            "a KL anchor (train.kl_coef, e.g. 0.1) holds it, see docs/algorithms.md §14")


def grid_energy(media: Tensor, period: int) -> float:
    """Share of the spectral energy of the grey image at the frequencies of a spatial period.

    ``media``: images [B, 3, H, W] or videos [B, F, 3, H, W] in [0, 1] (every frame counts as an
    image). With ``g`` the grey image (Rec. 601 luma) minus its mean and ``G = |FFT2(g)|^2``,
    the grid frequencies of period p are the rows u in U = {round(k H / p)} and the columns v in
    V = {round(k W / p)}, k = 1 .. p - 1 (for p = 2: the Nyquist row and column), and

        grid = mean over images of  sum_{u in U or v in V} G[u, v] / sum_{u, v} G[u, v]

    (DC is excluded: g has zero mean; a flat image counts 0). A token-periodic artefact such as
    a dot per packed token puts its energy there: a checkerboard is 1 at p = 2. ``period`` <= 1
    or media that are not images give 0."""
    x = media.float().clamp(0, 1)
    if x.dim() == 5:
        x = x.flatten(0, 1)
    if period <= 1 or x.dim() != 4 or x.shape[1] not in (1, 3):
        return 0.0
    h, w = x.shape[-2:]
    luma = x.new_tensor([0.299, 0.587, 0.114] if x.shape[1] == 3 else [1.0])
    g = (x * luma.view(1, -1, 1, 1)).sum(1)
    g = g - g.mean((-2, -1), keepdim=True)
    power = torch.fft.fft2(g).abs().square()
    rows = {round(k * h / period) % h for k in range(1, period)} - {0}
    cols = {round(k * w / period) % w for k in range(1, period)} - {0}
    mask = torch.zeros(h, w, dtype=torch.bool, device=x.device)
    mask[sorted(rows), :] = True
    mask[:, sorted(cols)] = True
    total = power.sum((-2, -1))
    share = torch.where(total > 1e-12, (power * mask).sum((-2, -1)) / total.clamp_min(1e-12),
                        torch.zeros_like(total))
    return float(share.mean())


VISIBLE = 0.1
"""HSV value from which a pixel counts for the saturation monitor."""


def image_stats(media: Tensor, period: int = 1) -> dict[str, float]:
    """Mean brightness of images [B, 3, H, W] (or video frames); mean HSV saturation of their
    visible pixels (HSV value >= `VISIBLE`: a near-black pixel's hue is noise, and on a dark
    background it would decide the mean; 0 when no pixel is visible); and `grid_energy` at the
    token ``period`` in pixels (``monitor/grid``)."""
    x = media.float().clamp(0, 1)
    if x.dim() == 5:
        x = x.flatten(0, 1)
    mx, mn = x.max(1).values, x.min(1).values
    seen = mx >= VISIBLE
    sat = float(((mx - mn) / mx.clamp_min(VISIBLE))[seen].mean()) if bool(seen.any()) else 0.0
    return {"monitor/brightness": float(x.mean()), "monitor/saturation": sat,
            "monitor/grid": grid_energy(media, period)}


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
    stats = image_stats(media, token_period(policy))
    out.update({k.replace("monitor/", "eval/"): v for k, v in stats.items()})
    return out, media


def save_grid(media: Tensor, prompts: Sequence[str], path: Path, n: int = 16,
              title: str = "", cell_px: int = 128) -> Path:
    """A grid PNG of the first ``n`` images [B, 3, H, W] (video [B, F, 3, H, W]: first frame),
    at most 8 per row, each under its prompt.

    Images are upscaled by the integer factor ceil(cell_px / max(H, W)) with nearest-neighbour
    (a 16x16 sample becomes 128x128, one square per pixel) and drawn one image pixel per PNG
    pixel. Every caption (at most 3 wrapped lines) has its own band above its image, so no
    caption overlaps an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = media[:n].float().clamp(0, 1).cpu()
    if x.dim() == 5:
        x = x[:, 0]
    scale = max(1, -(-cell_px // max(x.shape[-2:])))
    x = x.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    cols = min(8, len(x))
    rows = (len(x) + cols - 1) // cols
    dpi, pad, cap, font = 100, 0.12, 0.42, 7.0
    img_h, img_w = x.shape[-2] / dpi, x.shape[-1] / dpi
    top = 0.4 if title else pad
    cell_w, cell_h = img_w + pad, cap + img_h + pad
    fig_w, fig_h = cols * cell_w + pad, rows * cell_h + top
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    width = max(8, int(img_w * 72 / (0.6 * font)))
    for i, img in enumerate(x):
        r, c = divmod(i, cols)
        left, row_top = pad + c * cell_w, fig_h - top - r * cell_h
        ax = fig.add_axes((left / fig_w, (row_top - cap - img_h) / fig_h, img_w / fig_w,
                           img_h / fig_h))
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest", aspect="auto")
        ax.axis("off")
        caption = "\n".join(textwrap.wrap(prompts[i], width, max_lines=3, placeholder=" ..."))
        fig.text((left + img_w / 2) / fig_w, (row_top - 0.03) / fig_h, caption, ha="center",
                 va="top", fontsize=font, linespacing=1.15)
    if title:
        fig.suptitle(title, y=1 - 0.06 / fig_h, va="top", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path

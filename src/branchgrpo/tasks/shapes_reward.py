"""Rewards of the shapes task, both judging generated pixels, never the prompt's labels alone.

- `ShapesReward` (training reward, GenEval-style rules on pixels): the image's foreground
  pixels are assigned to the nearest palette colour; the prompt's colour mask is split into
  connected components; the reward is the mean of four soft scores: colour purity, count,
  position (in the asked half, and more that way than across) and shape (IoU of each
  component with the task's rendered shape).
- `ShapesJudge` (held-out judge, a different model): a small CNN trained on rendered images
  to classify the four attributes; the score is the mean probability of the prompt's values,
  and ``strict`` is the fraction of images whose four attributes are all recognised.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn

from ..rewards.base import REWARDS
from .shapes import COLOURS, COUNTS, POSITIONS, SHAPES, SIZE, parse, sample_batch, shape_mask

PALETTE = torch.tensor(list(COLOURS.values()))  # [4, 3]
FG_THRESHOLD = 0.35


def _objects(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Connected components of a mask [H, W] bool: (labels, ids of those of 3+ pixels)."""
    lab, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, lab, range(1, n + 1)) if n else np.zeros(0)
    return lab, [i + 1 for i, s in enumerate(sizes) if s >= 3]


def _template_iou(component: np.ndarray, shape: str) -> float:
    """Shape score of one object [H, W] bool: the best IoU with the task's rendered ``shape``
    (`shape_mask`) centred on one of the four integer pixels around the object's centroid.
    A clean render scores 1; the other shape's template scores 9/21 (a 3x3 square against
    the 21-pixel disk); a blob of the right size but the wrong outline scores in between."""
    r, c = np.nonzero(component)
    best = 0.0
    for rr in {int(np.floor(r.mean())), int(np.ceil(r.mean()))}:
        for cc in {int(np.floor(c.mean())), int(np.ceil(c.mean()))}:
            t = shape_mask(rr, cc, shape)
            best = max(best, float((t & component).sum() / (t | component).sum()))
    return best


def _position_score(rows: np.ndarray, cols: np.ndarray, position: str) -> float:
    """Position score in [0, 1] of the objects' pixels (row and column indices).

    The task's four positions are one choice, so "on the left" must be more left than top or
    bottom: the share of pixels in the asked half, times sigmoid(2 (a - |b|)) of the pixels'
    centroid offset from the image centre, a along the asked direction and b across it. An
    object in the top-left corner (a = |b|) scores half for "left" and half for "top"."""
    h = SIZE / 2
    inside = {"left": cols < h, "right": cols >= h, "top": rows < h, "bottom": rows >= h}
    dy, dx = rows.mean() - (SIZE - 1) / 2, cols.mean() - (SIZE - 1) / 2
    along, across = {"left": (-dx, dy), "right": (dx, dy), "top": (-dy, dx),
                     "bottom": (dy, dx)}[position]
    return float(inside[position].mean() / (1.0 + np.exp(-2.0 * (along - abs(across)))))


def _component_scores(mask: np.ndarray, spec, strays: int = 0) -> tuple[float, float, float]:
    """(count, position, shape) scores in [0, 1] of the prompt colour's mask [H, W] bool.

    count = exp(-(|objects - asked| + strays)): ``strays`` objects of other colours are
    objects the prompt does not ask for, so each costs as much as a miscount. position is
    `_position_score`, shape the mean `_template_iou` of the objects."""
    lab, keep = _objects(mask)
    count = float(np.exp(-abs(len(keep) - spec.count) - strays))
    if not keep:
        return count, 0.0, 0.0
    rows, cols = np.nonzero(np.isin(lab, keep))
    shape = np.mean([_template_iou(lab == i, spec.shape) for i in keep])
    return count, _position_score(rows, cols, spec.position), float(shape)


class ShapesReward:
    """Rule-based pixel reward in [0, 1]; images [B, 3, 16, 16] in [0, 1] -> [B]."""

    name = "shapes"

    def __call__(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.components(media, prompts).mean(1)

    def components(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        """Scores [B, 4]: colour purity, count (stray objects of other colours count as
        miscounts), position, shape."""
        img = media.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1)  # [B, H, W, 3]
        fg = img.max(-1).values > FG_THRESHOLD
        nearest = torch.cdist(img.reshape(-1, 3), PALETTE).argmin(1).reshape(fg.shape)
        out = torch.zeros(len(prompts), 4)
        names = list(COLOURS)
        for b, p in enumerate(prompts):
            spec = parse(p)
            mask = (fg[b] & (nearest[b] == names.index(spec.colour))).numpy()
            n_fg = int(fg[b].sum())
            purity = mask.sum() / n_fg if n_fg else 0.0
            strays = len(_objects(fg[b].numpy() & ~mask)[1])
            out[b] = torch.tensor([purity, *_component_scores(mask, spec, strays)])
        return out


class JudgeNet(nn.Module):
    """A small CNN with four attribute heads; images [B, 3, 16, 16] -> logits per attribute."""

    HEADS = {"count": len(COUNTS), "colour": len(COLOURS), "shape": len(SHAPES),
             "position": len(POSITIONS)}

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.GELU())
        self.heads = nn.ModuleDict({k: nn.Linear(128, n) for k, n in self.HEADS.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.body(x * 2 - 1)
        return {k: head(h) for k, head in self.heads.items()}


def _labels(prompts: Sequence[str]) -> dict[str, Tensor]:
    specs = [parse(p) for p in prompts]
    return {
        "count": torch.tensor([s.count - 1 for s in specs]),
        "colour": torch.tensor([list(COLOURS).index(s.colour) for s in specs]),
        "shape": torch.tensor([SHAPES.index(s.shape) for s in specs]),
        "position": torch.tensor([POSITIONS.index(s.position) for s in specs]),
    }


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Blur and noise so the judge also reads imperfect generated images."""
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    blur = nn.functional.conv2d(x, k.expand(3, 1, 3, 3), padding=1, groups=3)
    w = torch.rand(x.shape[0], 1, 1, 1, generator=g)
    x = w * blur + (1 - w) * x
    return (x + 0.08 * torch.rand(x.shape[0], 1, 1, 1, generator=g)
            * torch.randn(x.shape, generator=g)).clamp(0, 1)


def train_judge(steps: int = 600, batch: int = 128, seed: int = 1234,
                progress: bool = False) -> JudgeNet:
    """Train the judge on freshly rendered, augmented images (about 20 s on 2 CPU cores)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    net = JudgeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="judge pretraining", disable=not progress):
        x, prompts = sample_batch(batch, rng)
        logits, y = net(_augment(x, g)), _labels(prompts)
        loss = sum(nn.functional.cross_entropy(logits[k], y[k]) for k in y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


DEFAULT_CACHE = Path("~/.cache/branchgrpo")
SHIPPED_JUDGE = Path(__file__).with_name("shapes_judge.safetensors")
"""The judge the package ships (built by ``branchgrpo build-base`` with `train_judge`)."""


def save_judge(net: JudgeNet, path: Path) -> Path:
    """Write the judge's weights as safetensors (atomic rename)."""
    from safetensors.torch import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_model(net, str(tmp))
    tmp.replace(path)
    return path


class ShapesJudge:
    """Held-out judge: mean probability of the prompt's four attribute values, [B] in [0, 1]."""

    name = "judge"

    def __init__(self, net: JudgeNet) -> None:
        self.net = net.eval()

    @classmethod
    def cached(cls, cache_dir: Path, progress: bool = False) -> ShapesJudge:
        """The shipped judge (`SHIPPED_JUDGE`, the same file on every machine); without one,
        the judge in ``cache_dir``, trained and saved there on first use."""
        from safetensors.torch import load_model

        path = SHIPPED_JUDGE if SHIPPED_JUDGE.exists() else (
            Path(cache_dir) / "shapes_judge.safetensors")
        net = JudgeNet()
        if path.exists():
            load_model(net, path)
        else:
            net = train_judge(progress=progress)
            save_judge(net, path)
        return cls(net)

    @torch.no_grad()
    def probabilities(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        """p(prompt's value) per attribute [B, 4] (count, colour, shape, position)."""
        logits = self.net(media.detach().float().cpu().clamp(0, 1))
        y = _labels(prompts)
        return torch.stack([logits[k].softmax(-1).gather(1, y[k][:, None]).squeeze(1)
                            for k in JudgeNet.HEADS], 1)

    def __call__(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.probabilities(media, prompts).mean(1)

    def strict(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        """1 where all four attributes are recognised (argmax) [B], GenEval-style accuracy."""
        return (self.probabilities(media, prompts) > 0.5).all(1).float()


@REWARDS.register("shapes")
def _shapes_factory() -> ShapesReward:
    return ShapesReward()


@REWARDS.register("judge")
def _judge_factory(cache_dir: str = str(DEFAULT_CACHE)) -> ShapesJudge:
    return ShapesJudge.cached(Path(cache_dir).expanduser())

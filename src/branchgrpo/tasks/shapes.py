"""The embedded default task: 16x16 RGB images of coloured shapes from prompts such as
"two red circles on the left", generated procedurally (no download).

A prompt fixes four attributes: count (1-2: three objects do not fit apart in half of
16x16), colour (4), shape (circle, square) and position (left, right, top, bottom).
`render` draws a random image that satisfies a prompt; the rewards in `shapes_reward`
measure the same attributes back from pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SIZE = 16
COUNTS = ("one", "two")
COLOURS = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.12, 0.80, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.12),
}
SHAPES = ("circle", "square")
POSITIONS = ("left", "right", "top", "bottom")
VOCAB = ("<pad>", "on", "the", *COUNTS, *COLOURS, *SHAPES, *(s + "s" for s in SHAPES),
         *POSITIONS)
MAX_WORDS = 6


@dataclass(frozen=True)
class Spec:
    """The attributes a prompt asks for."""

    count: int
    colour: str
    shape: str
    position: str

    @property
    def prompt(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{COUNTS[self.count - 1]} {self.colour} {noun} on the {self.position}"


def parse(prompt: str) -> Spec:
    """The attributes of a prompt of the task's grammar (ValueError otherwise)."""
    w = prompt.strip().lower().split()
    if len(w) != 6 or w[3:5] != ["on", "the"] or w[0] not in COUNTS or w[1] not in COLOURS:
        raise ValueError(f"not a shapes-task prompt: {prompt!r} (expected e.g. "
                         "'two red circles on the left')")
    shape = w[2][:-1] if w[2].endswith("s") else w[2]
    if shape not in SHAPES or w[5] not in POSITIONS:
        raise ValueError(f"not a shapes-task prompt: {prompt!r}")
    return Spec(COUNTS.index(w[0]) + 1, w[1], shape, w[5])


def all_specs() -> list[Spec]:
    """Every prompt of the grammar (2 x 4 x 2 x 4 = 64)."""
    return [Spec(n, c, s, p) for n in (1, 2) for c in COLOURS for s in SHAPES
            for p in POSITIONS]


def split_prompts(seed: int = 0, holdout: int = 16) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts): a fixed random split of the grammar."""
    specs = all_specs()
    random.Random(seed).shuffle(specs)
    return [s.prompt for s in specs[holdout:]], [s.prompt for s in specs[:holdout]]


def tokenize(prompts: list[str]) -> Tensor:
    """Word ids [B, MAX_WORDS] (0 = padding) over the task's closed vocabulary."""
    ids = torch.zeros(len(prompts), MAX_WORDS, dtype=torch.long)
    for i, p in enumerate(prompts):
        for j, word in enumerate(p.lower().split()[:MAX_WORDS]):
            if word not in VOCAB:
                raise ValueError(f"word {word!r} of prompt {p!r} is not in the task vocabulary")
            ids[i, j] = VOCAB.index(word)
    return ids


def _region(position: str) -> tuple[int, int, int, int]:
    """(row lo, row hi, col lo, col hi) of object centres for a position."""
    h = SIZE // 2
    return {"left": (2, SIZE - 3, 2, h - 2), "right": (2, SIZE - 3, h + 1, SIZE - 3),
            "top": (2, h - 2, 2, SIZE - 3), "bottom": (h + 1, SIZE - 3, 2, SIZE - 3)}[position]


def shape_mask(r: int, c: int, shape: str) -> np.ndarray:
    """The pixels [16, 16] bool of a rendered ``shape`` centred at (r, c): a circle is the
    21-pixel disk of radius 2.3 (5 wide), a square the 3x3 block."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    if shape == "circle":
        return (yy - r) ** 2 + (xx - c) ** 2 <= 2.3**2
    return (abs(yy - r) <= 1) & (abs(xx - c) <= 1)


def _stamp(img: np.ndarray, r: int, c: int, shape: str, rgb: tuple[float, ...]) -> None:
    img[shape_mask(r, c, shape)] = rgb


def render(spec: Spec, rng: np.random.Generator) -> np.ndarray:
    """A random image [16, 16, 3] in [0, 1] that satisfies ``spec`` (non-overlapping objects)."""
    r0, r1, c0, c1 = _region(spec.position)
    while True:  # two centres fit >= 6 apart in every region, so this ends quickly
        pts = [(int(rng.integers(r0, r1 + 1)), int(rng.integers(c0, c1 + 1)))
               for _ in range(spec.count)]
        if all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 6 for i, a in enumerate(pts)
               for b in pts[i + 1:]):
            break
    img = np.zeros((SIZE, SIZE, 3), dtype=np.float32)
    for r, c in pts:
        _stamp(img, r, c, spec.shape, COLOURS[spec.colour])
    return img


def add_clutter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stamp one object the prompt does not mention (random colour, shape, place) on ``img``."""
    rgb = list(COLOURS.values())[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    _stamp(img, int(rng.integers(2, SIZE - 2)), int(rng.integers(2, SIZE - 2)), shape, rgb)
    return img


def sample_batch(n: int, rng: np.random.Generator, prompts: list[str] | None = None,
                 clutter: float = 0.0) -> tuple[Tensor, list[str]]:
    """n rendered images [n, 3, 16, 16] in [0, 1] and their prompts (drawn from ``prompts``).

    With probability ``clutter`` an image also holds one object its prompt does not mention,
    as web images hold things their captions leave out."""
    pool = prompts or [s.prompt for s in all_specs()]
    chosen = [pool[int(i)] for i in rng.integers(0, len(pool), n)]
    imgs = [render(parse(p), rng) for p in chosen]
    imgs = np.stack([add_clutter(x, rng) if clutter and rng.random() < clutter else x
                     for x in imgs])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), chosen

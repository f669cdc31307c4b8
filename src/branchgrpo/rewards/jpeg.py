"""JPEG (in)compressibility rewards (DDPO, Black et al. 2023, arXiv 2305.13301; Flow-GRPO).

The size in kB of the image encoded by PIL at JPEG quality 95. Compressibility is the negative
size (smaller files score higher); incompressibility is the size itself. Videos: the mean over
frames. Scale: kB per image (a 512x512 photo is roughly 20-150 kB at quality 95).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from torch import Tensor

from branchgrpo.rewards.base import REWARDS
from branchgrpo.rewards.media import flatten_frames, mean_over_frames, to_uint8


def jpeg_size_kb(media: Tensor, quality: int = 95) -> Tensor:
    """Encoded JPEG size in kB (1 kB = 1000 bytes, as DDPO) per image -> fp32 ``[B]``.

    media ``[B, C, H, W]`` or ``[B, F, C, H, W]`` in [0, 1]; frames are averaged."""
    from PIL import Image

    images, frames = flatten_frames(media)
    sizes = []
    for arr in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(
            buf, format="JPEG", quality=quality
        )
        sizes.append(buf.tell() / 1000.0)
    return mean_over_frames(torch.tensor(sizes, dtype=torch.float32), frames)


class JpegReward:
    """``sign * jpeg_size_kb(media)``; ``sign = -1`` for compressibility."""

    groupwise = False

    def __init__(self, name: str, sign: float, quality: int = 95) -> None:
        self.name, self.sign, self.quality = name, sign, quality

    def __call__(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.sign * jpeg_size_kb(media, self.quality)


@REWARDS.register("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95, **_: object) -> JpegReward:
    """Negative JPEG size in kB (higher = more compressible). ``device``/``dtype`` are ignored."""
    return JpegReward("jpeg_compressibility", -1.0, quality)


@REWARDS.register("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95, **_: object) -> JpegReward:
    """JPEG size in kB (higher = less compressible)."""
    return JpegReward("jpeg_incompressibility", 1.0, quality)

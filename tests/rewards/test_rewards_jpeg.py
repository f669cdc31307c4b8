"""JPEG (in)compressibility (DDPO / Flow-GRPO): size in kB at quality 95."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from branchgrpo.rewards import build_reward
from branchgrpo.rewards.jpeg import jpeg_size_kb


def test_size_matches_pil_exactly():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(2, 24, 32, 3), dtype=np.uint8)
    media = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    expected = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        expected.append(len(buf.getvalue()) / 1000)
    assert jpeg_size_kb(media).tolist() == torch.tensor(expected).tolist()
    comp = build_reward("jpeg_compressibility")
    inc = build_reward("jpeg_incompressibility")
    assert comp(media, ["", ""]).tolist() == (-torch.tensor(expected)).tolist()
    assert inc(media, ["", ""]).tolist() == torch.tensor(expected).tolist()


def test_constant_compresses_better_than_noise():
    torch.manual_seed(0)
    media = torch.stack([torch.full((3, 64, 64), 0.5), torch.rand(3, 64, 64)])
    s = build_reward("jpeg_compressibility")(media, ["", ""])
    assert s.dtype == torch.float32 and s.shape == (2,)
    assert s[0] > s[1] and s[1] < -5  # noise is several kB, the flat image ~1 kB


def test_video_is_mean_over_frames():
    torch.manual_seed(0)
    frames = torch.rand(3, 3, 16, 16)
    video = frames.unsqueeze(0)  # [1, F, C, H, W]
    per_frame = jpeg_size_kb(frames)
    assert torch.allclose(jpeg_size_kb(video), per_frame.mean().view(1))

"""HPS-v2.1 preprocessing equals HPSv2's own evaluation transform for any aspect ratio: resize
of the longest side to 224 (bicubic), zero padding to a square, OpenAI mean/std. The reference
here is written independently with PIL, as HPSv2 runs it on PIL images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from rewards_testlib import tiny_clip_config, tiny_clip_tokenizer

from branchgrpo.rewards import build_reward
from branchgrpo.rewards.hps import hf_to_open_clip, hps_preprocess
from branchgrpo.rewards.media import CLIP_MEAN, CLIP_STD, preprocess

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def _images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random images [n, 3, h, w] on the uint8 grid (so the PIL uint8 path sees them exactly)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, h, w, generator=g) * 255).round() / 255


def _target_size(h: int, w: int, size: int) -> tuple[int, int]:
    scale = size / float(max(h, w))
    return round(h * scale), round(w * scale)


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """Zero padding [3, h, w] -> [3, size, size]: left/top pad // 2, the rest right/bottom."""
    ph, pw = size - a.shape[1], size - a.shape[2]
    return np.pad(a, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))


def _ref_float(img: torch.Tensor, size: int) -> torch.Tensor:
    """PIL float ('F') bicubic resize per channel of the longest side, clamp, pad, normalise."""
    nh, nw = _target_size(*img.shape[-2:], size)
    chans = [np.asarray(Image.fromarray(c.numpy().astype(np.float32), mode="F")
                        .resize((nw, nh), Image.BICUBIC)) for c in img]
    a = _pad(np.clip(np.stack(chans), 0.0, 1.0), size)
    return (torch.from_numpy(a) - MEAN) / STD


def _ref_uint8(img: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's literal path: uint8 RGB PIL image, BICUBIC resize, pad with fill 0, to [0, 1],
    normalise."""
    nh, nw = _target_size(*img.shape[-2:], size)
    u8 = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(u8, mode="RGB").resize((nw, nh), Image.BICUBIC)
    a = _pad(np.asarray(pil).astype(np.float32).transpose(2, 0, 1) / 255.0, size)
    return (torch.from_numpy(a) - MEAN) / STD


@pytest.mark.parametrize("h,w,uint8", [(480, 832, True), (832, 480, True), (300, 301, False)])
def test_non_square_matches_hpsv2_transform(h, w, uint8):
    x = _images(2, h, w)
    ours = hps_preprocess(x, 224)
    assert ours.shape == (2, 3, 224, 224)
    for i in range(2):
        torch.testing.assert_close(ours[i], _ref_float(x[i], 224), atol=1e-4, rtol=0)
        if uint8:
            # PIL's uint8 path rounds between its two passes: within one grey level. (Near 1:1
            # on noise it also clips the first pass's overshoot, so only strong downscales.)
            one_level = float(1 / 255 / STD.min())
            torch.testing.assert_close(ours[i], _ref_uint8(x[i], 224), atol=one_level, rtol=0)


def test_480x832_is_letterboxed_not_cropped():
    x = _images(1, 480, 832)
    out = hps_preprocess(x, 224)
    # 480 * 224 / 832 = 129.2 -> 129 rows of image, 95 of padding: 47 on top, 48 below
    pad = ((torch.zeros(3, 1, 1) - MEAN) / STD).expand(3, 224, 224)
    torch.testing.assert_close(out[0, :, :47], pad[:, :47])
    torch.testing.assert_close(out[0, :, 176:], pad[:, 176:])
    assert (out[0, :, 47] != pad[:, 47]).any() and (out[0, :, 175] != pad[:, 175]).any()
    # the short-side crop used before sees a different (cut) image
    assert not torch.allclose(out, preprocess(x, 224), atol=0.1)


@pytest.mark.parametrize("side", [512, 224, 100])
def test_square_images_are_unchanged_from_the_crop_preprocessing(side):
    x = _images(2, side, side, seed=side)
    assert torch.equal(hps_preprocess(x, 224), preprocess(x, 224))


def test_bad_shape_says_what_is_expected():
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        hps_preprocess(torch.zeros(3, 8, 8))


def test_hps_reward_scores_the_letterboxed_image(tmp_path):
    from transformers import CLIPModel

    torch.manual_seed(3)
    cfg = tiny_clip_config("gelu")
    hf = CLIPModel(cfg).eval()
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": hf_to_open_clip(hf.state_dict())}, ckpt)
    tiny_clip_tokenizer().save_pretrained(tmp_path / "tok")
    r = build_reward("hpsv2", checkpoint=str(ckpt), tokenizer=str(tmp_path / "tok"), config=cfg,
                     device="cpu")
    size = cfg.vision_config.image_size
    media = _images(2, 30, 52)  # 480x832's aspect ratio, small
    prompts = ["a red cat", "blue dog"]
    s = r(media, prompts)

    def cosine(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            img = hf.visual_projection(hf.vision_model(pixel_values=pixels).pooler_output)
            tok = r.embedder.tokenizer(prompts, padding="max_length", truncation=True,
                                       max_length=cfg.text_config.max_position_embeddings,
                                       return_tensors="pt")
            txt = hf.text_projection(hf.text_model(**tok).pooler_output)
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        return (img * txt).sum(-1)

    pixels = torch.stack([_ref_float(m, size) for m in media])
    torch.testing.assert_close(s, cosine(pixels), atol=1e-4, rtol=0)
    assert not torch.allclose(s, cosine(preprocess(media, size)), atol=1e-4)

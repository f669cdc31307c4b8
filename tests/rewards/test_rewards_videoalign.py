"""VideoAlign (VideoReward) on a tiny random Qwen2-VL saved in the released checkpoint layout."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from videoalign_testlib import write_tiny_videoalign

from branchgrpo.rewards import build_reward
from branchgrpo.rewards.base import RewardError
from branchgrpo.rewards.hub import WeightsNotFound
from branchgrpo.rewards.videoalign import (
    PatchSpec,
    frame_indices,
    load_videoalign,
    smart_resize,
    video_patches,
)


@pytest.fixture(scope="module")
def tiny_va(tmp_path_factory):
    return write_tiny_videoalign(str(tmp_path_factory.mktemp("videoalign")))


@pytest.fixture(scope="module")
def reward(tiny_va):
    return build_reward("videoalign", checkpoint=tiny_va[0], device="cpu", dtype="fp32",
                        weights={"VQ": 1.0, "MQ": 1.0, "TA": 1.0})


def _videos(b=2, f=8, seed=0):
    return torch.rand(b, f, 3, 32, 48, generator=torch.Generator().manual_seed(seed))


def test_videoalign_loads_released_layout(tiny_va):
    """The LoRA merge and the 4.45 -> 5.x renaming give back the random model exactly."""
    reward_dir, _, sd = tiny_va
    model, head, tok, cfg, spec = load_videoalign(reward_dir, device="cpu", dtype="fp32")
    got = model.state_dict()
    assert set(got) == set(sd)
    err = max(float((got[k] - sd[k]).abs().max()) for k in sd)
    assert err < 1e-5, err
    assert tuple(head.shape) == (1, 32) and cfg.lora_scale == 2.0 and cfg.fps == 2.0
    assert cfg.mean["MQ"] == 1.1646 and cfg.std["TA"] == 2.5121
    assert spec.patch == 14 and spec.merge == 2
    assert tok.convert_tokens_to_ids("<|TA_reward|>") < got[
        "language_model.embed_tokens.weight"].shape[0]


def test_videoalign_scores_videos_as_videos(reward):
    v = _videos()
    prompts = ["a cat on a red sofa", "a dog in the snow"]
    s = reward(v, prompts)
    assert s.shape == (2,) and s.dtype == torch.float32 and bool(torch.isfinite(s).all())
    assert torch.equal(s, reward(v, prompts))  # deterministic
    assert float((s[0] - s[1]).abs()) > 1e-6  # different videos, different scores
    heads = dict(reward.last_heads)
    assert torch.allclose(s, heads["VQ"] + heads["MQ"] + heads["TA"])
    # reversed in time: each head changes (frames are read as a video, in order)
    reward(v.flip(1), prompts)
    for h in ("VQ", "MQ", "TA"):
        assert float((reward.last_heads[h] - heads[h]).abs().min()) > 1e-6, h


def test_videoalign_prompt_changes_only_text_alignment(reward):
    """The VQ and MQ tokens come before the caption in the template, so with causal attention
    only TA reads the prompt."""
    v = _videos(1)
    reward(v, ["a cat on a red sofa"])
    a = dict(reward.last_heads)
    reward(v, ["a dog in the snow, at night"])
    b = reward.last_heads
    assert torch.allclose(a["VQ"], b["VQ"]) and torch.allclose(a["MQ"], b["MQ"])
    assert float((a["TA"] - b["TA"]).abs()) > 1e-6


def test_videoalign_default_weights_and_normalisation(tiny_va, reward):
    mq = build_reward("videoalign", checkpoint=tiny_va[0], device="cpu", dtype="fp32")
    raw = build_reward("videoalign", checkpoint=tiny_va[0], device="cpu", dtype="fp32",
                       normalize=False, weights={"Overall": 1.0})
    v = _videos()
    s = mq(v, ["x", "y"])
    assert torch.allclose(s, mq.last_heads["MQ"])  # default: BranchGRPO's motion quality
    raw(v, ["x", "y"])
    assert torch.allclose(s, (raw.last_heads["MQ"] - 1.1646) / 1.3811, atol=1e-5)
    assert mq.model is raw.model  # one loaded checkpoint shared
    with pytest.raises(ValueError, match="unknown head"):
        build_reward("videoalign", checkpoint=tiny_va[0], device="cpu", dtype="fp32",
                     weights={"aesthetic": 1.0})


def test_videoalign_refuses_images(reward):
    with pytest.raises(RewardError, match="images cannot be scored"):
        reward(torch.rand(2, 3, 32, 32), ["a", "b"])
    with pytest.raises(RewardError, match="at least 2 frames"):
        reward(torch.rand(2, 1, 3, 32, 32), ["a", "b"])


def test_videoalign_sampling_and_resize_follow_qwen_vl_utils():
    # a Wan2.1 clip: 81 frames at 16 fps, sampled at 2 fps -> 10 frames, 480x832 -> 336x588
    idx = frame_indices(81, 16.0, 2.0, None)
    assert idx.tolist() == torch.linspace(0, 80, 10).round().long().tolist()
    assert frame_indices(8, 16.0, 2.0, None).tolist() == [0, 2, 5, 7]  # at least 4 frames
    assert smart_resize(480, 832, 28, 128 * 28 * 28, 448 * 448) == (336, 588)
    assert smart_resize(32, 48, 28, 128 * 28 * 28, 448 * 448) == (280, 392)


def test_videoalign_patches_match_transformers_processor():
    """Two equal frames give the patches Qwen2-VL's processor makes of the image (the image
    path tiles it to the temporal patch): same layout and normalisation."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(56, 84, 3), dtype=np.uint8)
    ref = Qwen2VLImageProcessorPil()(images=[img], return_tensors="pt")
    frame = torch.from_numpy(img).permute(2, 0, 1).float()
    got, grid = video_patches(torch.stack([frame, frame]), PatchSpec())
    assert grid == tuple(ref["image_grid_thw"][0].tolist())
    assert torch.allclose(got, ref["pixel_values"].float(), atol=1e-5)


def test_videoalign_offline_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(WeightsNotFound, match="huggingface-cli download KwaiVGI/VideoReward"):
        build_reward("videoalign", device="cpu")
    assert time.perf_counter() - t < 10


def test_preflight_refuses_videoalign_for_image_families():
    from branchgrpo.config import ConfigError, load_config
    from branchgrpo.preflight import check_rewards

    cfg = load_config(None, ["reward.weights={videoalign: 1.0}"])  # the embedded image default
    with pytest.raises(ConfigError, match="scores videos only"):
        check_rewards(cfg)
    renamed = load_config(None, ["reward.weights={va_vq: 1.0}",
                                 "reward.options={va_vq: {source: videoalign, weights: {VQ: 1}}}"])
    with pytest.raises(ConfigError, match="reward.weights.va_vq"):
        check_rewards(renamed)
    check_rewards(load_config(None, ["reward.weights={videoalign: 1.0}", "model.kind=wan"]))


def test_videoalign_in_a_reward_set_logs_a_head_separately(tiny_va):
    """``reward.weights={videoalign: 1.0, va_ta: 0.0}`` with ``va_ta`` built from
    ``source: videoalign``: one loaded model, the TA head logged as its own reward."""
    from branchgrpo.rewards import RewardSet

    kw = {"checkpoint": tiny_va[0], "device": "cpu", "dtype": "fp32"}
    ta = {"source": "videoalign", "weights": {"TA": 1}, **kw}
    rs = RewardSet({"videoalign": 1.0, "va_ta": 0.0}, {"videoalign": kw, "va_ta": ta})
    scores = rs.score(_videos(), ["a cat", "a dog"])
    assert scores["videoalign"].shape == (2,) and scores["va_ta"].shape == (2,)
    assert rs.rewards["videoalign"].model is rs.rewards["va_ta"].model
    assert torch.allclose(scores["videoalign"], rs.rewards["videoalign"].last_heads["MQ"])
    assert torch.allclose(scores["va_ta"], rs.rewards["videoalign"].last_heads["TA"])


def test_videoalign_bf16(tiny_va):
    """The released inference dtype (the factory default)."""
    r = build_reward("videoalign", checkpoint=tiny_va[0], device="cpu")
    assert r.head.dtype == torch.bfloat16
    s = r(_videos(), ["a cat", "a dog"])
    assert s.shape == (2,) and s.dtype == torch.float32 and bool(torch.isfinite(s).all())

"""ImageReward rebuilt from transformers BLIP parts, on a tiny random model (no downloads)."""

from __future__ import annotations

import pytest
import torch

from branchgrpo.rewards import build_reward
from branchgrpo.rewards.imagereward import (
    MEAN,
    STD,
    ImageRewardModel,
    hf_to_imagereward,
    imagereward_to_hf,
)
from branchgrpo.rewards.media import CLIP_MEAN, CLIP_STD, preprocess

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "dog", "on", "mat"]


def tiny_configs():
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    text = BlipTextConfig(
        vocab_size=len(WORDS),
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        encoder_hidden_size=32,
        max_position_embeddings=40,
        hidden_act="gelu",
    )
    return vision, text


def tiny_bert_tokenizer(tmp_path):
    from transformers import BertTokenizer

    try:  # transformers >= 5
        tok = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    except TypeError:
        (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
        tok = BertTokenizer(str(tmp_path / "vocab.txt"))
    tok.save_pretrained(tmp_path / "tok")
    return tok, str(tmp_path / "tok")


def test_imagereward_loads_release_format_and_scores(tmp_path):
    torch.manual_seed(0)
    vision, text = tiny_configs()
    ref = ImageRewardModel(vision, text).eval()
    with torch.no_grad():  # O(1)-gain weights, so that the image visibly moves the score
        for p in ref.parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    sd = hf_to_imagereward(ref.state_dict())
    assert "blip.visual_encoder.blocks.1.attn.qkv.weight" in sd
    assert "blip.visual_encoder.cls_token" in sd and "mlp.layers.7.weight" in sd
    back = imagereward_to_hf(sd)
    assert back.keys() == ref.state_dict().keys()
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # old buffers
    torch.save({"state_dict": sd}, tmp_path / "ImageReward.pt")
    tok, tok_dir = tiny_bert_tokenizer(tmp_path)

    r = build_reward(
        "imagereward",
        checkpoint=str(tmp_path),
        tokenizer=tok_dir,
        configs=(vision, text),
        device="cpu",
    )
    g = torch.Generator().manual_seed(1)
    media = torch.rand(3, 3, 32, 32, generator=g)
    prompts = ["a red cat", "a dog on a mat", "cat"]
    s = r(media, prompts)
    assert s.shape == (3,) and s.dtype == torch.float32 and torch.isfinite(s).all()

    t = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert t["input_ids"][0, 0] == WORDS.index("[CLS]")
    with torch.no_grad():
        img = ref.visual_encoder(pixel_values=preprocess(media, 32, CLIP_MEAN, CLIP_STD))
        h = ref.text_encoder(
            input_ids=t["input_ids"],
            attention_mask=t["attention_mask"],
            encoder_hidden_states=img.last_hidden_state,
        ).last_hidden_state[:, 0]
        hand = (ref.mlp(h) - MEAN) / STD
    assert torch.allclose(s, hand, rtol=1e-4, atol=1e-4)
    # the image matters (cross-attention), and a video is the mean over its frames
    assert (r(media.flip(0), prompts) - s).abs().max() > 1e-3
    video = media.unsqueeze(0)
    assert torch.allclose(
        r(video, ["a red cat"]), r(media, ["a red cat"] * 3).mean().view(1), rtol=1e-4, atol=1e-4
    )


def test_imagereward_wrong_checkpoint_is_a_clear_error(tmp_path):
    from branchgrpo.rewards.base import RewardError

    vision, text = tiny_configs()
    torch.save({"mlp.layers.0.weight": torch.zeros(1024, 24)}, tmp_path / "ImageReward.pt")
    _, tok_dir = tiny_bert_tokenizer(tmp_path)
    with pytest.raises(RewardError, match="does not match the BLIP configs: missing"):
        build_reward(
            "imagereward",
            checkpoint=str(tmp_path / "ImageReward.pt"),
            tokenizer=tok_dir,
            configs=(vision, text),
        )

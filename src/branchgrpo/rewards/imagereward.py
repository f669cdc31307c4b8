"""ImageReward (Xu et al. 2023, arXiv 2304.05977).

A BLIP image-grounded text encoder (ViT-L/16 at 224 px + BERT-base with cross-attention) whose
``[CLS]`` output goes through an MLP head; the score is standardised with the training
statistics: ``(mlp(h_cls) - 0.16717) / 1.03334``. Weights: ``ImageReward.pt`` in the hub repo
``THUDM/ImageReward``; tokenizer ``bert-base-uncased`` (35 tokens, as the release).

What we did: the ``image-reward`` package needs the BLIP code base (timm, fairscale); instead the
same network is rebuilt from transformers' ``BlipVisionModel`` and ``BlipTextModel`` (whose text
parameter names equal BLIP's ``med.py``), and :func:`imagereward_to_hf` renames the BLIP ViT
keys (``blocks.i.attn.qkv`` -> ``encoder.layers.i.self_attn.qkv`` ...).

Scale: about 1.0-1.6 for FLUX.1-dev (MixGRPO table: FLUX 1.088, DanceGRPO 1.436; BranchGRPO
README: FLUX 1.112). MixGRPO sums its group-normalised advantage with HPS and PickScore.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from branchgrpo.rewards.aesthetic import ScoreMLP
from branchgrpo.rewards.base import REWARDS, RewardError
from branchgrpo.rewards.hub import (
    hub_file,
    load_pretrained,
    load_state_dict,
    resolve_device,
    resolve_dtype,
)
from branchgrpo.rewards.media import CLIP_MEAN, CLIP_STD, flatten_frames, preprocess

MEAN, STD = 0.16717362830052426, 1.0333394966054072
"""Reward standardisation constants of the ImageReward release."""

_VIT_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VIT_BLOCK = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def default_configs() -> tuple[Any, Any]:
    """``(BlipVisionConfig, BlipTextConfig)`` of ImageReward: ViT-L/16 224 px (LayerNorm eps
    1e-6 as timm), BERT-base with cross-attention to 1024-d image tokens, vocab 30524."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=16,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    text = BlipTextConfig(
        vocab_size=30524,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        encoder_hidden_size=1024,
        max_position_embeddings=512,
        hidden_act="gelu",
    )
    return vision, text


def imagereward_to_hf(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """ImageReward checkpoint names -> :class:`ImageRewardModel` names. Keys outside the
    visual encoder, text encoder and head (projections, buffers) are dropped."""
    block = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        if k.startswith("blip.visual_encoder."):
            rest = k[len("blip.visual_encoder.") :]
            if rest in _VIT_TOP:
                out["visual_encoder." + _VIT_TOP[rest]] = v
            elif (m := block.match(rest)) and m.group(2) in _VIT_BLOCK:
                name = f"encoder.layers.{m.group(1)}.{_VIT_BLOCK[m.group(2)]}.{m.group(3)}"
                out["visual_encoder." + name] = v
            else:
                raise KeyError(f"unknown BLIP ViT parameter {k!r}")
        elif k.startswith("blip.text_encoder."):
            out["text_encoder." + k[len("blip.text_encoder.") :]] = v
        elif k.startswith("mlp.layers."):
            out[k] = v
    return out


def hf_to_imagereward(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`imagereward_to_hf` (writes release-format test checkpoints)."""
    top = {v: k for k, v in _VIT_TOP.items()}
    block = {v: k for k, v in _VIT_BLOCK.items()}
    layer = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("visual_encoder."):
            rest = k[len("visual_encoder.") :]
            if rest in top:
                out["blip.visual_encoder." + top[rest]] = v
            else:
                m = layer.match(rest)
                if m is None:
                    raise KeyError(f"unknown parameter {k!r}")
                out[f"blip.visual_encoder.blocks.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"] = v
        elif k.startswith("text_encoder."):
            out["blip." + k] = v
        else:
            out[k] = v
    return out


class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP text encoder (cross-attention) + :class:`ScoreMLP` head.

    ``forward(pixel [N, 3, S, S] normalised, input_ids [N, L], attention_mask [N, L]) -> [N]``
    standardised rewards."""

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        super().__init__()
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.visual_encoder = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = ScoreMLP(text_config.hidden_size)

    def forward(self, pixel: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_embeds = self.visual_encoder(pixel_values=pixel).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=pixel.device)
        h = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        ).last_hidden_state[:, 0]
        return (self.mlp(h.float()) - MEAN) / STD


class ImageReward:
    """ImageReward: media ``[B, C, H, W]`` / ``[B, F, C, H, W]`` in [0, 1] -> fp32 ``[B]``."""

    groupwise = False
    name = "imagereward"

    def __init__(
        self,
        model: ImageRewardModel,
        tokenizer: Any,
        image_size: int,
        max_length: int = 35,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.model.mlp.float()
        self.tokenizer, self.image_size, self.max_length = tokenizer, image_size, max_length

    @torch.no_grad()
    def __call__(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        images, frames = flatten_frames(media)
        pixel = preprocess(images.to(self.device).float(), self.image_size, CLIP_MEAN, CLIP_STD)
        tok = self.tokenizer(
            [p for p in prompts for _ in range(frames)],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        s = self.model(
            pixel.to(self.dtype),
            tok["input_ids"].to(self.device),
            tok["attention_mask"].to(self.device),
        )
        return s.float().reshape(-1, frames).mean(1).cpu()


@REWARDS.register("imagereward")
def imagereward(
    checkpoint: str = "THUDM/ImageReward",
    filename: str = "ImageReward.pt",
    tokenizer: str = "bert-base-uncased",
    configs: tuple[Any, Any] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> ImageReward:
    """``checkpoint``: hub repo (with ``filename``), a local ``.pt``/``.safetensors`` or a
    folder holding it. ``configs``: ``(BlipVisionConfig, BlipTextConfig)``, default
    :func:`default_configs`."""
    from transformers import AutoTokenizer

    vision, text = configs if configs is not None else default_configs()
    path = hub_file(checkpoint, filename, "ImageReward")
    model = ImageRewardModel(vision, text)
    sd = imagereward_to_hf(load_state_dict(path))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RewardError(
            f"ImageReward checkpoint {os.fspath(path)!r} does not match the BLIP configs: "
            f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    tok = load_pretrained(AutoTokenizer.from_pretrained, tokenizer, "ImageReward tokenizer")
    return ImageReward(model, tok, int(vision.image_size), device=device, dtype=dtype)

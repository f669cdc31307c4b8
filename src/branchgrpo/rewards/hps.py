"""HPS-v2.1 (Wu et al. 2023, "Human Preference Score v2", arXiv 2306.09341).

The model is open_clip's ViT-H-14 fine-tuned on HPD v2; weights ``HPS_v2.1_compressed.pt`` in the
hub repo ``xswu/HPSv2``, an open_clip state dict. open_clip needs torchvision, so we rebuild the
same network with transformers' ``CLIPModel`` and convert the open_clip key names
(:func:`open_clip_to_hf`). Tokenizer: the OpenAI BPE of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.

Score (HPSv2 ``img_score.py``, and DanceGRPO / BranchGRPO / MixGRPO training): the dot product of
the L2-normalised image and text features, no logit scale, about 0.24-0.37 (FLUX.1-dev: 0.313).

Preprocessing is HPSv2's evaluation transform (its open_clip ``image_transform`` with
``resize_longest_max=True``), not CLIP's short-side crop: bicubic resize of the longest side to
224, zero padding to a square (centred, the odd pixel at the bottom/right), OpenAI mean/std
(:func:`hps_preprocess`). A 480x832 video frame is scored whole, letterboxed, as HPSv2 does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from branchgrpo.rewards.base import REWARDS, RewardError
from branchgrpo.rewards.clip import ClipEmbedder, ClipReward
from branchgrpo.rewards.hub import hub_file, load_pretrained, load_state_dict
from branchgrpo.rewards.media import CLIP_MEAN, CLIP_STD, rgb_float

_BLOCK = {  # open_clip residual block -> transformers CLIPEncoderLayer
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP = {  # open_clip -> transformers, tensors copied as-is
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {
    "text_projection": "text_projection.weight",
    "visual.proj": "visual_projection.weight",
}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_IGNORED = {"attn_mask", "logit_bias"}


def open_clip_to_hf(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Convert an open_clip ``CLIP`` state dict (ViT towers) to transformers ``CLIPModel`` names.

    ``attn.in_proj_weight [3w, w]`` is split into q/k/v; ``text_projection [w, e]`` and
    ``visual.proj [w, e]`` (used as ``x @ proj``) become Linear weights ``[e, w]``."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k in _IGNORED:
            continue
        if k in _TOP:
            out[_TOP[k]] = v
        elif k in _TRANSPOSED:
            out[_TRANSPOSED[k]] = v.t().contiguous()
        elif m := _RESBLOCK.match(k):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{m.group(2)}."
            rest = m.group(3)
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, part in zip(("q", "k", "v"), v.chunk(3, dim=0), strict=True):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.contiguous()
            else:
                mod, _, param = rest.rpartition(".")
                if mod not in _BLOCK:
                    raise KeyError(f"unknown open_clip block parameter {k!r}")
                out[f"{prefix}{_BLOCK[mod]}.{param}"] = v
        else:
            raise KeyError(f"unknown open_clip parameter {k!r} (is this an open_clip ViT CLIP?)")
    return out


def hf_to_open_clip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`open_clip_to_hf` (used to write open_clip-format test checkpoints)."""
    top = {v: k for k, v in _TOP.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    block = {v: k for k, v in _BLOCK.items()}
    layer = re.compile(r"^(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)$")
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
        elif k in transposed:
            out[transposed[k]] = v.t().contiguous()
        elif m := layer.match(k):
            prefix = (
                "visual." if m.group(1) == "vision" else ""
            ) + f"transformer.resblocks.{m.group(2)}."
            mod, _, param = m.group(3).rpartition(".")
            if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"{prefix}attn.in_proj_{param}", {})[mod[-6]] = v
            else:
                out[f"{prefix}{block[mod]}.{param}"] = v
        else:
            raise KeyError(f"unknown transformers CLIP parameter {k!r}")
    for k, parts in qkv.items():
        out[k] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def vit_h14_config() -> Any:
    """transformers ``CLIPConfig`` of open_clip ViT-H-14 (GELU, 224 px, patch 14, embed 1024)."""
    from transformers import CLIPConfig

    text = dict(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
    )
    vision = dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024)


def load_open_clip(path: str, config: Any) -> Any:
    """A transformers ``CLIPModel(config)`` holding the open_clip checkpoint at ``path``."""
    from transformers import CLIPModel

    model = CLIPModel(config)
    sd = open_clip_to_hf(load_state_dict(path))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RewardError(
            f"checkpoint {path!r} does not match the CLIP config: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    return model


def hps_preprocess(
    images: Tensor,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Tensor:
    """HPSv2's evaluation preprocessing in torch, batched (``ResizeMaxSize`` + normalise):
    bicubic, antialiased resize so the longest side is ``size`` (the other side
    ``round(side * size / longest)``), pad with 0 to ``size x size`` (left/top ``pad // 2``,
    right/bottom the rest), then ``(x - mean) / std``.

    images ``[N, 3, H, W]`` (or ``[N, 1, H, W]``) in [0, 1] -> ``[N, 3, size, size]`` (same
    dtype/device). A square image gives exactly what :func:`preprocess` gives (resize, no crop).
    Unlike HPSv2, an image whose longest side is already ``size`` is still padded to a square
    (HPSv2 would pass it through unpadded, which its ViT cannot take)."""
    x, dtype = rgb_float(images)
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    nh, nw = round(h * scale), round(w * scale)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0, 1)
    ph, pw = size - nh, size - nw
    if ph or pw:
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return ((x - m) / s).to(dtype)


class HpsEmbedder(ClipEmbedder):
    """A :class:`ClipEmbedder` whose images go through :func:`hps_preprocess` (HPSv2's
    longest-side resize and zero padding) instead of the short-side resize and centre crop."""

    def pixels(self, images: Tensor) -> Tensor:
        """images ``[N, 3, H, W]`` in [0, 1] -> HPSv2's pixel values ``[N, 3, S, S]`` fp32."""
        return hps_preprocess(images.to(self.device).float(), self.image_size, self.mean,
                              self.std)


@REWARDS.register("hpsv2")
def hpsv2(
    checkpoint: str = "xswu/HPSv2",
    filename: str = "HPS_v2.1_compressed.pt",
    tokenizer: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    config: Any = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> ClipReward:
    """HPS-v2.1 reward: media ``[B, ...]``, B prompts -> fp32 ``[B]`` (normalised dot product).

    ``checkpoint``: hub repo (with ``filename``), a local ``.pt``/``.safetensors`` open_clip
    state dict, or a folder holding an already converted transformers CLIPModel. ``config``:
    a ``CLIPConfig`` (default :func:`vit_h14_config`) for open_clip checkpoints.
    """
    from transformers import AutoTokenizer, CLIPModel

    if os.path.isdir(checkpoint) and os.path.isfile(os.path.join(checkpoint, "config.json")):
        model = load_pretrained(CLIPModel.from_pretrained, checkpoint, "HPS-v2.1")
    else:
        config = vit_h14_config() if config is None else config
        model = load_open_clip(hub_file(checkpoint, filename, "HPS-v2.1"), config)
    tok = load_pretrained(AutoTokenizer.from_pretrained, tokenizer, "HPS-v2.1 tokenizer")
    size = int(model.config.vision_config.image_size)
    embedder = HpsEmbedder(model, tok, size, CLIP_MEAN, CLIP_STD, device, dtype)
    return ClipReward(embedder, "hpsv2", "cos", 1.0)

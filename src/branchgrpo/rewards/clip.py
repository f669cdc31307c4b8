"""CLIP score, and the CLIP embedding code shared by PickScore, HPS-v2.1 and the aesthetic head.

CLIP score (Radford et al. 2021; Hessel et al. 2021, arXiv 2104.08718): cosine similarity of the
L2-normalised image and text embeddings. Scales used by the papers (docs/algorithms.md §1.6):

- ``form="cos"``: the raw cosine (about 0.2-0.35 for matching pairs). G2RPO's hps_clip recipe
  and DanceGRPO's HPS+CLIP combination use a raw-cosine CLIP score.
- ``form="logit"``: ``logit_scale.exp() * cos`` (CLIP's logits, about 20-35); Flow-GRPO's
  CLIPScore reward is this divided by 30 (``scale=30``), with ``openai/clip-vit-large-patch14``.

Preprocessing runs in torch on the media tensors: bicubic resize of the short side, centre
crop, normalisation with the processor's mean/std (``preprocessor_config.json``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from branchgrpo.rewards.base import REWARDS
from branchgrpo.rewards.hub import load_pretrained, read_json, resolve_device, resolve_dtype
from branchgrpo.rewards.media import CLIP_MEAN, CLIP_STD, flatten_frames, preprocess


class ClipEmbedder:
    """A transformers ``CLIPModel`` + tokenizer that embeds media and prompts.

    ``images(x [N, 3, H, W] in [0, 1]) -> [N, D]`` and ``texts(prompts) -> [N, D]``, both
    L2-normalised fp32. The model runs on ``device`` in ``dtype``.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_size: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @property
    def logit_scale(self) -> Tensor:
        """``exp(logit_scale)``, fp32 scalar."""
        return self.model.logit_scale.detach().float().exp()

    def pixels(self, images: Tensor) -> Tensor:
        """images ``[N, 3, H, W]`` in [0, 1] -> normalised pixel values ``[N, 3, S, S]`` fp32:
        CLIP's short-side resize and centre crop (`branchgrpo.rewards.media.preprocess`)."""
        return preprocess(images.to(self.device).float(), self.image_size, self.mean, self.std)

    @torch.no_grad()
    def images(self, images: Tensor) -> Tensor:
        """images ``[N, 3, H, W]`` in [0, 1] -> normalised features ``[N, D]`` fp32."""
        out = self.model.vision_model(pixel_values=self.pixels(images).to(self.dtype))
        f = self.model.visual_projection(out.pooler_output).float()
        return f / f.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def texts(self, prompts: Sequence[str]) -> Tensor:
        """prompts (N) -> normalised features ``[N, D]`` fp32 (padded/truncated to 77 tokens)."""
        tok = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        out = self.model.text_model(
            input_ids=tok["input_ids"].to(self.device),
            attention_mask=tok["attention_mask"].to(self.device),
        )
        f = self.model.text_projection(out.pooler_output).float()
        return f / f.norm(dim=-1, keepdim=True)

    def cosine(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        """Cosine of each image (or frame) with its prompt: media ``[B, ...]`` -> ``[B*F]``."""
        images, frames = flatten_frames(media)
        txt = self.texts(prompts).repeat_interleave(frames, dim=0)
        return (self.images(images) * txt).sum(-1)


def image_config(processor: str, default_size: int) -> tuple[int, tuple, tuple]:
    """``(crop size, mean, std)`` from ``preprocessor_config.json`` of ``processor``."""
    cfg = read_json(processor, "preprocessor_config.json") or {}
    size: Any = cfg.get("crop_size", default_size)
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge", default_size))
    return int(size), tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))


def load_clip(
    model: str,
    processor: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    what: str = "CLIP",
) -> ClipEmbedder:
    """A :class:`ClipEmbedder` from a transformers CLIP folder or hub id; the tokenizer and
    image settings come from ``processor`` (default: the model itself)."""
    from transformers import AutoTokenizer, CLIPModel

    processor = processor or model
    clip = load_pretrained(CLIPModel.from_pretrained, model, what)
    tok = load_pretrained(AutoTokenizer.from_pretrained, processor, f"{what} tokenizer")
    size, mean, std = image_config(processor, int(clip.config.vision_config.image_size))
    return ClipEmbedder(clip, tok, size, mean, std, device, dtype)


class ClipReward:
    """``cos`` or ``logit_scale * cos``, divided by ``scale``; videos: mean over frames.

    media ``[B, C, H, W]`` / ``[B, F, C, H, W]`` in [0, 1], B prompts -> fp32 ``[B]``.
    """

    groupwise = False

    def __init__(
        self, embedder: ClipEmbedder, name: str = "clip", form: str = "cos", scale: float = 1.0
    ) -> None:
        if form not in ("cos", "logit"):
            raise ValueError(f"{name}: form must be 'cos' or 'logit', got {form!r}")
        self.embedder, self.name, self.form, self.scale = embedder, name, form, scale

    def __call__(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        frames = flatten_frames(media)[1]
        s = self.embedder.cosine(media, prompts)
        if self.form == "logit":
            s = self.embedder.logit_scale * s
        return (s / self.scale).reshape(-1, frames).mean(1).cpu()


@REWARDS.register("clip")
def clip(
    model: str = "openai/clip-vit-large-patch14",
    processor: str | None = None,
    form: str = "cos",
    scale: float = 1.0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> ClipReward:
    """CLIP score with any transformers CLIP (e.g. ``openai/clip-vit-large-patch14``, or
    ``apple/DFN5B-CLIP-ViT-H-14-378`` converted to transformers). Flow-GRPO: ``form="logit",
    scale=30``."""
    return ClipReward(load_clip(model, processor, device, dtype, "CLIP"), "clip", form, scale)

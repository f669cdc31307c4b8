"""PickScore (Kirstain et al. 2023, "Pick-a-Pic", arXiv 2305.01569).

A CLIP ViT-H/14 fine-tuned on human preferences: weights ``yuvalkirstain/PickScore_v1``, with the
tokenizer/processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (224 px, OpenAI mean/std).
The paper's score is ``logit_scale.exp() * cos(image, text)`` (about 18-23).

Scales in the RL papers (docs/algorithms.md §1.6):

- ``form="cos"`` (default): the raw cosine, about 0.22-0.23 on FLUX; DanceGRPO and BranchGRPO
  train and report this.
- ``form="logit", scale=26``: Flow-GRPO (``logit_scale * cos / 26``).
- MixGRPO trains on ``(logit_scale * cos - mean) / std`` and reports ``/100``; use
  ``form="logit"`` and let the group normalisation do the rest.
"""

from __future__ import annotations

import torch

from branchgrpo.rewards.base import REWARDS
from branchgrpo.rewards.clip import ClipReward, load_clip


@REWARDS.register("pickscore")
def pickscore(
    model: str = "yuvalkirstain/PickScore_v1",
    processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    form: str = "cos",
    scale: float = 1.0,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> ClipReward:
    """PickScore reward: media ``[B, ...]``, B prompts -> fp32 ``[B]`` (see module docstring)."""
    embedder = load_clip(model, processor, device, dtype, "PickScore")
    return ClipReward(embedder, "pickscore", form, scale)

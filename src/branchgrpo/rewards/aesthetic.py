"""LAION aesthetic predictor v2 (Schuhmann, "improved-aesthetic-predictor"; used by DDPO and
Flow-GRPO).

An MLP head on the L2-normalised CLIP ViT-L/14 image embedding (``openai/clip-vit-large-patch14``,
768-d), trained on SAC+LOGOS+AVA with MSE: weights ``sac+logos+ava1-l14-linearMSE.pth``
(the same tensors are in ``trl-lib/ddpo-aesthetic-predictor`` as ``aesthetic-model.pth``).
Scale: an aesthetic rating on a 1-10 scale, typically 4.5-7 for generated images. The prompt
is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from branchgrpo.rewards.base import REWARDS
from branchgrpo.rewards.clip import ClipEmbedder, load_clip
from branchgrpo.rewards.hub import hub_file, load_state_dict
from branchgrpo.rewards.media import flatten_frames


class ScoreMLP(nn.Module):
    """The head of the aesthetic predictor and of ImageReward: five Linear layers with dropout
    between the first four and **no** nonlinearity (as released).

    ``[N, d] -> [N]``; parameter names ``layers.{0,2,4,6,7}.{weight,bias}``."""

    def __init__(self, in_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x).squeeze(-1)


class AestheticReward:
    """``mlp(normalise(clip_image_features(x)))``: media ``[B, ...]`` -> fp32 ``[B]``."""

    groupwise = False
    name = "aesthetic"

    def __init__(self, embedder: ClipEmbedder, head: ScoreMLP) -> None:
        self.embedder = embedder
        self.head = head.to(embedder.device).float().eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        images, frames = flatten_frames(media)
        s = self.head(self.embedder.images(images))
        return s.reshape(-1, frames).mean(1).float().cpu()


@REWARDS.register("aesthetic")
def aesthetic(
    clip: str = "openai/clip-vit-large-patch14",
    head: str = "trl-lib/ddpo-aesthetic-predictor",
    head_file: str = "aesthetic-model.pth",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> AestheticReward:
    """``clip``: transformers CLIP id/folder; ``head``: a ``.pth`` file, a folder, or a hub repo
    holding ``head_file``."""
    embedder = load_clip(clip, None, device, dtype, "aesthetic CLIP")
    mlp = ScoreMLP(int(embedder.model.config.projection_dim))
    mlp.load_state_dict(load_state_dict(hub_file(head, head_file, "aesthetic head")))
    return AestheticReward(embedder, mlp)

"""A user reward (loaded by dotted path) that scores every image the same: no learning signal."""

import torch


def score(media, prompts):
    return torch.full((len(prompts),), 0.5)

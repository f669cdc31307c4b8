"""A user reward (loaded by dotted path) that turns NaN on its third call in a process
(the first is the evaluation before training, the second iteration 1)."""

import torch

CALLS = {"n": 0}


def score(media, prompts):
    CALLS["n"] += 1
    value = float("nan") if CALLS["n"] >= 3 else 0.0
    return torch.full((len(prompts),), value) + torch.arange(len(prompts)) * 0.01

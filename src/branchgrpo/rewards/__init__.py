"""Reward models for online RL: the protocol, a registry of factories, weighted sets, a server
and its client. The embedded task's rewards register from the tasks side (`branchgrpo.scoring`
imports them for the recipe). Heavy dependencies (transformers, onnxruntime) are imported only
when a model reward is built.

>>> from branchgrpo.rewards import build_reward, REWARDS
>>> "jpeg_compressibility" in REWARDS
True
"""

from branchgrpo.rewards import (  # noqa: F401  (imported to register their factories)
    aesthetic,
    client,
    clip,
    hps,
    imagereward,
    jpeg,
    ocr,
    pickscore,
    videoalign,
    vlm,
)
from branchgrpo.rewards.base import (
    REWARDS,
    Reward,
    RewardError,
    RewardSet,
    build_reward,
    check_scores,
    weighted_sum,
)
from branchgrpo.rewards.client import RemoteClient, RemoteReward

__all__ = [
    "REWARDS",
    "RemoteClient",
    "RemoteReward",
    "Reward",
    "RewardError",
    "RewardSet",
    "build_reward",
    "check_scores",
    "weighted_sum",
]

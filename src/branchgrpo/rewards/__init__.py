"""Reward models for online RL: the protocol, a registry of factories, weighted sets, a server
and its client. Heavy dependencies (transformers, onnxruntime) are imported only when a model
reward is built.

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
from branchgrpo.rewards.scorer import AsyncScorer
from branchgrpo.tasks import shapes_reward  # noqa: F401,E402  (registers "shapes", "judge")

__all__ = [
    "REWARDS",
    "AsyncScorer",
    "RemoteClient",
    "RemoteReward",
    "Reward",
    "RewardError",
    "RewardSet",
    "build_reward",
    "check_scores",
    "weighted_sum",
]

"""The run's rewards, assembled by the recipe: the training `RewardSet` of ``reward.weights``
and the held-out judge of ``reward.judge``.

Reward factories live in a registry (`branchgrpo.rewards.REWARDS`) that ``branchgrpo.rewards``
fills with its own models; the embedded task's rewards (``shapes``, ``judge``) register from
the tasks side, and this module, where every recipe command gets its rewards, imports them, so
the rewards package never imports the tasks above it.
"""

from __future__ import annotations

from pathlib import Path

from .config import Config
from .rewards import REWARDS, Reward, RewardSet, build_reward
from .tasks import shapes_reward  # noqa: F401  (registers "shapes" and "judge")

__all__ = ["REWARDS", "judge", "reward_set"]


def reward_set(cfg: Config) -> RewardSet:
    """The weighted training rewards of ``reward.weights`` (options ``reward.options``),
    scored ``reward.batch_size`` images per call."""
    return RewardSet(dict(cfg.reward.weights), dict(cfg.reward.options),
                     batch_size=cfg.reward.batch_size)


def judge(cfg: Config, progress: bool = True) -> Reward | None:
    """The held-out judge (``reward.judge``): the embedded task's trained shapes judge
    (cached under ``model.cache_dir``), any registered reward, or None."""
    if not cfg.reward.judge:
        return None
    if cfg.reward.judge == "judge":
        return shapes_reward.ShapesJudge.cached(Path(cfg.model.cache_dir).expanduser(),
                                                cfg.log.progress and progress)
    return build_reward(cfg.reward.judge)

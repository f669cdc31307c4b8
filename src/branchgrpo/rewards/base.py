"""The reward protocol, the reward registry, score validation and weighted combination.

Media convention: images are float tensors ``[B, C, H, W]`` in ``[0, 1]``; videos are
``[B, F, C, H, W]`` in ``[0, 1]``. A reward returns fp32 scores ``[B]``, higher is better.

Combining several rewards (docs/algorithms.md §1.6): Flow-GRPO sums weighted raw rewards
(``r = sum_k w_k r_k``, :func:`weighted_sum`); MixGRPO and G2RPO normalise each reward within its
group and sum the advantages. :class:`RewardSet` therefore returns one score tensor per reward
and leaves the choice to the advantage rule.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from branchgrpo.engine.registry import Registry

__all__ = [
    "REWARDS",
    "Reward",
    "RewardError",
    "RewardSet",
    "build_reward",
    "check_scores",
    "reward_name",
    "weighted_sum",
]


@runtime_checkable
class Reward(Protocol):
    """A reward model seen by the trainer.

    ``__call__(media, prompts)``: media ``[B, C, H, W]`` or ``[B, F, C, H, W]`` in [0, 1] and B
    prompts -> fp32 scores ``[B]`` (higher is better). An optional attribute ``groupwise = True``
    means the reward is called once per group (all media of one prompt's group) and may compare
    the members. A plain function with this signature is also a valid reward.
    """

    name: str

    def __call__(self, media: Tensor, prompts: Sequence[str]) -> Tensor: ...


class RewardError(RuntimeError):
    """A reward produced unusable scores (NaN, inf, missing) or could not be reached/loaded."""


REWARDS = Registry[Callable[..., Reward]]("reward")
"""Reward *factories* by name: ``REWARDS.get("jpeg_compressibility")(**kwargs) -> Reward``."""


def reward_name(reward: Any) -> str:
    """The reward's ``name`` attribute, else its function name."""
    return str(getattr(reward, "name", None) or getattr(reward, "__name__", type(reward).__name__))


def check_scores(name: str, scores: Any, batch_size: int) -> Tensor:
    """Validate the output of reward ``name``: shape ``[batch_size]``, all finite.

    Returns the scores as an fp32 tensor ``[B]`` (on the device they came on). Raises
    :class:`RewardError` naming the reward and the number of bad samples.
    """
    if scores is None:
        raise RewardError(f"reward {name!r} returned no scores for {batch_size} samples")
    if not isinstance(scores, Tensor):
        try:
            scores = torch.as_tensor(scores, dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise RewardError(f"reward {name!r} returned non-numeric scores: {e}") from e
    scores = scores.detach().to(torch.float32)
    if scores.dim() == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if tuple(scores.shape) != (batch_size,):
        missing = batch_size - scores.numel() if scores.dim() == 1 else 0
        extra = f" ({missing} missing)" if missing > 0 else ""
        raise RewardError(
            f"reward {name!r} returned scores of shape {tuple(scores.shape)}, expected "
            f"[{batch_size}]{extra}"
        )
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        n = int(bad.sum())
        raise RewardError(
            f"reward {name!r} returned {n} non-finite score(s) (NaN/inf) out of {batch_size}"
        )
    return scores


class _NamedReward:
    """Gives a plain function a ``name`` (and keeps its ``groupwise`` flag)."""

    def __init__(self, fn: Callable[[Tensor, Sequence[str]], Tensor], name: str) -> None:
        self.fn = fn
        self.name = name
        self.groupwise = bool(getattr(fn, "groupwise", False))

    def __call__(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.fn(media, prompts)


def _import_path(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward path {path!r} must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"cannot import module {module_name!r} for reward {path!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportError(f"module {module_name!r} has no attribute {attr!r} (reward {path!r})")
        obj = getattr(obj, part)
    return obj


def build_reward(name: str, /, **kwargs: Any) -> Reward:
    """Build a reward from a registered name or a dotted path.

    - ``name`` in :data:`REWARDS` (``"jpeg_compressibility"``, ``"hpsv2"``, ...): the registered
      factory is called with ``kwargs``.
    - ``"pkg.module:attr"``: ``attr`` is imported. A **class** is instantiated with ``kwargs``;
      a **function with kwargs given** is treated as a factory and called with them; a function
      without kwargs is the reward itself (``fn(media, prompts) -> [B]``). A result without a
      ``name`` attribute gets the attribute's name.
    """
    if ":" in name:
        target = _import_path(name)
        if inspect.isclass(target) or kwargs:
            reward = target(**kwargs)
        else:
            reward = target
        default = name.rpartition(":")[2].rpartition(".")[2]
    else:
        reward = REWARDS.get(name)(**kwargs)
        default = name
    if not callable(reward):
        raise TypeError(f"reward {name!r} built a non-callable {type(reward).__name__}")
    if not isinstance(getattr(reward, "name", None), str):
        try:
            reward.name = default  # type: ignore[union-attr]
        except AttributeError:
            reward = _NamedReward(reward, default)
    return reward  # type: ignore[return-value]


def weighted_sum(scores: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """``r = sum_k w_k r_k`` over the rewards in ``weights`` (Flow-GRPO ``multi_score``).

    scores: name -> ``[B]``; weights: name -> float. Returns fp32 ``[B]``.
    """
    missing = [k for k in weights if k not in scores]
    if missing:
        raise RewardError(f"weighted_sum: no scores for reward(s) {missing}")
    if not weights:
        raise ValueError("weighted_sum needs at least one weight")
    return sum(float(w) * scores[k].to(torch.float32) for k, w in weights.items())  # type: ignore[return-value]


class RewardSet:
    """Several rewards, each with a weight, scored together.

    ``weights``: output name -> weight. ``kwargs``: output name -> keyword arguments for
    :func:`build_reward`; the special key ``"source"`` names what to build (a registered name or
    ``pkg.module:attr``), defaulting to the output name itself. Instead of names, ready reward
    objects may be given in ``rewards`` (output name -> reward).

    Pointwise rewards are called on chunks of at most ``batch_size`` samples; groupwise rewards
    once per group id. Scores are validated with :func:`check_scores` and returned on the CPU.

    >>> rs = RewardSet({"jpeg_compressibility": 1.0})
    >>> s = rs.score(torch.zeros(2, 3, 8, 8), ["a", "b"])
    >>> sorted(s), s["jpeg_compressibility"].shape
    (['jpeg_compressibility'], torch.Size([2]))
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        rewards: Mapping[str, Callable[..., Any]] | None = None,
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.weights = {k: float(v) for k, v in weights.items()}
        self.batch_size = batch_size
        self.rewards: dict[str, Reward] = dict(rewards or {})  # type: ignore[arg-type]
        kwargs = kwargs or {}
        unknown = set(kwargs) - set(self.weights)
        if unknown:
            raise ValueError(f"reward kwargs given for {sorted(unknown)} which have no weight")
        for key in self.weights:
            if key in self.rewards:
                continue
            kw = dict(kwargs.get(key, {}))
            source = kw.pop("source", key)
            if source == "remote" and "names" not in kw:
                kw.setdefault("name", key)  # the served name defaults to the output name
            self.rewards[key] = build_reward(source, **kw)

    @property
    def names(self) -> list[str]:
        return list(self.rewards)

    def score(
        self,
        media: Tensor,
        prompts: Sequence[str],
        group: Tensor | None = None,
        names: Sequence[str] | None = None,
    ) -> dict[str, Tensor]:
        """Score media ``[B, ...]`` with every reward (or the subset ``names``).

        ``group``: int ``[B]`` group ids; needed by groupwise rewards (default: one group).
        Returns name -> fp32 ``[B]`` on the CPU.
        """
        b = media.shape[0]
        if len(prompts) != b:
            raise ValueError(f"got {b} media but {len(prompts)} prompts")
        if group is not None and tuple(group.shape) != (b,):
            raise ValueError(f"group must have shape [{b}], got {tuple(group.shape)}")
        selected = list(self.rewards) if names is None else list(names)
        out: dict[str, Tensor] = {}
        for key in selected:
            if key not in self.rewards:
                raise KeyError(f"unknown reward {key!r}; this set has {sorted(self.rewards)}")
            reward = self.rewards[key]
            if getattr(reward, "groupwise", False):
                out[key] = self._groupwise(key, reward, media, prompts, group)
            else:
                out[key] = self._pointwise(key, reward, media, prompts)
        return out

    def _pointwise(self, key: str, reward: Any, media: Tensor, prompts: Sequence[str]) -> Tensor:
        parts = []
        for i in range(0, media.shape[0], self.batch_size):
            chunk = media[i : i + self.batch_size]
            s = check_scores(key, reward(chunk, list(prompts[i : i + self.batch_size])), len(chunk))
            parts.append(s.cpu())
        return torch.cat(parts)

    def _groupwise(
        self, key: str, reward: Any, media: Tensor, prompts: Sequence[str], group: Tensor | None
    ) -> Tensor:
        b = media.shape[0]
        if group is None:
            group = torch.zeros(b, dtype=torch.long)
        group = group.cpu()
        out = torch.empty(b, dtype=torch.float32)
        for g in torch.unique(group):
            idx = torch.nonzero(group == g).flatten()
            s = reward(media[idx.to(media.device)], [prompts[int(i)] for i in idx])
            out[idx] = check_scores(key, s, len(idx)).cpu()
        return out

    def weighted(self, scores: Mapping[str, Tensor]) -> Tensor:
        """:func:`weighted_sum` with this set's weights."""
        return weighted_sum(scores, self.weights)

    def metrics(self, scores: Mapping[str, Tensor]) -> dict[str, float]:
        """Mean score per reward under the keys ``reward/<name>``."""
        return {f"reward/{k}": float(v.float().mean()) for k, v in scores.items()}

"""Asynchronous scoring: overlap reward computation with the rollout of the next chunk."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from torch import Tensor

from branchgrpo.rewards.base import RewardSet


class AsyncScorer:
    """Runs :meth:`RewardSet.score` on a background thread and returns futures.

    Usage (the trainer overlaps scoring with the next rollout chunk)::

        scorer = AsyncScorer(reward_set)
        fut = scorer.submit(images, prompts, group)
        ...  # roll out the next chunk meanwhile
        scores = fut.result()  # name -> fp32 [B], as RewardSet.score

    ``workers=1`` keeps requests in order and one model call at a time (GPU rewards are not
    re-entrant); remote rewards tolerate more. Media are detached (and cloned with
    ``clone=True``) at submission, so the caller may reuse its buffers right away.
    """

    def __init__(self, reward_set: RewardSet, workers: int = 1, clone: bool = True) -> None:
        self.reward_set = reward_set
        self.clone = clone
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward")

    def submit(
        self, media: Tensor, prompts: Sequence[str], group: Tensor | None = None
    ) -> Future[dict[str, Tensor]]:
        """Schedule scoring of media ``[B, ...]``; the future yields name -> fp32 ``[B]``."""
        media = media.detach()
        if self.clone:
            media = media.clone()
            group = None if group is None else group.clone()
        return self.pool.submit(self.reward_set.score, media, list(prompts), group)

    def close(self) -> None:
        """Wait for pending work and stop the thread."""
        self.pool.shutdown(wait=True)

    def __enter__(self) -> AsyncScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

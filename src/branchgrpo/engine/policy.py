"""The Policy protocol: what the rollout engine and the losses need from a generator.

A policy is any object with these members; there is no base class to inherit. LoRA, EMA,
FSDP and checkpoint I/O stay off the policy (``models/lora.py``, ``train.py``, ``dist.py``,
``checkpoint.py``).

Conventions (docs/algorithms.md §1.1): rectified flow, ``x_sigma = (1 - sigma) x0 + sigma eps``,
velocity target ``v = eps - x0``; generation runs sigma 1 -> 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

Cond = dict[str, Tensor]
"""Prompt conditioning: every value has a leading prompt dimension B and is row-indexable."""


def select_cond(cond: Cond, index: Tensor) -> Cond:
    """Rows ``index`` [N] of every conditioning tensor ([B, ...] -> [N, ...])."""
    return {k: v.index_select(0, index.to(v.device)) for k, v in cond.items()}


@runtime_checkable
class Policy(Protocol):
    """A flow-matching generator seen by the RL code.

    ``latent_shape``: the per-sample latent shape (no batch dim), e.g. ``(64, 12)`` for packed
    FLUX tokens or ``(3, 8, 8)`` for a pixel-space model.

    Optional ``token_period``: pixels per token side in decoded media (tiny 2, FLUX/SD3/Wan the
    VAE factor x patch size, 16); the ``monitor/grid`` artefact monitor reads energy at that
    period (`evaluate.token_period` treats a policy without it as period 1: no grid).
    """

    latent_shape: tuple[int, ...]

    def encode(self, prompts: Sequence[str]) -> Cond:
        """Prompt conditioning for B prompts (computed once per prompt, cached by the policy)."""
        ...

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """Velocity ``v`` [N, *latent_shape] in fp32 at latents x [N, *latent_shape], noise level
        sigma [N] in [0, 1], conditioning rows aligned with x. Guidance happens inside."""
        ...

    def decode(self, x0: Tensor) -> Tensor:
        """Media in [0, 1] from clean latents: images [N, C, H, W], videos [N, F, C, H, W]."""
        ...

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        """The parameters the optimizer updates (all of them, or only LoRA weights)."""
        ...

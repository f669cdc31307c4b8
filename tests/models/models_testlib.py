"""Shared helpers of the model tests: the tiny families, and running each family's own
diffusers pipeline on given initial latents and sigmas."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from branchgrpo.models.flux import tiny_flux
from branchgrpo.models.sd3 import tiny_sd3
from branchgrpo.models.wan import set_pipeline_sigmas, tiny_wan
from branchgrpo.schedule import make_sigmas
from branchgrpo.tree import Tree, chain_plan, rollout

BUILDERS = {"flux": tiny_flux, "sd3": tiny_sd3, "wan": tiny_wan}
FAMILIES = tuple(BUILDERS)
PROMPTS = ["a red cat", "blue dog 7"]
T = 4


def build(family: str, **kw: Any):
    """(policy, reference pipeline) of a tiny family."""
    return BUILDERS[family](**kw)


def ode_tree(policy, prompts=PROMPTS, steps: int = T, seed: int = 0) -> tuple[Tree, Tensor]:
    """A deterministic (all-ODE) rollout through our engine and its sigmas [T + 1]."""
    sig = make_sigmas(**policy.default_schedule(), num_steps=steps)
    plan = chain_plan("ode", sig, [1] * steps, ["ode"] * steps)
    tree = rollout(policy, policy.encode(prompts), plan,
                   generator=torch.Generator().manual_seed(seed))
    return tree, sig


def run_pipeline(family: str, pipe, policy, latents: Tensor, sigmas: Tensor,
                 output_type: str = "latent", prompts=PROMPTS) -> Tensor:
    """The diffusers pipeline's own output from the same initial latents and sigmas."""
    kw: dict[str, Any] = dict(prompt=list(prompts), latents=latents, height=policy.height,
                              width=policy.width, guidance_scale=policy.guidance_scale,
                              num_inference_steps=len(sigmas) - 1,
                              max_sequence_length=policy.max_sequence_length,
                              output_type=output_type)
    pipe.set_progress_bar_config(disable=True)
    if family == "wan":
        set_pipeline_sigmas(pipe, sigmas)
        return pipe(num_frames=policy.num_frames, **kw).frames
    return pipe(sigmas=sigmas[:-1].tolist(), **kw).images

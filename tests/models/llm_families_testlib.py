"""Helpers of the FLUX.2 and Z-Image tests (families with LLM text encoders): their replica
runs through our config and CLI, and their pipelines on the same initial latents.

A run is named by its replica (``flux2``, ``zimage`` for the base Z-Image, ``zimage_turbo``);
`KIND` maps it to ``model.kind``, `GUIDANCE` to the guidance its users run (the pipeline's
default, or the Turbo model card's 0), `RECIPE` to a tiny tree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from models_testlib import PROMPTS, ode_rollout, run_train
from torch import Tensor

from branchgrpo.config import load_config
from branchgrpo.models.factory import build_policy
from branchgrpo.spec import model_options, resolve

KIND = {"flux2": "flux2", "zimage": "zimage", "zimage_turbo": "zimage"}
PIPELINES = {"flux2": "Flux2Pipeline", "zimage": "ZImagePipeline",
             "zimage_turbo": "ZImagePipeline"}
GUIDANCE = {"flux2": None, "zimage": None, "zimage_turbo": 0.0}
"""None: the pipeline's ``__call__`` default (FLUX.2 4.0, Z-Image 5.0); Turbo: 0 (its card)."""
SIZE = ["model.height=64", "model.width=64"]
"""64 px: 4 x 4 tokens (VAE factor 8 x 2x2 patches), 16 image tokens."""
RECIPE = ["rollout.method=branch", "rollout.split_steps=[0]", "rollout.branch_factor=2"]


def pipeline_default(replica: str, name: str) -> Any:
    import inspect

    import diffusers

    cls = getattr(diffusers, PIPELINES[replica])
    return inspect.signature(cls.__call__).parameters[name].default


def guidance(replica: str) -> float:
    g = GUIDANCE[replica]
    return pipeline_default(replica, "guidance_scale") if g is None else g


def config_args(replica: str, path: Any, *extra: str) -> list[str]:
    """The overrides of a run on the replica at ``path`` (kind, path, guidance, size, tree)."""
    return [f"model.kind={KIND[replica]}", f"model.path={path}",
            f"model.guidance={guidance(replica)}", *SIZE, *RECIPE, *extra]


def ours(replica: str, path: Any, steps: int, *extra: str):
    """(config, RunSpec, policy, deterministic Euler tree on the RunSpec's sigmas)."""
    cfg = load_config(None, config_args(replica, path, f"rollout.num_steps={steps}", *extra))
    spec = resolve(cfg)
    policy = build_policy(model_options(cfg), torch.device("cpu"))
    with torch.no_grad():
        tree = ode_rollout(policy, torch.tensor(spec.sigmas))
    return cfg, spec, policy, tree


def load_pipeline(replica: str, path: Any, dtype: torch.dtype = torch.float32):
    import diffusers

    from branchgrpo.models.loading import dtype_kwarg

    pipe = getattr(diffusers, PIPELINES[replica]).from_pretrained(path, **{dtype_kwarg(): dtype})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(replica: str, pipe, cfg, latents: Tensor, steps: int, **kw: Any) -> Tensor:
    """The pipeline's latents [N, *latent_shape] after ``steps`` steps of its own schedule:
    only num_inference_steps, the size, the initial latents (and Turbo's guidance 0) passed;
    ``kw`` (e.g. ``output_type="pt"`` for images). FLUX.2 returns packed tokens [N, S, 128];
    they are unpacked to [N, 128, h, w]."""
    if GUIDANCE[replica] is not None:
        kw.setdefault("guidance_scale", GUIDANCE[replica])
    kw.setdefault("output_type", "latent")
    out = pipe(prompt=list(PROMPTS), num_inference_steps=steps, height=cfg.model.height,
               width=cfg.model.width, latents=latents, **kw).images
    if replica == "flux2" and kw["output_type"] == "latent":
        n, c, h, w = latents.shape
        out = out.permute(0, 2, 1).reshape(n, c, h, w)
    return out


def train_cli(replica: str, path: Path, run: Path, prompts: Path, *extra: str) -> dict:
    """``branchgrpo train`` (`models_testlib.run_train`): one iteration, one prompt,
    2 steps, 2 leaves, the JPEG reward; returns the metrics row."""
    return run_train(run, prompts, *config_args(replica, path, "rollout.num_steps=2"), *extra)

"""Shared helpers of the model tests: the tiny families, and running each family's own
diffusers pipeline on given initial latents and sigmas."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from branchgrpo.engine.schedule import make_sigmas
from branchgrpo.engine.tree import Tree, chain_plan, rollout
from branchgrpo.models.flux import tiny_flux
from branchgrpo.models.sd3 import tiny_sd3
from branchgrpo.models.wan import set_pipeline_sigmas, tiny_wan

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
    fam = policy.family
    kw: dict[str, Any] = dict(prompt=list(prompts), latents=latents, height=fam.height,
                              width=fam.width, guidance_scale=fam.guidance_scale,
                              num_inference_steps=len(sigmas) - 1,
                              max_sequence_length=fam.max_sequence_length,
                              output_type=output_type)
    pipe.set_progress_bar_config(disable=True)
    if family == "wan":
        set_pipeline_sigmas(pipe, sigmas)
        return pipe(num_frames=fam.num_frames, **kw).frames
    return pipe(sigmas=sigmas[:-1].tolist(), **kw).images


# ---- replica checkpoints (complete tiny pipelines with the released configs) -------------
REPLICA_SIZE = {"flux": {"model.height": 64, "model.width": 64},
                "sd3": {"model.height": 64, "model.width": 64},
                "wan": {"model.height": 32, "model.width": 32, "model.num_frames": 5},
                "wan22": {"model.height": 64, "model.width": 64, "model.num_frames": 5},
                "wan_i2v": {"model.height": 32, "model.width": 32, "model.num_frames": 5}}
"""Image (video) sizes of the replica tests: small, but FLUX sees 16 image tokens (so a mu of
its own) and Wan 2 latent frames."""
RECIPES = {"flux": ["rollout.method=branch", "rollout.split_steps=[0,1]",
                    "rollout.schedule=flux_dynamic", "rollout.quantize_timestep=false"],
           "sd3": ["rollout.method=flow_grpo"],
           "wan": ["rollout.method=branch", "rollout.split_steps=[0,1]"],
           "wan22": ["rollout.method=branch", "rollout.split_steps=[0,1]"],
           "wan_i2v": ["rollout.method=branch", "rollout.split_steps=[0,1]"]}
"""Configs whose schedule rule is the family pipeline's own (`branchgrpo.spec`)."""
PIPELINE_CLASSES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline",
                    "wan": "WanPipeline", "qwenimage": "QwenImagePipeline",
                    "wan22": "WanPipeline", "wan_i2v": "WanImageToVideoPipeline"}


def pipeline_default(family: str, name: str) -> Any:
    """The default of ``name`` in the family pipeline's ``__call__`` (what a user gets)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, PIPELINE_CLASSES[family])
    return inspect.signature(cls.__call__).parameters[name].default


def replica_config(family: str, path: Any, *extra: str):
    """The config of a run on the replica at ``path``: the family's `RECIPES` entry,
    `REPLICA_SIZE`, then ``extra`` overrides; ``model.guidance`` null, so the family's default
    (which the parity tests check is the pipeline's)."""
    from branchgrpo.config import load_config

    args = [f"model.kind={family}", f"model.path={path}",
            *(f"{k}={v}" for k, v in REPLICA_SIZE[family].items()), *RECIPES[family], *extra]
    return load_config(None, args)


def load_replica_pipeline(family: str, path: Any, dtype: torch.dtype = torch.float32):
    """``<Family>Pipeline.from_pretrained(path)`` in ``dtype``, progress bar off."""
    import diffusers

    from branchgrpo.models.loading import dtype_kwarg

    pipe = getattr(diffusers, PIPELINE_CLASSES[family]).from_pretrained(
        path, **{dtype_kwarg(): dtype})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_default_pipeline(family: str, pipe, cfg, latents: Tensor, steps: int,
                         prompts=PROMPTS, **kw: Any) -> Tensor:
    """The pipeline on its own default schedule: only ``num_inference_steps``, the size, the
    initial ``latents`` and ``output_type="latent"`` are passed (plus ``kw``)."""
    m = cfg.model
    args: dict[str, Any] = dict(prompt=list(prompts), num_inference_steps=steps, height=m.height,
                                width=m.width, latents=latents, output_type="latent", **kw)
    if family == "wan":
        return pipe(num_frames=m.num_frames, **args).frames
    return pipe(**args).images


def ode_rollout(policy, sigmas: Tensor, prompts=PROMPTS, seed: int = 0) -> Tree:
    """A deterministic (all-ODE: Euler) rollout of ``policy`` on ``sigmas`` [T + 1]."""
    steps = len(sigmas) - 1
    plan = chain_plan("ode", sigmas, [1] * steps, ["ode"] * steps)
    return rollout(policy, policy.encode(prompts), plan,
                   generator=torch.Generator().manual_seed(seed))


# ---- one training iteration through the CLI ------------------------------------------------
SMALL_RUN = ("train.iterations=1", "train.prompts_per_iteration=1", "train.device=cpu",
             "reward.weights={jpeg_compressibility: 1.0}", "reward.judge=''",
             "data.eval_samples=1", "log.progress=false", "log.tensorboard=false",
             "log.eval_every=0")
"""One iteration of one prompt on the CPU, the JPEG-compressibility reward, no judge, one
held-out sample, evaluation only before and after."""


def run_train(run: Path, prompts: Path, *args: str) -> dict:
    """``branchgrpo train`` (`branchgrpo.cli.main`, in this process: offline, one thread) with
    `SMALL_RUN`, ``prompts`` for training and evaluation, the run in ``run``, then ``args``.
    Asserts exit 0, one training row with finite losses and a gradient; returns that row."""
    from branchgrpo.cli import main

    code = main(["train", *SMALL_RUN, f"data.prompts={prompts}", f"data.eval_prompts={prompts}",
                 f"log.run_dir={run}", *args])
    assert code == 0, f"exit {code} (its stderr is in the captured output)"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if "eval/tag" not in r]
    losses = {k: v for k, v in row.items() if k.startswith("loss/")}
    assert "loss/total" in losses and all(math.isfinite(v) for v in losses.values())
    assert row["grad_norm"] > 0
    return row

"""A LoRA training run through ``branchgrpo train`` leaves a diffusers-format LoRA under
``RUN/lora/`` that the family's pipeline loads with ``load_lora_weights`` and that reproduces
the trained policy; a full fine-tuning run (the embedded tiny default too) writes none."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from models_testlib import (
    PROMPTS,
    RECIPES,
    REPLICA_SIZE,
    load_replica_pipeline,
    ode_rollout,
    pipeline_default,
    run_default_pipeline,
)

from branchgrpo.inference import load_trained
from branchgrpo.spec import resolve


def _train(path: Path, run: Path, prompts: Path, *extra: str) -> None:
    args = ["model.kind=flux", f"model.path={path}",
            f"model.guidance={pipeline_default('flux', 'guidance_scale')}",
            *(f"{k}={v}" for k, v in REPLICA_SIZE["flux"].items()), *RECIPES["flux"],
            "rollout.num_steps=2", "rollout.split_steps=[0]", "rollout.branch_factor=2",
            "train.iterations=1", "train.prompts_per_iteration=1", "train.device=cpu",
            "reward.weights={jpeg_compressibility: 1.0}", "reward.judge=''",
            f"data.prompts={prompts}", f"data.eval_prompts={prompts}", "data.eval_samples=1",
            f"log.run_dir={run}", "log.progress=false", "log.tensorboard=false",
            "log.eval_every=0", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "branchgrpo", "train", *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stderr[-3000:]}"


def test_a_lora_run_writes_a_lora_the_pipeline_loads(replica, tmp_path):
    path = replica("flux")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    run = tmp_path / "run"
    _train(path, run, prompts, "model.finetune=lora", "model.lora_rank=4",
           "model.lora_alpha=8", "train.lr=1e-2")
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    policy, cfg, _, _ = load_trained(run)
    sigmas = torch.tensor(resolve(cfg).sigmas)
    with torch.no_grad():
        ours = ode_rollout(policy, sigmas)
    x_T = ours.latents[ours.parent < 0]
    pipe = load_replica_pipeline("flux", path)
    base = run_default_pipeline("flux", pipe, cfg, x_T.clone(), len(sigmas) - 1)
    pipe.load_lora_weights(run / "lora")  # what the README shows
    tuned = run_default_pipeline("flux", pipe, cfg, x_T.clone(), len(sigmas) - 1)
    assert (tuned - base).abs().max() > 1e-3  # the adapter is the trained one, not a no-op
    torch.testing.assert_close(ours.leaf_x0, tuned, atol=1e-5, rtol=0)

    full = tmp_path / "full"
    _train(path, full, prompts, "model.finetune=full")
    assert (full / "checkpoints").is_dir() and not (full / "lora").exists()

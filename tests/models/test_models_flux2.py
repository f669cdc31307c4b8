"""FLUX.2 (`branchgrpo.models.flux2`) against diffusers' Flux2Pipeline on a replica checkpoint
(tiny random weights, FLUX.2-dev's scheduler and behaviour configs): our Euler rollout on the
`branchgrpo.spec` grid equals the pipeline under its own defaults (empirical-mu grid, guidance
4.0, Mistral layers 10/20/30, batch-norm latents); one BranchGRPO iteration through the CLI
with LoRA (its export loads into the pipeline) and full fine-tuning; bf16 weights as diffusers
loads them; the offline message; ``branchgrpo plan`` of the recipe from the released config."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from llm_families_testlib import load_pipeline, ours, pipeline_default, run_pipeline, train_cli
from models_testlib import PROMPTS, ode_rollout
from safetensors.torch import load_file

from branchgrpo.cli import main
from branchgrpo.engine.schedule import flux2_empirical_mu
from branchgrpo.inference import load_trained
from branchgrpo.models.flux2 import FLUX2_DEV, RELEASED_CONFIG, Flux2Family
from branchgrpo.models.hub import ModelNotAvailableError
from branchgrpo.models.loading import load
from branchgrpo.spec import resolve

T = 4
FP32_ATOL = 1e-5
"""fp32, same Euler solver and grid: measured 1.9e-6 (fp32 rounding: our float64 grid vs the
scheduler's float32 time shift) on latents of magnitude ~4 after 4 steps; the shifted linspace
on the same weights lands 0.16 away."""
BF16_RTOL = 0.04
"""bf16 on both sides, max |difference| / max |latent| after 4 steps: measured 0.0066."""


@pytest.fixture
def prompts(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


def test_euler_rollout_matches_pipeline_default_schedule(replica):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    path = replica("flux2")
    cfg, spec, policy, tree = ours("flux2", path, T)
    assert policy.family.guidance_scale == pipeline_default("flux2", "guidance_scale") == 4.0
    assert policy.family.max_sequence_length == pipeline_default("flux2", "max_sequence_length")
    assert spec.mu == pytest.approx(compute_empirical_mu(16, T)) and spec.image_seq_len == 16
    x_T = tree.latents[tree.parent < 0]
    pipe = load_pipeline("flux2", path)
    theirs = run_pipeline("flux2", pipe, cfg, x_T.clone(), T)
    torch.testing.assert_close(torch.tensor(spec.sigmas), pipe.scheduler.sigmas.float(),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(tree.leaf_x0, theirs, atol=FP32_ATOL, rtol=0)
    # the comparison sees the grid: the shifted linspace on the same weights lands far away
    _, other, _, wrong = ours("flux2", path, T, "rollout.schedule=shifted")
    assert other.sigmas != spec.sigmas
    assert (wrong.leaf_x0 - theirs).abs().max() > 100 * FP32_ATOL
    # ... and the decode: our images are the pipeline's (batch-norm stats, unpatchify, VAE)
    with torch.no_grad():
        img = policy.decode(tree.leaf_x0)
    ref = pipe(prompt=list(PROMPTS), num_inference_steps=T, height=64, width=64,
               latents=x_T.clone(), output_type="pt").images
    torch.testing.assert_close(img, ref.float(), atol=1e-4, rtol=0)


def test_bf16_rollout_matches_bf16_pipeline(replica):
    path = replica("flux2")
    cfg, _, _, tree = ours("flux2", path, T, "model.dtype=bf16")
    x_T = tree.latents[tree.parent < 0]
    theirs = run_pipeline("flux2", load_pipeline("flux2", path, torch.bfloat16), cfg,
                          x_T.clone(), T).float()
    err = (tree.leaf_x0 - theirs).abs().max() / theirs.abs().max()
    assert err < BF16_RTOL, err


def test_lora_iteration_exports_into_pipeline(replica, prompts, tmp_path):
    path, run = replica("flux2"), tmp_path / "run"
    train_cli("flux2", path, run, prompts, "model.finetune=lora", "model.lora_rank=4",
              "model.lora_alpha=8", "train.lr=1e-2")
    (ckpt,) = (run / "checkpoints").iterdir()
    state = load_file(ckpt / "model.safetensors")
    assert state and all("lora_" in k for k in state)
    assert any("to_qkv_mlp_proj" in k for k in state) and any("add_q_proj" in k for k in state)
    policy, cfg, _, _ = load_trained(run)
    sigmas = torch.tensor(resolve(cfg).sigmas)
    with torch.no_grad():
        tree = ode_rollout(policy, sigmas)
    x_T = tree.latents[tree.parent < 0]
    pipe = load_pipeline("flux2", path)
    base = run_pipeline("flux2", pipe, cfg, x_T.clone(), len(sigmas) - 1)
    pipe.load_lora_weights(run / "lora")
    tuned = run_pipeline("flux2", pipe, cfg, x_T.clone(), len(sigmas) - 1)
    assert (tuned - base).abs().max() > 1e-3
    torch.testing.assert_close(tree.leaf_x0, tuned, atol=1e-5, rtol=0)


def test_full_finetune_iteration(replica, prompts, tmp_path):
    path, run = replica("flux2"), tmp_path / "run"
    train_cli("flux2", path, run, prompts, "model.finetune=full", "train.lr=1e-3")
    (ckpt,) = (run / "checkpoints").iterdir()
    state = load_file(ckpt / "model.safetensors")
    base = {k: p.detach() for k, p in load_pipeline("flux2", path).transformer.named_parameters()}
    assert set(state) == set(base)
    changed = [k for k, v in state.items() if not torch.equal(v, base[k])]
    assert len(changed) > len(base) // 2 and not (run / "lora").exists()


def test_bf16_weights_match_diffusers_from_pretrained(replica):
    from diffusers import Flux2Transformer2DModel

    path = replica("flux2")
    policy = load(Flux2Family, path, dtype=torch.bfloat16, device="cpu", height=64, width=64)
    want = Flux2Transformer2DModel.from_pretrained(path, subfolder="transformer",
                                                   torch_dtype=torch.bfloat16)
    got = {n: p.dtype for n, p in policy.transformer.named_parameters()}
    assert got == {n: p.dtype for n, p in want.named_parameters()}
    assert not Flux2Transformer2DModel._keep_in_fp32_modules
    assert set(got.values()) == {torch.bfloat16}
    x = torch.randn(2, *policy.latent_shape)
    with torch.no_grad():
        v = policy.velocity(x, torch.tensor([0.9, 0.4]), policy.encode(PROMPTS))
    assert v.dtype == torch.float32 and v.shape == x.shape and torch.isfinite(v).all()


def test_offline_hub_id_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as err:
        load(Flux2Family, FLUX2_DEV, cache_dir=tmp_path / "hub", device="cpu")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert FLUX2_DEV in msg and "download" in msg and "local folder" in msg


def test_plan_of_the_recipe_is_the_released_pipeline_grid(capsys, monkeypatch, tmp_path):
    """``branchgrpo plan`` with the real Hub id offline: the released scheduler config's grid
    as Flux2Pipeline computes it at 1024x1024 (4096 tokens) for T = 20."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert main(["plan", "configs/flux2_branchgrpo.yaml", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    t = r["num_steps"]
    assert (r["family"], t, r["image_seq_len"]) == ("flux2", 20, 4096)
    sched = FlowMatchEulerDiscreteScheduler.from_config(RELEASED_CONFIG["scheduler"])
    mu = flux2_empirical_mu(4096, t)
    sched.set_timesteps(t, sigmas=np.linspace(1.0, 1 / t, t), mu=mu)
    assert r["mu"] == pytest.approx(mu) and r["schedule"] == "diffusers"
    torch.testing.assert_close(torch.tensor(r["sigmas"]), sched.sigmas.float(), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(torch.tensor(r["timesteps"]), sched.timesteps / 1000,
                               atol=1e-6, rtol=0)
    assert (r["leaves"], r["edges"]) == (16, 218)


def test_tiny_flux2_matches_its_pipeline_on_given_sigmas():
    """`tiny_flux2` (VAE factor 4, 32 px): our Euler rollout on the policy's default schedule
    equals its reference Flux2Pipeline handed the same sigmas (measured 0)."""
    from branchgrpo.models.flux2 import tiny_flux2

    policy, ref = tiny_flux2()
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    with torch.no_grad():
        tree = ode_rollout(policy, sigmas)
    x_T = tree.latents[tree.parent < 0]
    ref.set_progress_bar_config(disable=True)
    out = ref(prompt=list(PROMPTS), latents=x_T.clone(), height=32, width=32,
              num_inference_steps=4, sigmas=sigmas[:-1].tolist(), max_sequence_length=256,
              output_type="latent").images
    n, c, h, w = x_T.shape
    torch.testing.assert_close(tree.leaf_x0, out.permute(0, 2, 1).reshape(n, c, h, w),
                               atol=FP32_ATOL, rtol=0)

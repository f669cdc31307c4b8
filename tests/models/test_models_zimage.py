"""Z-Image (`branchgrpo.models.zimage`) against diffusers' ZImagePipeline on replica checkpoints
of the base Z-Image (static shift 6, CFG 5 by the pipeline's default) and Z-Image-Turbo (shift
3, guidance 0 as its card says): our Euler rollout on the `branchgrpo.spec` grid equals the
pipeline under those settings (its reversed timestep, negated output, CFG rule, per-prompt text
lengths); one BranchGRPO iteration through the CLI with LoRA (its export loads into the
pipeline) and full fine-tuning; bf16 weights as diffusers loads them; the offline message;
``branchgrpo plan`` of the recipes from the released configs."""

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
from branchgrpo.inference import load_trained
from branchgrpo.models.hub import ModelNotAvailableError
from branchgrpo.models.loading import load
from branchgrpo.models.zimage import (
    RELEASED_CONFIG,
    TURBO_CONFIG,
    ZIMAGE,
    ZIMAGE_TURBO,
    ZImageFamily,
)
from branchgrpo.spec import resolve

T = 4
FP32_ATOL = 1e-5
"""fp32, same Euler solver and grid, the pipeline's CFG arithmetic: measured 0 (base, CFG 5) and
0 (Turbo) on latents of magnitude ~4.4 after 4 steps; the unshifted grid (rollout.shift=1) on
the same weights lands 0.66 (base) and 0.25 (Turbo) away."""
BF16_RTOL = 0.04
"""bf16 on both sides, max |difference| / max |latent| after 4 steps: measured 0.013 (base) and
0.0019 (Turbo)."""


@pytest.fixture
def prompts(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


@pytest.mark.parametrize("rep", ["zimage", "zimage_turbo"])
def test_euler_rollout_matches_pipeline(rep, replica):
    path = replica(rep)
    cfg, spec, policy, tree = ours(rep, path, T)
    fam = policy.family
    assert fam.max_sequence_length == pipeline_default(rep, "max_sequence_length")
    assert (fam.do_cfg, spec.shift) == ((True, 6.0) if rep == "zimage" else (False, 3.0))
    x_T = tree.latents[tree.parent < 0]
    pipe = load_pipeline(rep, path)
    theirs = run_pipeline(rep, pipe, cfg, x_T.clone(), T)
    torch.testing.assert_close(torch.tensor(spec.sigmas), pipe.scheduler.sigmas.float(),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(tree.leaf_x0, theirs, atol=FP32_ATOL, rtol=0)
    _, other, _, wrong = ours(rep, path, T, "rollout.shift=1.0")  # the grid matters
    assert other.sigmas != spec.sigmas
    assert (wrong.leaf_x0 - theirs).abs().max() > 100 * FP32_ATOL
    with torch.no_grad():  # the decode is the pipeline's (scaling and shift factors, VAE)
        img = policy.decode(tree.leaf_x0)
    ref = run_pipeline(rep, pipe, cfg, x_T.clone(), T, output_type="pt")
    torch.testing.assert_close(img, ref.float(), atol=1e-4, rtol=0)


def test_velocity_sign_and_timestep_convention(replica):
    """One step by hand: ZImagePipeline feeds the transformer (1000 - 1000 sigma) / 1000 and
    steps on minus its output; our v = eps - x0 is that negated output at t = 1 - sigma."""
    path = replica("zimage_turbo")
    _, _, policy, _ = ours("zimage_turbo", path, T)
    x = torch.randn(1, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    cond = policy.encode(PROMPTS[:1])
    emb = cond["prompt_embeds"][0, :int(cond["prompt_len"][0])]
    with torch.no_grad():
        v = policy.velocity(x, torch.tensor([0.7]), cond)
        raw = policy.transformer([x[0].unsqueeze(1)], torch.tensor([0.3]), [emb],
                                 return_dict=False)[0][0]
    torch.testing.assert_close(v[0], -raw.squeeze(1), atol=1e-5, rtol=0)


def test_bf16_rollout_matches_bf16_pipeline(replica):
    for rep in ("zimage", "zimage_turbo"):
        path = replica(rep)
        cfg, _, _, tree = ours(rep, path, T, "model.dtype=bf16")
        x_T = tree.latents[tree.parent < 0]
        theirs = run_pipeline(rep, load_pipeline(rep, path, torch.bfloat16), cfg, x_T.clone(),
                              T).float()
        err = (tree.leaf_x0 - theirs).abs().max() / theirs.abs().max()
        assert err < BF16_RTOL, (rep, err)


def test_lora_iteration_exports_into_pipeline(replica, prompts, tmp_path):
    path, run = replica("zimage"), tmp_path / "run"
    train_cli("zimage", path, run, prompts, "model.finetune=lora", "model.lora_rank=4",
              "model.lora_alpha=8", "train.lr=1e-2")
    (ckpt,) = (run / "checkpoints").iterdir()
    state = load_file(ckpt / "model.safetensors")
    assert state and all("lora_" in k for k in state)
    policy, cfg, _, _ = load_trained(run)
    sigmas = torch.tensor(resolve(cfg).sigmas)
    with torch.no_grad():
        tree = ode_rollout(policy, sigmas)
    x_T = tree.latents[tree.parent < 0]
    pipe = load_pipeline("zimage", path)
    base = run_pipeline("zimage", pipe, cfg, x_T.clone(), len(sigmas) - 1)
    pipe.load_lora_weights(run / "lora")
    tuned = run_pipeline("zimage", pipe, cfg, x_T.clone(), len(sigmas) - 1)
    assert (tuned - base).abs().max() > 1e-3
    torch.testing.assert_close(tree.leaf_x0, tuned, atol=1e-5, rtol=0)


def test_full_finetune_iteration_turbo(replica, prompts, tmp_path):
    path, run = replica("zimage_turbo"), tmp_path / "run"
    train_cli("zimage_turbo", path, run, prompts, "model.finetune=full", "train.lr=1e-3")
    (ckpt,) = (run / "checkpoints").iterdir()
    state = load_file(ckpt / "model.safetensors")
    tr = load_pipeline("zimage_turbo", path).transformer
    base = {k: p.detach() for k, p in tr.named_parameters()}
    assert set(state) == set(base)
    changed = [k for k, v in state.items() if not torch.equal(v, base[k])]
    assert len(changed) > len(base) // 2 and not (run / "lora").exists()


def test_bf16_weights_match_diffusers_from_pretrained(replica):
    from diffusers import ZImageTransformer2DModel

    path = replica("zimage")
    policy = load(ZImageFamily, path, dtype=torch.bfloat16, device="cpu", height=64, width=64)
    want = ZImageTransformer2DModel.from_pretrained(path, subfolder="transformer",
                                                    torch_dtype=torch.bfloat16)
    got = {n: p.dtype for n, p in policy.transformer.named_parameters()}
    assert got == {n: p.dtype for n, p in want.named_parameters()}
    assert not ZImageTransformer2DModel._keep_in_fp32_modules
    assert set(got.values()) == {torch.bfloat16}
    x = torch.randn(2, *policy.latent_shape)
    with torch.no_grad():
        v = policy.velocity(x, torch.tensor([0.9, 0.4]), policy.encode(PROMPTS))
    assert v.dtype == torch.float32 and v.shape == x.shape and torch.isfinite(v).all()


@pytest.mark.parametrize("repo", [ZIMAGE, ZIMAGE_TURBO])
def test_offline_hub_id_fails_fast(repo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as err:
        load(ZImageFamily, repo, cache_dir=tmp_path / "hub", device="cpu")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert repo in msg and "download" in msg and "local folder" in msg


@pytest.mark.parametrize("config,released", [("zimage_branchgrpo", RELEASED_CONFIG),
                                             ("zimage_turbo_branchgrpo", TURBO_CONFIG)])
def test_plan_of_the_recipes_is_the_released_pipeline_grid(config, released, capsys,
                                                           monkeypatch, tmp_path):
    """``branchgrpo plan`` with the real Hub ids offline: each checkpoint's released scheduler
    (base: shift 6, Turbo: shift 3) run as ZImagePipeline does at 1024x1024."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert main(["plan", f"configs/{config}.yaml", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    t = r["num_steps"]
    sched = FlowMatchEulerDiscreteScheduler.from_config(released["scheduler"])
    sched.set_timesteps(t, sigmas=np.linspace(1.0, 1 / t, t).tolist(), mu=0.0)
    assert r["family"] == "zimage" and r["shift"] == released["scheduler"]["shift"]
    torch.testing.assert_close(torch.tensor(r["sigmas"]), sched.sigmas.float(), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(torch.tensor(r["timesteps"]), sched.timesteps, atol=1e-3,
                               rtol=0)
    assert t == (8 if "turbo" in config else 20)


@pytest.mark.parametrize("g", [5.0, 0.0])
def test_tiny_zimage_matches_its_pipeline_on_given_sigmas(g):
    """`tiny_zimage` (VAE factor 2, 16 px), CFG on and off: our Euler rollout equals its
    reference ZImagePipeline handed the same sigmas (measured 0 with and without CFG)."""
    from branchgrpo.models.zimage import tiny_zimage

    policy, ref = tiny_zimage(guidance_scale=g)
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    with torch.no_grad():
        tree = ode_rollout(policy, sigmas)
    x_T = tree.latents[tree.parent < 0]
    ref.set_progress_bar_config(disable=True)
    out = ref(prompt=list(PROMPTS), latents=x_T.clone(), height=16, width=16,
              num_inference_steps=4, sigmas=sigmas[:-1].tolist(), guidance_scale=g,
              max_sequence_length=64, output_type="latent").images
    torch.testing.assert_close(tree.leaf_x0, out, atol=FP32_ATOL, rtol=0)


def test_cfg_truncation_and_normalization_match_the_pipeline():
    """The base model card's ``cfg_normalization=True`` and a truncation at 0.5 (no CFG once
    1 - sigma > 0.5): per-sample norm cap and per-row guidance as ZImagePipeline applies them;
    measured 0; without them the result moves by 0.26."""
    from branchgrpo.models.zimage import tiny_zimage

    policy, ref = tiny_zimage(guidance_scale=5.0, cfg_normalization=1.0, cfg_truncation=0.5)
    plain, _ = tiny_zimage(guidance_scale=5.0)
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    with torch.no_grad():
        tree, base = ode_rollout(policy, sigmas), ode_rollout(plain, sigmas)
    x_T = tree.latents[tree.parent < 0]
    ref.set_progress_bar_config(disable=True)
    out = ref(prompt=list(PROMPTS), latents=x_T.clone(), height=16, width=16,
              num_inference_steps=4, sigmas=sigmas[:-1].tolist(), guidance_scale=5.0,
              cfg_normalization=True, cfg_truncation=0.5, max_sequence_length=64,
              output_type="latent").images
    torch.testing.assert_close(tree.leaf_x0, out, atol=FP32_ATOL, rtol=0)
    assert (base.leaf_x0 - out).abs().max() > 100 * FP32_ATOL

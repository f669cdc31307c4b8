"""Wan image-to-video (`branchgrpo.models.wan_i2v`, ``model.kind=wan_i2v``) against diffusers'
WanImageToVideoPipeline on the Wan2.2-I2V-A14B replica (tiny random weights, the released
scheduler and ``model_index.json``: two experts, ``boundary_ratio`` 0.9, 36 input channels),
with generated first-frame images given through ``model.images``: the pipeline on its own
default schedule and guidance (only the image, ``num_inference_steps``, the size and the
initial latents passed) makes at every step the guided output our policy computes (the
condition latents, mask, expert and scale included); one BranchGRPO iteration through the CLI
with LoRA on both experts loads into the pipeline; preflight names a prompt without image.

WanImageToVideoPipeline (diffusers 0.42) calls ``ftfy.fix_text`` on prompts without checking
that ftfy is installed (it is not here); the in-process pipeline runs get an identity
stand-in, which is what ftfy does to these ASCII prompts. Our family encodes text with
WanPipeline's copy of the same code, which checks."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from models_testlib import PROMPTS, ode_rollout
from test_models_replica_train import train_cli
from test_models_wan22 import FP32_ATOL, check_first_step, check_steps, run_pipeline

from branchgrpo.config import ConfigError, load_config
from branchgrpo.inference import load_trained
from branchgrpo.models.factory import build_policy
from branchgrpo.preflight import check_run
from branchgrpo.spec import model_options, resolve

T = 4
SIZE = ("model.height=32", "model.width=32", "model.num_frames=5")
"""Replica size: Wan2.1 VAE latents 4 x 4, 2 latent frames. Measured against FP32_ATOL (1e-5):
guided outputs differ by at most 4.3e-6 (Wan2.2-I2V-A14B) and 3.0e-6 (Wan2.1-I2V, CLIP) per
step, outputs of magnitude ~2."""


@pytest.fixture
def ftfy(monkeypatch):
    import diffusers.pipelines.wan.pipeline_wan_i2v as mod

    monkeypatch.setattr(mod, "ftfy", types.SimpleNamespace(fix_text=lambda t: t),
                        raising=False)


@pytest.fixture
def data(tmp_path):
    """(prompt file, model.images file, the first image): both prompts share one image (the
    pipeline takes one image per call), a second image for the negative check."""
    from PIL import Image

    rng = np.random.RandomState(0)
    for name in ("first.png", "other.png"):
        Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")).save(tmp_path / name)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "images.tsv").write_text("".join(f"{p}\tfirst.png\n" for p in PROMPTS))
    (tmp_path / "other.tsv").write_text("".join(f"{p}\tother.png\n" for p in PROMPTS))
    return tmp_path / "prompts.txt", tmp_path / "images.tsv", Image.open(tmp_path / "first.png")


def i2v_config(path, images, *extra: str):
    return load_config(None, ["model.kind=wan_i2v", f"model.path={path}", "model.guidance=5.0",
                              f"model.images={images}", *SIZE, "rollout.method=branch",
                              "rollout.split_steps=[0,1]", f"rollout.num_steps={T}", *extra])


@pytest.mark.parametrize("kind,experts", [("wan_i2v", [0, 0, 1, 1]),
                                          ("wan_i2v_21", [0, 0, 0, 0])])
def test_i2v_matches_pipeline(kind, experts, replica, data, ftfy):
    """Wan2.2-I2V-A14B: timesteps 999, 900 on the high-noise expert (boundary 900), 750, 500
    on the low; Wan2.1-I2V: one transformer and the CLIP image embeddings."""
    from diffusers import WanImageToVideoPipeline

    path, (_, images, image) = replica(kind), data
    cfg = i2v_config(path, images)
    spec = resolve(cfg)
    policy = build_policy(model_options(cfg), torch.device("cpu"))
    assert policy.latent_shape == (16, 2, 4, 4)
    assert policy.family.boundary_timestep == (900.0 if kind == "wan_i2v" else None)
    assert ("image_embeds" in policy.encode(PROMPTS)) == (kind == "wan_i2v_21")
    with torch.no_grad():
        tree = ode_rollout(policy, torch.tensor(spec.sigmas))
    x_T = tree.latents[tree.parent < 0]
    pipe = WanImageToVideoPipeline.from_pretrained(path)
    before, steps = run_pipeline(pipe, cfg, x_T, T, image=image)
    assert [e for e, _, _ in steps] == experts
    check_first_step(policy, spec, x_T, pipe.scheduler, before)
    check_steps(policy, spec, before, steps)
    # not vacuous: another first frame moves the guided output far from the pipeline's
    other = build_policy(model_options(i2v_config(path, images.parent / "other.tsv")),
                         torch.device("cpu"))
    n = len(PROMPTS)
    with torch.no_grad():
        v = other.velocity(before[1], torch.full((n,), float(spec.sigmas[1])),
                           other.encode(PROMPTS))
    assert (v - steps[1][2]).abs().max() > 100 * FP32_ATOL


def test_i2v_lora_iteration_loads_into_pipeline(replica, data, ftfy, tmp_path):
    from diffusers import WanImageToVideoPipeline

    path, (prompts, images, image) = replica("wan_i2v"), data
    run = tmp_path / "run"
    train_cli("wan_i2v", path, run, prompts, f"model.images={images}",
              "model.finetune=lora", "model.lora_rank=4", "model.lora_alpha=8", "train.lr=1e-2")
    assert (run / "lora" / "transformer_2" / "pytorch_lora_weights.safetensors").is_file()
    policy, cfg, _, _ = load_trained(run)
    spec = resolve(cfg)
    x_T = torch.randn(len(PROMPTS), *policy.latent_shape,
                      generator=torch.Generator().manual_seed(1))
    pipe = WanImageToVideoPipeline.from_pretrained(path)
    pipe.load_lora_weights(run / "lora")
    pipe.load_lora_weights(run / "lora" / "transformer_2", load_into_transformer_2=True)
    before, steps = run_pipeline(pipe, cfg, x_T, len(spec.sigmas) - 1, image=image)
    check_steps(policy, spec, before, steps)


def test_preflight_names_a_prompt_without_image(replica, data, tmp_path):
    path, (prompts, images, _) = replica("wan_i2v"), data
    base = [f"data.prompts={prompts}", f"data.eval_prompts={prompts}", "train.device=cpu",
            "reward.weights={jpeg_compressibility: 1.0}", "reward.judge=''"]
    check_run(i2v_config(path, images, *base))
    (tmp_path / "half.tsv").write_text(f"{PROMPTS[0]}\tfirst.png\n")
    with pytest.raises(ConfigError, match=r"line 2 of .*prompts.txt: model.images .* no image"):
        check_run(i2v_config(path, tmp_path / "half.tsv", *base))
    with pytest.raises(ConfigError, match="needs model.images"):
        check_run(i2v_config(path, "''", *base))
    (tmp_path / "gone.tsv").write_text("".join(f"{p}\tgone.png\n" for p in PROMPTS))
    with pytest.raises(ConfigError, match="missing"):
        check_run(i2v_config(path, tmp_path / "gone.tsv", *base))


@pytest.mark.parametrize("repo", ["Wan-AI/Wan2.2-I2V-A14B-Diffusers",
                                  "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"])
def test_offline_hub_id_fails_fast_and_plans(repo, tmp_path, monkeypatch, capsys):
    import json
    import time

    from branchgrpo.cli import main
    from branchgrpo.engine.schedule import flow_sigmas
    from branchgrpo.models.factory import ModelOptions
    from branchgrpo.models.hub import ModelNotAvailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as err:
        build_policy(ModelOptions(kind="wan_i2v", path=repo), torch.device("cpu"))
    assert time.monotonic() - start < 10
    assert repo in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    assert main(["plan", "configs/wan_i2v_branchgrpo.yaml", f"model.path={repo}",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["shift"] == 3.0 and "defaults" in r["model_config"]
    torch.testing.assert_close(torch.tensor(r["sigmas"][1:]),
                               flow_sigmas(r["num_steps"], 3.0)[1:].float(), atol=1e-6, rtol=0)


def test_replica_configs_are_the_released_ones():
    from branchgrpo.models.testing import REPLICAS
    from branchgrpo.models.wan_i2v import I2V_14B_480P, I2V_A14B, RELEASED

    for kind, repo in (("wan_i2v", I2V_A14B), ("wan_i2v_21", I2V_14B_480P)):
        files, rel = REPLICAS[kind], RELEASED[repo]
        assert files["transformer/config.json"] == rel["transformer"]
        assert {k: files["model_index.json"][k] for k in rel["model_index"]} == \
            rel["model_index"]
        sched = files["scheduler/scheduler_config.json"]
        assert {k: sched[k] for k in rel["scheduler"]} == rel["scheduler"]

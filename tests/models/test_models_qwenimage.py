"""Qwen-Image (`branchgrpo.models.qwenimage`) on its replica checkpoint (tiny random
transformer / Qwen2.5-VL / VAE, the released scheduler and behaviour configs, an offline Qwen2
BPE tokenizer trained on the pipeline's prompt template): our deterministic Euler rollout on the
grid `branchgrpo.spec.resolve` gives equals ``QwenImagePipeline`` run on its own defaults (only
``num_inference_steps``, size and initial latents: no negative prompt, so no CFG), and with the
model card's true CFG (negative prompt " ", true_cfg_scale 4, norm rescaling); one BranchGRPO
iteration through ``branchgrpo train`` (LoRA into ``load_lora_weights``, and full); bf16
weights as diffusers loads them; the offline Hub id; ``branchgrpo plan`` of the recipe from the
released config alone."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from models_testlib import (
    PROMPTS,
    load_replica_pipeline,
    ode_rollout,
    ode_tree,
    run_default_pipeline,
    run_train,
)
from safetensors.torch import load_file

from branchgrpo.config import load_config
from branchgrpo.models.factory import build_policy
from branchgrpo.models.hub import ModelNotAvailableError
from branchgrpo.models.loading import load
from branchgrpo.models.qwenimage import (
    MODEL_CARD_NEGATIVE,
    PROMPT_TEMPLATE,
    QWEN_IMAGE,
    RELEASED_CONFIG,
    QwenImageFamily,
    tiny_qwen_tokenizer,
)
from branchgrpo.spec import model_options, resolve
from testlib import cli

ROOT = Path(__file__).resolve().parents[2]
T = 4
SIZE = ("model.height=64", "model.width=64")  # 16 image tokens: a mu of its own
FP32_ATOL = 1e-5
"""fp32, same Euler solver and grid: the differences are rounding (our grid from float64, the
scheduler's fp32; batched [cond; uncond] vs the pipeline's two forwards): measured 1.4e-6
without CFG and 1.7e-6 with true CFG on latents of magnitude ~5; a wrong grid (the shifted
linspace) moves them by 0.08, plain CFG without the norm rescaling by 0.02."""
BF16_RTOL = 0.04
"""bf16 on both sides (the pipeline loaded in bf16; ours bf16 weights under autocast), max
|difference| / max |latent| after 4 steps: measured 0.0072 without CFG, 0.0077 with it."""


def _cfg(path, *extra: str):
    """A Flow-GRPO config (its schedule rule: the pipeline's grid and sigma) on the replica at
    ``path``; model.guidance 1: the pipeline's default (no negative prompt, no CFG); pass
    model.guidance=4 for the model card's CFG."""
    return load_config(None, ["model.kind=qwenimage", f"model.path={path}",
                              "model.guidance=1.0", *SIZE, "rollout.method=flow_grpo",
                              f"rollout.num_steps={T}", *extra])


def _ours(path, *extra: str):
    cfg = _cfg(path, *extra)
    spec = resolve(cfg)
    policy = build_policy(model_options(cfg), torch.device("cpu"))
    with torch.no_grad():
        tree = ode_rollout(policy, torch.tensor(spec.sigmas))
    return cfg, spec, policy, tree


def test_tokenizer_drops_exactly_the_system_prompt(replica):
    """The replica's saved tokenizer splits the pipeline's template so that its 34 dropped
    tokens are the system prompt and the user turn's header, as the real vocabulary does."""
    pipe = load_replica_pipeline("qwenimage", replica("qwenimage"))
    assert pipe.prompt_template_encode == PROMPT_TEMPLATE
    start = pipe.prompt_template_encode_start_idx
    pieces = pipe.tokenizer.convert_ids_to_tokens(
        pipe.tokenizer(PROMPT_TEMPLATE.format("a red cat")).input_ids)
    assert start == 34 and pieces[start - 3:start + 1] == ["<|im_start|>", "user", "Ċ", "a"]
    assert pieces[:4] == ["<|im_start|>", "system", "Ċ", "Describe"]
    assert pipe.tokenizer.pad_token_id == 0 and len(tiny_qwen_tokenizer()) < 384


def test_euler_rollout_matches_pipeline_default(replica):
    path = replica("qwenimage")
    cfg, spec, policy, tree = _ours(path)
    fam = policy.family
    assert not fam.do_cfg and fam.max_sequence_length == 512 and fam.norm_rescale
    x_T = tree.latents[tree.parent < 0]
    pipe = load_replica_pipeline("qwenimage", path)
    theirs = run_default_pipeline("qwenimage", pipe, cfg, x_T.clone(), T)
    torch.testing.assert_close(torch.tensor(spec.sigmas), pipe.scheduler.sigmas.float(),
                               atol=1e-6, rtol=0)
    assert spec.sigmas[-2] == pytest.approx(0.02) and spec.mu == pytest.approx(
        0.5 + 0.4 * (16 - 256) / (8192 - 256))
    torch.testing.assert_close(tree.leaf_x0, theirs, atol=FP32_ATOL, rtol=0)
    _, other, _, wrong = _ours(path, "rollout.schedule=shifted")  # the comparison sees the grid
    assert other.sigmas != spec.sigmas
    assert (wrong.leaf_x0 - theirs).abs().max() > 100 * FP32_ATOL


def test_true_cfg_matches_pipeline_with_negative_prompt(replica):
    path = replica("qwenimage")
    cfg, spec, policy, tree = _ours(path, "model.guidance=4.0")
    fam = policy.family
    assert fam.do_cfg and fam.negative_prompt == MODEL_CARD_NEGATIVE == " "
    x_T = tree.latents[tree.parent < 0]
    pipe = load_replica_pipeline("qwenimage", path)
    theirs = run_default_pipeline("qwenimage", pipe, cfg, x_T.clone(), T,
                                  negative_prompt=MODEL_CARD_NEGATIVE)
    torch.testing.assert_close(tree.leaf_x0, theirs, atol=FP32_ATOL, rtol=0)
    plain = load(QwenImageFamily, path, dtype=torch.float32, device="cpu", height=64, width=64,
                 negative_prompt=" ", guidance_scale=4.0, norm_rescale=False)
    with torch.no_grad():
        other = ode_rollout(plain, torch.tensor(spec.sigmas))
    assert (other.leaf_x0 - theirs).abs().max() > 100 * FP32_ATOL  # the rescaling matters


@pytest.mark.parametrize("guidance", [1.0, 4.0], ids=["no_cfg", "true_cfg"])
def test_bf16_rollout_matches_bf16_pipeline(guidance, replica):
    path = replica("qwenimage")
    cfg, spec, policy, tree = _ours(path, "model.dtype=bf16", f"model.guidance={guidance}")
    x_T = tree.latents[tree.parent < 0]
    pipe = load_replica_pipeline("qwenimage", path, torch.bfloat16)
    kw = {"negative_prompt": MODEL_CARD_NEGATIVE} if guidance > 1 else {}
    theirs = run_default_pipeline("qwenimage", pipe, cfg, x_T.clone(), T, **kw).float()
    err = (tree.leaf_x0 - theirs).abs().max() / theirs.abs().max()
    assert err < BF16_RTOL, err


def test_decode_matches_pipeline_images(replica):
    path = replica("qwenimage")
    cfg, _, policy, tree = _ours(path)
    pipe = load_replica_pipeline("qwenimage", path)
    x_T = tree.latents[tree.parent < 0]
    images = pipe(prompt=PROMPTS, num_inference_steps=T, height=64, width=64,
                  latents=x_T.clone(), output_type="pt").images
    with torch.no_grad():
        ours = policy.decode(tree.leaf_x0)
    assert ours.shape == (len(PROMPTS), 3, 64, 64)
    torch.testing.assert_close(ours, images.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("negative", [None, MODEL_CARD_NEGATIVE], ids=["no_cfg", "true_cfg"])
def test_tiny_family_follows_given_sigmas_and_learns(negative):
    """`tiny_qwenimage` (a pass-through scheduler) on the shifted linspace, with and without
    CFG, through the pipeline's own ``sigmas=``; then one gradient step of its LoRA through
    the guided velocity moves the prediction."""
    from branchgrpo.models.lora import LoraSpec
    from branchgrpo.models.qwenimage import tiny_qwenimage

    policy, ref = tiny_qwenimage(negative_prompt=negative, lora=LoraSpec(rank=4, alpha=8))
    with torch.no_grad():
        tree, sig = ode_tree(policy)
    x_T = tree.latents[tree.parent < 0]
    ref.set_progress_bar_config(disable=True)
    theirs = ref(prompt=PROMPTS, negative_prompt=negative, height=32, width=32,
                 latents=x_T.clone(), sigmas=sig[:-1].tolist(), num_inference_steps=len(sig) - 1,
                 max_sequence_length=16, output_type="latent").images
    torch.testing.assert_close(tree.leaf_x0, theirs, atol=FP32_ATOL, rtol=0)
    cond = policy.encode(PROMPTS)
    sigma = torch.tensor([0.7, 0.3])
    v0 = policy.velocity(x_T, sigma, cond)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=1e-1)
    v0.square().mean().backward()
    opt.step()
    with torch.no_grad():
        assert (policy.velocity(x_T, sigma, cond) - v0).abs().max() > 1e-4


def test_bf16_weights_match_diffusers_from_pretrained(replica):
    from diffusers import QwenImageTransformer2DModel

    path = replica("qwenimage")
    loaded = load(QwenImageFamily, path, dtype=torch.bfloat16, device="cpu", height=64,
                  width=64)
    want = QwenImageTransformer2DModel.from_pretrained(path, subfolder="transformer",
                                                       torch_dtype=torch.bfloat16)

    def dtypes(m):
        return {n: t.dtype for n, t in [*m.named_parameters(), *m.named_buffers()]}

    assert dtypes(loaded.transformer) == dtypes(want)
    assert not QwenImageTransformer2DModel._keep_in_fp32_modules
    assert set(dtypes(loaded.transformer).values()) == {torch.bfloat16}
    assert loaded.pipe.vae.dtype == loaded.pipe.text_encoder.dtype == torch.bfloat16
    x = torch.randn(2, *loaded.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = loaded.velocity(x, torch.tensor([0.9, 0.4]), loaded.encode(PROMPTS))
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()


def test_offline_hub_id_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as err:
        load(QwenImageFamily, QWEN_IMAGE, cache_dir=tmp_path / "hub", device="cpu")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert QWEN_IMAGE in msg and "download" in msg and "HF_HUB_OFFLINE" in msg


def test_plan_of_the_recipe_from_the_released_config(tmp_path, monkeypatch, capsys):
    """``branchgrpo plan`` offline with the real id: the recipe's FastVideo grid (shift 3,
    int(1000 sigma) / 1000), and with rollout.schedule=diffusers the grid diffusers' own
    scheduler computes from the released config for QwenImagePipeline at 1328 px."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from branchgrpo.engine.schedule import shifted
    from branchgrpo.plan_report import plan_report

    recipe = ROOT / "configs" / "qwenimage_branchgrpo.yaml"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    r = json.loads(cli(capsys, "plan", str(recipe), "--json")[1])
    assert r["family"] == "qwenimage" and "defaults" in r["model_config"]
    assert (r["schedule"], r["shift"], r["quantize_timestep"]) == ("shifted", 3.0, True)
    assert r["guidance"].startswith("off") and r["dtypes"]["lora adapters"] == "fp32"
    np.testing.assert_allclose(r["sigmas"], shifted(20, 3.0).numpy(), atol=1e-7)
    fp32 = np.float32(r["sigmas"][:-1]) * np.float32(1000)  # floor(1000 sigma) in fp32
    np.testing.assert_allclose(r["timesteps"], np.floor(fp32) / 1000, atol=1e-6, rtol=0)

    r = plan_report(load_config(recipe, ["rollout.schedule=diffusers", "rollout.shift=null",
                                         "rollout.quantize_timestep=false",
                                         "model.guidance=4.0"]))
    assert r["image_seq_len"] == 83 * 83 and r["schedule"] == "diffusers"
    assert r["guidance"].startswith("true CFG, scale 4")
    sched = FlowMatchEulerDiscreteScheduler.from_config(RELEASED_CONFIG["scheduler"])
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 20, 20), mu=r["mu"])
    assert r["mu"] == pytest.approx(0.5 + 0.4 * (6889 - 256) / (8192 - 256))
    np.testing.assert_allclose(r["sigmas"], sched.sigmas.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(r["timesteps"], (sched.timesteps / 1000).numpy(), atol=1e-6)
    tr = RELEASED_CONFIG["transformer"]
    assert (tr["num_layers"], tr["joint_attention_dim"], tr["in_channels"]) == (60, 3584, 64)


@pytest.mark.parametrize("overrides", [
    {}, {"time_shift_type": "linear"}, {"shift_terminal": None},
    {"use_dynamic_shifting": False, "shift": 3.0}, {"max_shift": 1.15, "max_image_seq_len": 4096}],
    ids=["released", "linear", "no_terminal", "static", "flux_constants"])
def test_pipeline_grid_is_what_the_pipeline_hands_its_scheduler(overrides):
    """`QwenImageFamily.pipeline_grid` against FlowMatchEulerDiscreteScheduler fed as
    QwenImagePipeline feeds it (linspace(1, 1/T, T), calculate_shift's mu of the image tokens),
    for the released config and variants of each value that changes the grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    config = {**RELEASED_CONFIG["scheduler"], **overrides}
    for steps, (h, w) in ((4, (64, 64)), (20, (1328, 1328)), (50, (928, 1664))):
        grid = QwenImageFamily.pipeline_grid(config, steps, h, w, 8, None, False)
        seq = (h // 16) * (w // 16)
        mu = calculate_shift(seq, config["base_image_seq_len"], config["max_image_seq_len"],
                             config["base_shift"], config["max_shift"])
        sched = FlowMatchEulerDiscreteScheduler.from_config(config)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        torch.testing.assert_close(grid.sigmas, sched.sigmas, atol=2e-7, rtol=0)
        assert grid.image_seq_len == seq
        assert (grid.mu, grid.shift) == ((None, 3.0) if "shift" in overrides else (mu, None))


def test_schedule_rule_and_shift_errors():
    for plan in ("dance", "branch", "branch_mix", "mix", "mix_flash", "g2rpo"):
        assert QwenImageFamily.schedule_rule(plan) == ("shifted", True)
    assert QwenImageFamily.schedule_rule("flow_grpo") == ("diffusers", False)
    with pytest.raises(ValueError, match="rollout.shift is not used"):
        QwenImageFamily.pipeline_grid(RELEASED_CONFIG["scheduler"], 4, 64, 64, 8, 3.0, False)
    with pytest.raises(ValueError, match="multiples of 16"):
        QwenImageFamily.pipeline_grid(RELEASED_CONFIG["scheduler"], 4, 72, 64, 8, None, False)
    one = QwenImageFamily.pipeline_grid(RELEASED_CONFIG["scheduler"], 1, 64, 64, 8, None, False)
    assert one.sigmas.tolist() == [1.0, 0.0]  # diffusers' stretch divides 0 by 0 at T = 1


def test_released_transformer_config_builds_the_20b_model():
    """The released transformer config alone (unknown keys ignored, as from_pretrained does)
    builds the 20.43B MMDiT on the meta device; the VAE config the 127M VAE counted in
    ``released_config["params"]``."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    from branchgrpo.models.testing import REPLICAS

    with torch.device("meta"):
        tr = QwenImageTransformer2DModel.from_config(RELEASED_CONFIG["transformer"])
        vae = AutoencoderKLQwenImage.from_config(REPLICAS["qwenimage"]["vae/config.json"])
    assert sum(p.numel() for p in tr.parameters()) == 20_430_401_088
    assert sum(p.numel() for p in vae.parameters()) == RELEASED_CONFIG["params"]["vae"]
    assert len(tr.transformer_blocks) == 60 and tr.config.out_channels == 16


# ---- one BranchGRPO iteration through the CLI --------------------------------------------
def _train(path: Path, run: Path, prompts: Path, *extra: str) -> None:
    row = run_train(run, prompts, "model.kind=qwenimage", f"model.path={path}", *SIZE,
                    "rollout.method=branch", "rollout.num_steps=2", "rollout.split_steps=[0]",
                    "rollout.branch_factor=2", *extra)
    assert row["ratio/first"] == 1.0


@pytest.fixture
def prompts(tmp_path) -> Path:
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


def _checkpoint(run: Path) -> dict[str, torch.Tensor]:
    (ckpt,) = (run / "checkpoints").iterdir()
    return load_file(ckpt / "model.safetensors")


def test_full_finetune_iteration(replica, prompts, tmp_path):
    path = replica("qwenimage")
    _train(path, tmp_path / "run", prompts, "model.finetune=full", "train.lr=1e-3",
           "model.guidance=1.0")  # the branch rule: shifted linspace, quantised timestep
    state = _checkpoint(tmp_path / "run")
    base = {k: p.detach() for k, p in
            load_replica_pipeline("qwenimage", path).transformer.named_parameters()}
    assert set(state) == set(base) and all(bool(v.isfinite().all()) for v in state.values())
    assert len([k for k, v in state.items() if not torch.equal(v, base[k])]) > len(base) // 2
    assert not (tmp_path / "run" / "lora").exists()


def test_lora_iteration_with_cfg_exports_into_pipeline(replica, prompts, tmp_path):
    from branchgrpo.inference import load_trained

    path = replica("qwenimage")
    run = tmp_path / "run"
    _train(path, run, prompts, "model.finetune=lora", "model.lora_rank=4", "model.lora_alpha=8",
           "train.lr=1e-2", "model.guidance=4.0", "rollout.schedule=diffusers",
           "rollout.quantize_timestep=false")
    state = _checkpoint(run)
    assert state and all("lora_" in k for k in state)
    policy, cfg, _, _ = load_trained(run)
    assert policy.family.do_cfg
    sigmas = torch.tensor(resolve(cfg).sigmas)
    with torch.no_grad():
        ours = ode_rollout(policy, sigmas)
    x_T = ours.latents[ours.parent < 0]
    pipe = load_replica_pipeline("qwenimage", path)
    kw = {"negative_prompt": MODEL_CARD_NEGATIVE}
    base = run_default_pipeline("qwenimage", pipe, cfg, x_T.clone(), len(sigmas) - 1, **kw)
    pipe.load_lora_weights(run / "lora")
    tuned = run_default_pipeline("qwenimage", pipe, cfg, x_T.clone(), len(sigmas) - 1, **kw)
    assert (tuned - base).abs().max() > 1e-3
    torch.testing.assert_close(ours.leaf_x0, tuned, atol=1e-5, rtol=0)

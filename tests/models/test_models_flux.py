"""FLUX specifics: the FLUX.1-dev config, the embedding-only benchmark policy, packing,
timestep quantisation, the prompt cache, encoder offload, gradient checkpointing, bf16."""

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from models_testlib import PROMPTS

from branchgrpo.engine.plans import build_plan
from branchgrpo.engine.schedule import make_sigmas
from branchgrpo.engine.tree import rollout
from branchgrpo.models.flux import flux_dev_config, from_transformer, pack, tiny_flux, unpack
from branchgrpo.models.lora import LoraSpec


def test_flux_dev_config_builds_12b_on_meta():
    with torch.device("meta"):
        tr = FluxTransformer2DModel(**flux_dev_config())
    n = sum(p.numel() for p in tr.parameters())
    assert 11.5e9 < n < 12.5e9
    assert len(tr.transformer_blocks) == 19 and len(tr.single_transformer_blocks) == 38


def test_from_transformer_benchmark_policy():
    ref, _ = tiny_flux()
    policy = from_transformer(ref.transformer, 32, 32, vae_scale_factor=2,
                              max_sequence_length=6, lora=LoraSpec(rank=2, alpha=2))
    assert policy.latent_shape == (64, 16)
    cond = policy.encode(PROMPTS + PROMPTS[:1])
    assert cond["prompt_embeds"].shape == (3, 6, 32)
    assert cond["pooled_prompt_embeds"].shape == (3, 32)
    torch.testing.assert_close(cond["prompt_embeds"][0], cond["prompt_embeds"][2])
    plan = build_plan("branch", num_steps=2, split_steps=(0,), branch_factor=2,
                      **policy.plan_kwargs())
    tree = rollout(policy, cond, plan, generator=torch.Generator().manual_seed(0))
    img = policy.decode(tree.leaf_x0)
    assert img.shape == (6, 3, 16, 16) and 0 <= img.min() and img.max() <= 1


def test_pack_matches_pipeline():
    lat = torch.randn(2, 4, 8, 6)
    packed = pack(lat)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(lat, 2, 4, 8, 6))
    torch.testing.assert_close(unpack(packed, 8, 6), lat)


def test_schedule_and_timestep_quantisation():
    policy, _ = tiny_flux()
    sig = make_sigmas(**policy.default_schedule(), num_steps=4)
    torch.testing.assert_close(sig, make_sigmas("shifted", 4, 3.0))
    sigma = torch.tensor([0.52379, 1.0])
    torch.testing.assert_close(policy.timestep(sigma), sigma)
    policy.family.quantize_timestep = True
    torch.testing.assert_close(policy.timestep(sigma), torch.tensor([0.523, 1.0]))
    dyn, _ = tiny_flux(schedule="flux_dynamic")
    assert dyn.default_schedule()["kind"] == "flux_dynamic"
    make_sigmas(**dyn.default_schedule(), num_steps=4)


def test_prompt_cache_and_offload(monkeypatch):
    policy, _ = tiny_flux(offload_encoders=True)
    calls = []
    real = policy.family.encode
    monkeypatch.setattr(policy.family, "encode",
                        lambda parts, p: calls.append(list(p)) or real(parts, p))
    a = policy.encode(["x", "y", "x"])
    b = policy.encode(["y", "z"])
    assert calls == [["x", "y"], ["z"]]
    torch.testing.assert_close(a["prompt_embeds"][1], b["prompt_embeds"][0])
    assert all(p.device.type == "cpu" for m in policy.text_encoders() for p in m.parameters())


def test_gradient_checkpointing_same_values_and_grads():
    out = []
    for ckpt in (False, True):
        policy, _ = tiny_flux(full_finetune=True, gradient_checkpointing=ckpt)
        x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
        v = policy.velocity(x, torch.tensor([0.7, 0.2]), policy.encode(PROMPTS))
        v.square().mean().backward()
        out.append((v.detach(), policy.transformer.proj_out.weight.grad.clone()))
    torch.testing.assert_close(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1])


def test_bf16_autocast_returns_fp32():
    ref, _ = tiny_flux()
    policy, _ = tiny_flux(dtype=torch.bfloat16, lora=LoraSpec(rank=2, alpha=4))
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7, 0.2])
    with torch.no_grad():
        v = policy.velocity(x, sigma, policy.encode(PROMPTS))
        v32 = ref.velocity(x, sigma, ref.encode(PROMPTS))
    assert v.dtype == torch.float32
    assert (v - v32).abs().max() < 0.05 * v32.abs().max()
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())

"""Wan2.2 (`branchgrpo.models.wan22`) against diffusers' WanPipeline on replica checkpoints
(tiny random weights, the released scheduler and ``model_index.json``): TI2V-5B
(``expand_timesteps``, the 48-channel VAE with spatial factor 16) and T2V-A14B (two experts
switched at ``boundary_ratio * 1000``, ``guidance_scale_2``). The pipeline runs its own
default schedule and guidance (only ``num_inference_steps``, the size and the initial latents
are passed). WanPipeline's solver is UniPC, ours Euler/SDE on the same grid, so, as for Wan2.1
(test_models_replica_parity.py), we compare the grid, the first step, and here also the guided
model output at every step (recorded from the pipeline's transformer calls), which shows each
step ran the expert, scale and per-token timestep the pipeline uses."""

from __future__ import annotations

import pytest
import torch
from models_testlib import PROMPTS, ode_rollout

from branchgrpo.config import load_config
from branchgrpo.engine.sde import ode
from branchgrpo.models.factory import build_policy
from branchgrpo.spec import model_options, resolve

T = 4
FP32_ATOL = 1e-5
"""fp32 on both sides; batched vs separate CFG forwards and float64 vs fp32 timesteps are
the only differences: measured 4.8e-7 (first step, both, latents of magnitude ~4), 0
(TI2V-5B's guided outputs at every step) and 4.6e-6 (A14B's); a wrong grid or expert moves
them by more than 100 times the tolerance."""
SIZE = {"wan22": ("model.height=64", "model.width=64", "model.num_frames=5"),
        "wan22_a14b": ("model.height=32", "model.width=32", "model.num_frames=5")}
"""Replica sizes: TI2V-5B 64 px (latents 4 x 4, 2 x 2 tokens per frame, as its VAE has
factor 16), A14B 32 px (Wan2.1 VAE, factor 8); 2 latent frames."""


def wan22_config(replica: str, path, *extra: str):
    """A BranchGRPO run on the Wan2.2 replica at ``path`` with the pipeline's default CFG."""
    return load_config(None, ["model.kind=wan22", f"model.path={path}", "model.guidance=5.0",
                              *SIZE[replica], "rollout.method=branch",
                              "rollout.split_steps=[0,1]", f"rollout.num_steps={T}", *extra])


def pipeline_calls(pipe) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Record every transformer call of ``pipe`` as (expert 0 / 1, timestep, output)."""
    calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for i, m in enumerate((pipe.transformer, getattr(pipe, "transformer_2", None))):
        if m is not None:
            m.register_forward_hook(
                lambda _m, _a, kw, out, i=i: calls.append(
                    (i, kw["timestep"].clone(), out[0].clone())), with_kwargs=True)
    return calls


def run(replica: str, path, *extra: str, **pipe_kw):
    """(our policy, spec, x_T, pipeline scheduler, latents before each step, guided outputs
    per step with their expert and timestep) of a default-schedule pipeline run."""
    from diffusers import WanPipeline

    cfg = wan22_config(replica, path, *extra)
    spec = resolve(cfg)
    policy = build_policy(model_options(cfg), torch.device("cpu"))
    with torch.no_grad():
        tree = ode_rollout(policy, torch.tensor(spec.sigmas))
    x_T = tree.latents[tree.parent < 0]
    pipe = WanPipeline.from_pretrained(path)
    return (policy, spec, x_T, pipe.scheduler,
            *run_pipeline(pipe, cfg, x_T, len(spec.sigmas) - 1, **pipe_kw))


def run_pipeline(pipe, cfg, x_T, steps: int, **pipe_kw):
    """(latents before each step, (expert, timestep, guided output) per step) of ``pipe`` on
    its default schedule from ``x_T``."""
    pipe.set_progress_bar_config(disable=True)
    calls = pipeline_calls(pipe)
    before = [x_T.clone()]

    def keep(_pipe, i, t, kw):
        before.append(kw["latents"].clone())
        return kw

    m = cfg.model
    pipe(prompt=list(PROMPTS), num_inference_steps=steps, height=m.height, width=m.width,
         num_frames=m.num_frames, latents=x_T.clone(), output_type="latent",
         callback_on_step_end=keep, **pipe_kw)
    g1 = pipe_kw.get("guidance_scale", 5.0)
    g2 = pipe_kw.get("guidance_scale_2", g1)
    out = []
    for k in range(steps):  # cond then uncond, one pair per step
        (e, t, c), (_, _, u) = calls[2 * k], calls[2 * k + 1]
        out.append((e, t, u + (g1 if e == 0 else g2) * (c - u)))
    return before, out


def check_steps(policy, spec, before, steps) -> None:
    """Our guided velocity at the pipeline's latents and sigma of every step equals the
    pipeline's guided output there; the timestep the transformer saw is ours."""
    n = len(PROMPTS)
    cond = policy.encode(PROMPTS)
    for k, (e, t, theirs) in enumerate(steps):
        sigma = torch.full((n,), float(spec.sigmas[k]))
        ts = policy.timestep(sigma)
        assert policy.family.expert_of(ts).tolist() == [e] * n
        want = ts[:, None].expand_as(t) if t.ndim == 2 else ts
        assert torch.equal(t.float(), want)
        with torch.no_grad():
            ours = policy.velocity(before[k], sigma, cond)
        torch.testing.assert_close(ours, theirs.float(), atol=FP32_ATOL, rtol=0)


def check_first_step(policy, spec, x_T, sched, before) -> None:
    n = len(PROMPTS)
    sig = torch.tensor(spec.sigmas)
    torch.testing.assert_close(sig[1:], sched.sigmas[1:].float(), atol=1e-6, rtol=0)
    assert sig[0] == 1.0 and abs(float(sched.sigmas[0]) - (1 - 1e-6)) < 1e-7
    with torch.no_grad():
        v = policy.velocity(x_T, sig[:1].expand(n), policy.encode(PROMPTS))
    x1, _ = ode(v, x_T, sched.sigmas[:1].expand(n), sig[1:2].expand(n))
    torch.testing.assert_close(x1, before[1], atol=FP32_ATOL, rtol=0)


def test_ti2v_5b_matches_pipeline(replica):
    """TI2V-5B: flow_shift 5, the 48-channel latents at factor 16, per-token timesteps."""
    path = replica("wan22")
    policy, spec, x_T, sched, before, steps = run("wan22", path)
    fam = policy.family
    assert fam.expand_timesteps and fam.boundary_timestep is None
    assert spec.shift == 5.0 and policy.latent_shape == (48, 2, 4, 4)
    assert all(e == 0 and t.shape == (len(PROMPTS), 2 * 2 * 2) for e, t, _ in steps)
    check_first_step(policy, spec, x_T, sched, before)
    check_steps(policy, spec, before, steps)
    # not vacuous: the comparison sees the grid (a shift-3 grid lands far away)
    _, other, _, _, _, _ = run("wan22", path, "rollout.shift=3.0")
    assert other.sigmas != spec.sigmas
    with torch.no_grad():
        n = len(PROMPTS)
        v = policy.velocity(before[1], torch.full((n,), float(other.sigmas[1])),
                            policy.encode(PROMPTS))
    assert (v - steps[1][2]).abs().max() > 100 * FP32_ATOL


@pytest.mark.parametrize("g2", [None, 2.0])
def test_a14b_experts_match_pipeline(g2, replica):
    """T2V-A14B (flow_shift 3): timesteps 999, 900 run the high-noise expert, 750, 500 the
    low-noise one (boundary 875) with guidance_scale_2 (the pipeline's default:
    guidance_scale)."""
    path = replica("wan22_a14b")
    extra = () if g2 is None else (f"model.guidance_2={g2}",)
    kw = {} if g2 is None else {"guidance_scale_2": g2}
    policy, spec, x_T, sched, before, steps = run("wan22_a14b", path, *extra, **kw)
    fam = policy.family
    assert fam.boundary_timestep == 875.0 and not fam.expand_timesteps
    assert fam.guidance_scale_2 == (5.0 if g2 is None else g2)
    assert [e for e, _, _ in steps] == [0, 0, 1, 1]
    check_first_step(policy, spec, x_T, sched, before)
    check_steps(policy, spec, before, steps)
    # not vacuous: the other expert at a low-noise step is far from the pipeline's output
    n = len(PROMPTS)
    sigma = torch.full((n,), float(spec.sigmas[2]))
    fam.boundary_timestep = 0.0  # every step on the high-noise expert
    with torch.no_grad():
        wrong = policy.velocity(before[2], sigma, policy.encode(PROMPTS))
    assert (wrong - steps[2][2]).abs().max() > 100 * FP32_ATOL


def test_bf16_weights_match_diffusers_from_pretrained(replica):
    """bf16 loading leaves both experts as diffusers' own from_pretrained does (the modules
    WanTransformer3DModel keeps in fp32 stay fp32, seen through `WanExperts`); a full
    fine-tuning of one expert keeps fp32 master weights for it only."""
    from diffusers import WanTransformer3DModel

    from branchgrpo.models.wan22 import WanExperts

    assert WanExperts._keep_in_fp32_modules == WanTransformer3DModel._keep_in_fp32_modules
    path = replica("wan22_a14b")
    cfg = wan22_config("wan22_a14b", path, "model.dtype=bf16", "model.finetune=lora")
    policy = build_policy(model_options(cfg), torch.device("cpu"))
    for name, m in policy.transformer.experts().items():
        want = WanTransformer3DModel.from_pretrained(path, subfolder=name,
                                                     torch_dtype=torch.bfloat16)
        got = {k.replace(".base_layer", ""): p.dtype for k, p in m.named_parameters()
               if "lora_" not in k}
        assert got == {k: p.dtype for k, p in want.named_parameters()}
        assert got["blocks.0.norm2.weight"] == torch.float32
        assert got["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert policy.model_input(torch.zeros(1)).dtype == torch.bfloat16
    cfg = wan22_config("wan22_a14b", path, "model.dtype=bf16", "model.finetune=full",
                       "model.experts=low")
    policy = build_policy(model_options(cfg), torch.device("cpu"))
    tr = policy.transformer
    assert {p.dtype for p in tr.transformer_2.parameters()} == {torch.float32}
    assert tr.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in tr.transformer.parameters())
    assert all(p.requires_grad for p in tr.transformer_2.parameters())


def test_replica_configs_are_the_released_ones():
    """testing.REPLICAS (the replicas' config files) and wan22.RELEASED (plan's offline
    values) agree."""
    from branchgrpo.models.testing import REPLICAS
    from branchgrpo.models.wan22 import RELEASED, T2V_A14B, TI2V_5B, TI2V_5B_VAE

    for kind, repo in (("wan22", TI2V_5B), ("wan22_a14b", T2V_A14B)):
        files, rel = REPLICAS[kind], RELEASED[repo]
        assert files["transformer/config.json"] == rel["transformer"]
        assert {k: files["model_index.json"][k] for k in rel["model_index"]} == \
            rel["model_index"]
        sched = files["scheduler/scheduler_config.json"]
        assert {k: sched[k] for k in rel["scheduler"]} == rel["scheduler"]
    vae = REPLICAS["wan22"]["vae/config.json"]
    assert {k: TI2V_5B_VAE[k] for k in vae} == vae
    assert RELEASED[TI2V_5B]["vae_scale_factor"] == vae["scale_factor_spatial"] == 16


def test_experts_option_needs_two_experts(replica):
    cfg = wan22_config("wan22", replica("wan22"), "model.experts=low")
    with pytest.raises(ValueError, match="two-expert checkpoint"):
        build_policy(model_options(cfg), torch.device("cpu"))
    cfg = wan22_config("wan22", replica("wan22"), "model.guidance_2=3.0")
    with pytest.raises(ValueError, match="two-expert checkpoint"):
        build_policy(model_options(cfg), torch.device("cpu"))


def test_fsdp_shards_the_blocks_of_both_experts():
    from branchgrpo.dist import transformer_blocks
    from branchgrpo.models.wan22 import tiny_wan22

    policy, _ = tiny_wan22(32, 32, a14b=True)
    tr = policy.transformer
    assert transformer_blocks(tr) == [*tr.transformer.blocks, *tr.transformer_2.blocks]


def test_lora_on_one_expert_exports_that_expert_only(tmp_path):
    """model.experts=high with LoRA: adapters (the trained parameters) on ``transformer`` only,
    one diffusers LoRA file; gradient checkpointing runs through both experts."""
    from branchgrpo.models.lora import LoraSpec, save_lora
    from branchgrpo.models.wan22 import tiny_wan22

    policy, _ = tiny_wan22(32, 32, a14b=True, experts="high", gradient_checkpointing=True,
                           lora=LoraSpec(rank=2, alpha=4.0))
    names = {n for n, p in policy.transformer.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("transformer.") and "lora_" in n for n in names)
    save_lora(policy, tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "transformer_2").exists()
    x = torch.randn(2, *policy.latent_shape)
    v = policy.velocity(x, torch.tensor([1.0, 0.5]), policy.encode(PROMPTS))
    v.square().mean().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())


def test_load_lora_roundtrip_into_both_experts(tmp_path):
    """`load_lora` reads `save_lora`'s per-expert files back into a policy without adapters."""
    from branchgrpo.models.lora import LoraSpec, load_lora, save_lora
    from branchgrpo.models.wan22 import tiny_wan22

    policy, _ = tiny_wan22(32, 32, a14b=True, lora=LoraSpec(rank=2, alpha=4.0))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.normal_(0, 0.05)
    save_lora(policy, tmp_path)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([1.0, 0.5])  # one row per expert
    with torch.no_grad():
        want = policy.velocity(x, sigma, policy.encode(PROMPTS))
    other, _ = tiny_wan22(32, 32, a14b=True)
    with torch.no_grad():
        assert (other.velocity(x, sigma, other.encode(PROMPTS)) - want).abs().max() > 1e-3
    load_lora(other, tmp_path)
    with torch.no_grad():
        got = other.velocity(x, sigma, other.encode(PROMPTS))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_rows_of_both_experts_take_one_forward_of_the_experts_module():
    """A velocity call whose rows span both A14B experts runs the (DDP-wrapped) experts
    module once, as DDP needs one forward per backward, and each row gets its own expert and
    CFG scale: the same as the rows called one expert at a time."""
    from branchgrpo.models.wan22 import tiny_wan22

    policy, _ = tiny_wan22(32, 32, a14b=True)
    fam = policy.family
    fam.guidance_scale_2 = 3.0
    calls = []
    policy.transformer.register_forward_hook(lambda *_: calls.append(1), with_kwargs=True)
    cond = policy.encode(["a red cat", "blue dog 7"])
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.95, 0.3])  # timesteps 950 (high-noise expert) and 300 (low)
    assert fam.expert_of(torch.tensor([950.0, 300.0])).tolist() == [0, 1]
    with torch.no_grad():
        both = policy.velocity(x, sigma, cond)
        assert len(calls) == 1
        alone = torch.cat([policy.velocity(x[i:i + 1], sigma[i:i + 1],
                                           {k: v[i:i + 1] for k, v in cond.items()})
                           for i in range(2)])
    torch.testing.assert_close(both, alone, atol=1e-6, rtol=0)

"""Our deterministic rollout against each family's real diffusers pipeline on a replica
checkpoint (`branchgrpo.models.testing.write_replica_pipeline`: tiny random weights, the
released scheduler and behaviour configs), the pipeline running its **own default schedule**
(only ``num_inference_steps`` and the size are passed), our policy built from the same folder
by `branchgrpo.models.factory.build_policy` and our grid from `branchgrpo.spec.resolve`.

FLUX and SD3 both run Euler (the pipeline's FlowMatchEulerDiscreteScheduler, our ODE kernel)
on the grid, so in fp32 they agree to fp32 rounding (tolerance below). Wan's pipeline runs
UniPC (multistep, 2nd order) while training runs Euler/SDE steps on the same grid, so there we
compare the grids and the first step (one model call; UniPC's first step is first order, which
for flow prediction is an Euler step)."""

from __future__ import annotations

import pytest
import torch
from models_testlib import (
    PROMPTS,
    load_replica_pipeline,
    ode_rollout,
    pipeline_default,
    replica_config,
    run_default_pipeline,
)

from branchgrpo.engine.sde import ode
from branchgrpo.models.factory import build_policy
from branchgrpo.models.loading import DTYPES
from branchgrpo.spec import model_options, resolve

T = 4
FP32_ATOL = 1e-5
"""fp32, same solver: the only differences are rounding (timesteps from float64 vs fp32 sigmas,
1 ulp; batched vs separate CFG forwards for Wan): measured 4.8e-7 (FLUX), 0 (SD3), 4.8e-7
(Wan's first step) on latents of magnitude ~4; a wrong grid moves them by 0.07-0.14."""
BF16_RTOL = 0.04
"""bf16 on both sides (the pipeline loaded in bf16; ours fp32 master weights under bf16
autocast, text encoders bf16), as max |difference| / max |latent|: measured 0.0085 (FLUX),
0.013 (SD3) after 4 steps, 0.0019 (Wan's first step)."""


def _ours(family: str, path, *extra: str):
    cfg = replica_config(family, path, f"rollout.num_steps={T}", *extra)
    spec = resolve(cfg)
    policy = build_policy(model_options(cfg), torch.device("cpu"))
    with torch.no_grad():
        tree = ode_rollout(policy, torch.tensor(spec.sigmas))
    return cfg, spec, policy, tree


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_euler_rollout_matches_pipeline_default_schedule(family, replica):
    path = replica(family)
    cfg, spec, policy, tree = _ours(family, path)
    assert policy.family.guidance_scale == pipeline_default(family, "guidance_scale")
    assert policy.family.max_sequence_length == pipeline_default(family, "max_sequence_length")
    x_T = tree.latents[tree.parent < 0]
    pipe = load_replica_pipeline(family, path)
    theirs = run_default_pipeline(family, pipe, cfg, x_T.clone(), T)
    torch.testing.assert_close(torch.tensor(spec.sigmas), pipe.scheduler.sigmas.float(),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(tree.leaf_x0, theirs, atol=FP32_ATOL, rtol=0)
    # the comparison sees the schedule: the FastVideo grid (the rule for flux x branch) or a
    # shifted linspace (the old SD3 grid) on the same weights lands far away
    _, other, _, wrong = _ours(family, path, "rollout.schedule=shifted",
                               "rollout.quantize_timestep=null")
    assert other.sigmas != spec.sigmas
    assert (wrong.leaf_x0 - theirs).abs().max() > 100 * FP32_ATOL


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_bf16_rollout_matches_bf16_pipeline(family, replica):
    path = replica(family)
    cfg, spec, policy, tree = _ours(family, path, "model.dtype=bf16")
    x_T = tree.latents[tree.parent < 0]
    pipe = load_replica_pipeline(family, path, torch.bfloat16)
    theirs = run_default_pipeline(family, pipe, cfg, x_T.clone(), T).float()
    err = (tree.leaf_x0 - theirs).abs().max() / theirs.abs().max()
    assert err < BF16_RTOL, err


@pytest.mark.parametrize("flow_shift,dtype", [(3.0, "fp32"), (5.0, "fp32"), (3.0, "bf16")])
def test_wan_grid_and_first_step_match_unipc(flow_shift, dtype, replica):
    """The released flow_shift 3.0 and the 5.0 variant (diffusers' advice for 720p).

    Grid: ours is UniPC's, except sigma_0, which UniPC lowers to 1 - 1e-6 for its log-SNR.
    Timesteps: the pipeline gives the transformer int64(1000 sigma) of its grid (999 at step
    0), and so does ours under the Wan rule. The first step is one model call (CFG,
    embeddings, the VAE-free latent path) and the step, through our policy (at its own
    timestep) and our ODE kernel."""
    path = replica("wan", flow_shift=flow_shift)
    cfg, spec, policy, tree = _ours("wan", path, f"model.dtype={dtype}")
    assert spec.shift == flow_shift
    x_T = tree.latents[tree.parent < 0]
    pipe = load_replica_pipeline("wan", path, DTYPES[dtype])
    seen: dict[int, torch.Tensor] = {}

    def keep(_pipe, i, t, kw):
        seen[i] = kw["latents"].clone()
        return kw

    run_default_pipeline("wan", pipe, cfg, x_T.clone(), T, callback_on_step_end=keep)
    sched = pipe.scheduler
    ours_sig = torch.tensor(spec.sigmas)
    torch.testing.assert_close(ours_sig[1:], sched.sigmas[1:].float(), atol=1e-6, rtol=0)
    assert ours_sig[0] == 1.0 and abs(float(sched.sigmas[0]) - (1 - 1e-6)) < 1e-7
    pipe_t = sched.timesteps.double()
    assert pipe_t.tolist() == (sched.sigmas[:-1].double() * 1000).floor().tolist()
    assert spec.quantize_timestep and torch.tensor(spec.timesteps).double().tolist() == \
        pipe_t.tolist()
    with torch.no_grad():
        sigma0 = torch.full((len(PROMPTS),), float(ours_sig[0]))
        assert policy.timestep(sigma0).tolist() == [float(pipe_t[0])] * len(PROMPTS)
        v = policy.velocity(x_T, sigma0, policy.encode(PROMPTS))
    n = len(PROMPTS)
    x1, _ = ode(v, x_T, sched.sigmas[:1].expand(n), ours_sig[1:2].expand(n))
    if dtype == "fp32":
        torch.testing.assert_close(x1, seen[0], atol=FP32_ATOL, rtol=0)
    else:
        ref = seen[0].float()
        assert (x1 - ref).abs().max() / ref.abs().max() < BF16_RTOL

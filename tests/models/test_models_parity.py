"""Criterion 1: a deterministic rollout through our engine reproduces each family's own
diffusers pipeline (same initial latents, sigmas, guidance), in latents and decoded media."""

import pytest
import torch
from models_testlib import FAMILIES, build, ode_tree, run_pipeline

from branchgrpo.models.base import Policy
from branchgrpo.models.family import Family


@pytest.mark.parametrize("family", FAMILIES)
def test_ode_rollout_matches_pipeline(family):
    policy, pipe = build(family)
    assert isinstance(policy, Policy) and isinstance(policy.family, Family)
    tree, sig = ode_tree(policy)
    x_T = tree.latents[tree.parent < 0]
    assert x_T.shape[1:] == policy.latent_shape
    ref = run_pipeline(family, pipe, policy, x_T, sig)
    # Euler to sigma = 0 makes the final latent equal x0_hat of the last call (leaf_x0).
    torch.testing.assert_close(tree.leaf_x0, ref, atol=1e-5, rtol=0)
    media = policy.decode(tree.leaf_x0)
    ref_media = run_pipeline(family, pipe, policy, x_T, sig, output_type="pt")
    torch.testing.assert_close(media, ref_media.float(), atol=1e-5, rtol=0)
    assert media.dtype == torch.float32 and 0 <= media.min() and media.max() <= 1
    fam = policy.family
    if family == "wan":
        assert media.shape == (2, fam.num_frames, 3, fam.height, fam.width)
    else:
        assert media.shape == (2, 3, fam.height, fam.width)


@pytest.mark.parametrize("family", FAMILIES)
def test_velocity_is_fp32_and_row_independent(family):
    policy, _ = build(family)
    cond = policy.encode(["a", "b", "a"])
    torch.testing.assert_close(cond["prompt_embeds"][0], cond["prompt_embeds"][2])
    x = torch.randn(3, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.5, 0.9])
    with torch.no_grad():
        v = policy.velocity(x, sigma, cond)
        v0 = policy.velocity(x[:1], sigma[:1], {k: c[:1] for k, c in cond.items()})
    assert v.dtype == torch.float32 and v.shape == x.shape
    torch.testing.assert_close(v[:1], v0, atol=1e-5, rtol=0)

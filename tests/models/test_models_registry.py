"""The family registry: every registered kind builds through `build_policy` from plain
values, and satisfies the `Policy` protocol; a diffusers family's pieces satisfy `Family`."""

import pytest
import torch
from models_testlib import FAMILIES, build

from branchgrpo.models.base import Policy
from branchgrpo.models.factory import ModelOptions, build_policy
from branchgrpo.models.families import FAMILIES as REGISTRY
from branchgrpo.models.families import family_module
from branchgrpo.models.family import Family
from branchgrpo.tasks.shapes import split_prompts


def test_every_family_module_has_a_builder():
    for kind in REGISTRY:
        assert callable(family_module(kind).build), kind


def test_embedded_families_build_from_options(tmp_path):
    analytic = build_policy(ModelOptions(kind="analytic"), torch.device("cpu"))
    tiny = build_policy(ModelOptions(kind="tiny", pretrain_steps=1, cache_dir=str(tmp_path),
                                     progress=False), torch.device("cpu"))
    for policy in (analytic, tiny):
        assert isinstance(policy, Policy)
        cond = policy.encode(split_prompts()[0][:1])
        x = torch.zeros(1, *policy.latent_shape)
        with torch.no_grad():
            assert policy.velocity(x, torch.tensor([0.5]), cond).shape == x.shape


def test_unknown_kind_names_the_registered_ones():
    with pytest.raises(ValueError, match="registered: .*'analytic'"):
        build_policy(ModelOptions(kind="nope"), torch.device("cpu"))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_contract(family):
    policy, pipe = build(family)
    fam = policy.family
    assert isinstance(fam, Family)
    assert type(pipe).__name__ == fam.pipeline_name and policy.pipeline_class is type(pipe)
    assert fam.lora_targets and set(fam.fp32_modules) <= set(fam.subfolders)
    assert policy.latent_shape == fam.latent_shape and policy.token_period == fam.token_period

"""Criterion 3: a LoRA saved by us loads into the family's diffusers pipeline with
``load_lora_weights`` and gives the output our policy predicts; `load_lora` round-trips."""

import pytest
import torch
from models_testlib import FAMILIES, build, ode_tree, run_pipeline

from branchgrpo.models.lora import LoraSpec, load_lora, save_lora


def _randomize_lora(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.transformer.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_lora_loads_into_pipeline(family, tmp_path):
    policy, pipe = build(family, lora=LoraSpec(rank=4, alpha=8))  # alpha != rank: scale 2
    _randomize_lora(policy)
    tree, sig = ode_tree(policy)
    x_T = tree.latents[tree.parent < 0]
    base = run_pipeline(family, pipe, policy, x_T, sig)
    save_lora(policy, tmp_path)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    pipe.load_lora_weights(tmp_path)
    with_lora = run_pipeline(family, pipe, policy, x_T, sig)
    assert (with_lora - base).abs().max() > 1e-2  # the LoRA matters ...
    torch.testing.assert_close(tree.leaf_x0, with_lora, atol=1e-5, rtol=0)  # ... as predicted


def test_load_lora_roundtrip(tmp_path):
    policy, _ = build("flux", lora=LoraSpec(rank=4, alpha=8))
    _randomize_lora(policy, seed=3)
    save_lora(policy, tmp_path)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        want = policy.velocity(x, sigma, policy.encode(["a", "b"]))
    same_spec, _ = build("flux", lora=LoraSpec(rank=4, alpha=8))
    no_adapter, _ = build("flux")
    for other in (same_spec, no_adapter):
        load_lora(other, tmp_path)
        with torch.no_grad():
            got = other.velocity(x, sigma, other.encode(["a", "b"]))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_lora_errors():
    with pytest.raises(ValueError, match="not both"):
        build("flux", lora=LoraSpec(), full_finetune=True)
    with pytest.raises(ValueError, match="matched no module"):
        build("flux", lora=LoraSpec(target_modules=("no_such_proj",)))
    policy, _ = build("flux")
    assert list(policy.trainable_parameters()) == []
    with pytest.raises(ValueError, match="no LoRA adapter"):
        save_lora(policy, "unused")

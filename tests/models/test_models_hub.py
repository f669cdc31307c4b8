"""Criterion 4: loading a real checkpoint id without network fails fast with a message saying
what to do; a local diffusers folder loads through the same code path."""

import time

import pytest
import torch
from models_testlib import FAMILIES, build, ode_tree, run_pipeline

from branchgrpo.models import hub
from branchgrpo.models.flux import FluxFamily
from branchgrpo.models.hub import ModelNotAvailableError
from branchgrpo.models.loading import load
from branchgrpo.models.sd3 import SD3Family
from branchgrpo.models.wan import WanFamily


@pytest.mark.parametrize("cls,repo", [(FluxFamily, "black-forest-labs/FLUX.1-dev"),
                                      (SD3Family, "stabilityai/stable-diffusion-3.5-medium"),
                                      (WanFamily, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")])
def test_offline_hub_id_fails_fast(cls, repo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as err:
        load(cls, repo, cache_dir=tmp_path / "hub", device="cpu")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert repo in msg and "download" in msg and "local folder" in msg
    assert "HF_HUB_OFFLINE" in msg


def test_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError, match="cannot be reached"):
        hub.resolve_checkpoint("black-forest-labs/FLUX.1-dev", ("transformer",),
                               cache_dir=tmp_path)
    assert time.monotonic() - start < 10


def test_bad_local_paths(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="lacks the subfolder"):
        hub.resolve_checkpoint(tmp_path, ("transformer", "vae"))
    with pytest.raises(ModelNotAvailableError, match="local folder"):
        hub.resolve_checkpoint("./not/here/at/all", ("transformer",))


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_local_folder(family, tmp_path):
    """The real loading code on a diffusers folder (save_pretrained of the tiny pipeline)."""
    policy, pipe = build(family)
    pipe.save_pretrained(tmp_path)
    cls = {"flux": FluxFamily, "sd3": SD3Family, "wan": WanFamily}[family]
    fam = policy.family
    extra = {"num_frames": fam.num_frames} if family == "wan" else {}
    loaded = load(cls, tmp_path, dtype=torch.float32, device="cpu", height=16, width=16,
                  max_sequence_length=8, shift=fam.shift, guidance_scale=fam.guidance_scale,
                  **extra)
    assert loaded.latent_shape == policy.latent_shape
    tree, sig = ode_tree(loaded)
    ref = run_pipeline(family, pipe, policy, tree.latents[tree.parent < 0], sig)
    torch.testing.assert_close(tree.leaf_x0, ref, atol=1e-5, rtol=0)

"""Loading in bf16 leaves every weight in the dtype diffusers' own ``from_pretrained`` gives:
the modules a transformer class keeps in fp32 (``_keep_in_fp32_modules``, e.g. Wan's
time_embedder, scale_shift_table and norms) stay fp32; the rest is bf16."""

import pytest
import torch
from models_testlib import FAMILIES, PROMPTS, build

from branchgrpo.models.flux import FluxFamily
from branchgrpo.models.loading import cast_weights, keeps_fp32, load
from branchgrpo.models.sd3 import SD3Family
from branchgrpo.models.wan import WanFamily

CLASSES = {"flux": FluxFamily, "sd3": SD3Family, "wan": WanFamily}


def _dtypes(module: torch.nn.Module) -> dict[str, torch.dtype]:
    named = list(module.named_parameters()) + list(module.named_buffers())
    return {n: t.dtype for n, t in named}


def _load(family: str, path, **kw):
    policy, pipe = build(family)
    pipe.save_pretrained(path)
    fam = policy.family
    extra = {"num_frames": fam.num_frames} if family == "wan" else {}
    loaded = load(CLASSES[family], path, device="cpu", height=16, width=16,
                  max_sequence_length=8, shift=fam.shift, guidance_scale=fam.guidance_scale,
                  **extra, **kw)
    return loaded, type(pipe.transformer)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_weights_match_diffusers_from_pretrained(family, tmp_path):
    loaded, tr_cls = _load(family, tmp_path, dtype=torch.bfloat16)
    want = tr_cls.from_pretrained(tmp_path, subfolder="transformer", torch_dtype=torch.bfloat16)
    got = _dtypes(loaded.transformer)
    assert got == _dtypes(want)
    keep = tr_cls._keep_in_fp32_modules or []
    fp32 = {n for n, d in got.items() if d == torch.float32}
    assert {n for n in fp32 if n in dict(loaded.transformer.named_parameters())} == {
        n for n, _ in loaded.transformer.named_parameters() if keeps_fp32(loaded.transformer, n)}
    if family == "wan":  # not vacuous: the class keeps these in fp32, the rest is bf16
        assert {"time_embedder", "scale_shift_table", "norm2"} <= set(keep)
        for name in ("scale_shift_table", "blocks.0.scale_shift_table",
                     "condition_embedder.time_embedder.linear_1.weight", "blocks.0.norm2.weight"):
            assert got[name] == torch.float32, name
        assert got["patch_embedding.weight"] == torch.bfloat16
        assert got["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    else:
        assert not keep and fp32 <= {n for n, _ in loaded.transformer.named_buffers()}
    assert loaded.model_input(torch.zeros(1)).dtype == torch.bfloat16

    cond = loaded.encode(PROMPTS)
    x = torch.randn(len(PROMPTS), *loaded.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = loaded.velocity(x, torch.tensor([0.9, 0.4]), cond)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()


def test_full_finetune_master_weights_are_all_fp32(tmp_path):
    loaded, _ = _load("wan", tmp_path, dtype=torch.bfloat16, full_finetune=True)
    assert set(_dtypes(loaded.transformer).values()) == {torch.float32}


def test_cast_weights_matches_diffusers_on_an_in_memory_wan(tmp_path):
    policy, pipe = build("wan")
    tr = pipe.transformer
    tr.save_pretrained(tmp_path)
    want = type(tr).from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert _dtypes(cast_weights(tr, torch.bfloat16)) == _dtypes(want)
    assert _dtypes(cast_weights(tr, torch.float32)) == {n: torch.float32 for n in _dtypes(tr)}

"""The memory estimate of the small-GPU keys (docs/small_gpu.md): ``model.quantize`` stores
the frozen transformer's Linear weights at 1 byte plus a scale per output row (checked by hand
and against the bytes a quantized replica really holds), offloaded or freed text encoders
count only in an ``encode`` phase, and every small-GPU config (``configs/*_{24,48,80}gb.yaml``)
estimates under its card's size less the 10% the plan keeps free."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from branchgrpo.cli import main
from branchgrpo.memory import activations, frozen_base_bytes, weights
from branchgrpo.model_sizes import Model
from test_memory import _model as hand_model
from test_memory import _run


def _model() -> Model:
    return hand_model(linear_params=800, linear_rows=40)


def test_quantized_weight_bytes_by_hand():
    """800 of 1000 bf16 parameters are Linear weights with 40 output rows: int8 and fp8 hold
    them in 800 B + 40 fp32 scales; the other 200 stay bf16."""
    assert frozen_base_bytes(_model(), _run()) == 2000
    assert frozen_base_bytes(_model(), _run(quantize="int8")) == 200 * 2 + 800 + 40 * 4
    assert frozen_base_bytes(_model(), _run(quantize="fp8")) == 1360
    kl = weights(_model(), _run(quantize="int8", kl=True))
    assert kl["transformer"] == 1360 and kl["reference"] == 1360 + 160 + 100 + 80


def test_offloaded_encoders_count_only_while_encoding():
    on = weights(_model(), _run())
    off = weights(_model(), _run(encoders_on_device=False))
    assert on["text_encoders"] == 100 and "text_encoders" not in off
    assert activations(_model(), _run(encoders_on_device=False), False)["encode"] == 100
    assert activations(_model(), _run(), False)["encode"] == 0


def test_prompt_embeddings_count_no_encoders():
    """``model.prompt_embeddings``: the text encoders are never loaded: no weights, no encode
    phase, nothing in a KL reference."""
    none = weights(_model(), _run(encoders_loaded=False, kl=True))
    assert "text_encoders" not in none and none["reference"] == 2000 + 160 + 80
    assert activations(_model(), _run(encoders_loaded=False, encoders_on_device=False),
                       False)["encode"] == 0


def test_plan_with_prompt_embeddings_has_no_encode_phase(capsys):
    """flux_24gb's peak is its encode phase (offloaded T5 + CLIP beside the int8 transformer);
    with a prompt-embedding file instead the encoders count nowhere and the peak drops."""
    assert main(["plan", "configs/flux_24gb.yaml", "--json"]) == 0
    off = json.loads(capsys.readouterr().out)["memory"]
    assert main(["plan", "configs/flux_24gb.yaml", "model.offload_encoders=false",
                 "model.prompt_embeddings=data/flux_embeddings.safetensors", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    emb = out["memory"]
    assert off["phase"] == "encode" and emb["phases_gib"]["encode"] == 0
    assert "text_encoders" not in emb["parts_gib"] and emb["phase"] != "encode"
    assert emb["peak_gib"] < off["peak_gib"] - 5
    assert out["dtypes"]["text encoders"].startswith("not loaded")


@pytest.mark.parametrize("quantize", ["int8", "fp8"])
def test_estimate_is_the_bytes_a_quantized_replica_holds(quantize, tmp_path):
    """The estimate from the meta-device architecture against the loaded quantized FLUX
    replica: torchao's ``Int8Tensor`` / ``Float8Tensor`` hold 1-byte ``qdata`` and one fp32
    scale per output row."""
    pytest.importorskip("torchao", reason="model.quantize needs torchao: pip install "
                                          "'branchgrpo[quant]'")
    from torchao.quantization import Float8Tensor, Int8Tensor

    from branchgrpo.model_sizes import arch_of
    from branchgrpo.models.factory import ModelOptions, build_policy
    from branchgrpo.models.flux import FluxFamily
    from branchgrpo.models.testing import write_replica_pipeline

    path = write_replica_pipeline("flux", tmp_path / "flux")
    policy = build_policy(ModelOptions(kind="flux", path=str(path), dtype="bf16",
                                       finetune="lora", lora_rank=4, quantize=quantize,
                                       height=64, width=64), torch.device("cpu"))
    held = 0
    for n, p in policy.transformer.named_parameters():
        if "lora_" in n:
            continue
        if isinstance(p, (Int8Tensor, Float8Tensor)):
            held += p.qdata.numel() + p.scale.numel() * p.scale.element_size()
        else:
            held += p.numel() * p.element_size()
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        plain = FluxTransformer2DModel.from_config(policy.transformer.config)
    model = Model(arch_of(plain, FluxFamily.lora_targets), {}, (), 1, 1, 1, 1, 1, 1, 1, ())
    assert frozen_base_bytes(model, _run(quantize=quantize)) == held


SMALL_GPU = sorted(p for p in (Path(__file__).parents[1] / "configs").glob("*gb.yaml")
                   if re.fullmatch(r".+_(24|48|80)gb", p.stem))
MARGIN = 0.1
"""The share of each card the small-GPU configs leave free: the plan's own ``fits_gb`` test
(`branchgrpo.memory.CARDS_GB`), for the CUDA context, allocator fragmentation and the reward
models, which the estimate does not count."""


@pytest.mark.parametrize("path", SMALL_GPU, ids=lambda p: p.stem)
def test_small_gpu_config_plans_under_its_card(path, capsys):
    """The plan's estimated peak is under the card size in the name (GiB) less `MARGIN`, and
    the header's first line states that estimate."""
    card = int(path.stem.rsplit("_", 1)[1][:-2])
    assert main(["plan", str(path), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["memory"]
    assert m["peak_gib"] < (1 - MARGIN) * card and m["fits_gb"][str(card)]
    stated = re.search(r"memory\.peak_gib\): ([\d.]+) GiB", path.read_text().splitlines()[0])
    assert stated and float(stated.group(1)) == round(m["peak_gib"], 1)
    assert path.read_text().splitlines()[1].startswith(f"# {m['phase']} phase")


def test_small_gpu_configs_are_found():
    """The glob finds the shipped set (a rename would otherwise skip the test above)."""
    assert {p.stem for p in SMALL_GPU} >= {f"{f}_{c}gb" for f in ("flux", "sd35", "zimage")
                                           for c in (24, 48, 80)}
    # the prompt-embedding recipes (model.prompt_embeddings: no text encoder loaded)
    assert {p.stem for p in SMALL_GPU} >= {"wan_24gb", "qwenimage_24gb", "flux2_48gb",
                                           "flux2_80gb"}


def test_flux_24gb_counts_int8_weights_and_offloaded_encoders(capsys):
    assert main(["plan", "configs/flux_24gb.yaml", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["memory"]
    # 11.9B parameters, nearly all in Linear weights: ~1 byte each (bf16: 22.2 GiB)
    assert 10.5 < m["parts_gib"]["transformer"] < 11.5
    assert "text_encoders" not in m["parts_gib"] and m["phases_gib"]["encode"] > 9

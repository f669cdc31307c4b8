"""The memory estimate of the small-GPU keys (docs/small_gpu.md): ``model.quantize`` stores
the frozen transformer's Linear weights at 1 byte plus a scale per output row (checked by hand
and against the bytes a quantized replica really holds), offloaded or freed text encoders
count only in an ``encode`` phase, and ``configs/flux_24gb.yaml`` estimates under 24 GiB."""

from __future__ import annotations

import json

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


def test_flux_24gb_plans_under_24_gib(capsys):
    assert main(["plan", "configs/flux_24gb.yaml", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["memory"]
    assert m["peak_gib"] < 24 and m["fits_gb"]["24"]
    # 11.9B parameters, nearly all in Linear weights: ~1 byte each (bf16: 22.2 GiB)
    assert 10.5 < m["parts_gib"]["transformer"] < 11.5
    assert "text_encoders" not in m["parts_gib"] and m["phases_gib"]["encode"] > 9

"""The real model families (FLUX.1, SD3.5, Wan2.1) built from ``cfg.model``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import Config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(cfg: Config, device: torch.device) -> Any:
    """Load ``cfg.model.path`` (Hub id or local folder) as the policy of ``cfg.model.kind``;
    fails fast with `ModelNotAvailableError` when the weights are not on this machine."""
    from ..spec import resolve
    from .lora import LoraSpec

    m = cfg.model
    lora = LoraSpec(rank=m.lora_rank, alpha=m.lora_alpha) if m.finetune == "lora" else None
    common: dict[str, Any] = {
        "dtype": DTYPES[m.dtype], "device": device, "lora": lora,
        "full_finetune": m.finetune == "full", "height": m.height, "width": m.width,
        "guidance_scale": m.guidance, "gradient_checkpointing": m.gradient_checkpointing,
        "quantize_timestep": resolve(cfg).quantize_timestep,
    }
    if m.kind == "flux":
        from .flux import FluxPolicy

        return FluxPolicy.from_pretrained(m.path, **common)
    if m.kind == "sd3":
        from .sd3 import SD3Policy

        return SD3Policy.from_pretrained(m.path, **common)
    if m.kind == "wan":
        from .wan import WanPolicy

        return WanPolicy.from_pretrained(m.path, num_frames=m.num_frames, **common)
    raise ValueError(f"unknown model.kind {m.kind!r}")


def module_of(policy: Any) -> nn.Module:
    """The module whose parameters a checkpoint holds: the policy itself when it is a module
    (the tiny default), else its transformer (diffusers families)."""
    return policy if isinstance(policy, nn.Module) else policy.transformer

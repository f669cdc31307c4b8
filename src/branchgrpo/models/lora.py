"""Fine-tuning modes of a policy's diffusers transformer (LoRA via peft on the family's
default targets, full, frozen: `setup_finetune`) and LoRA export in the diffusers format, so
``pipeline.load_lora_weights(path)`` loads what we save.

LoRA is injected with diffusers' ``ModelMixin.add_adapter`` (peft underneath), so the
transformer keeps its class and forward signature; only the LoRA matrices train, kept in fp32
while the frozen base may be bf16 (docs/algorithms.md §1.7).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER = "default"

JOINT_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0",
                           "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
"""Flow-GRPO's LoRA targets for FLUX and SD3 (image and text streams of joint attention)."""


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters. ``target_modules`` None means the family default; ``init`` is
    peft's ``init_lora_weights`` ("gaussian" as Flow-GRPO, True for kaiming-A / zero-B)."""

    rank: int = 32
    alpha: float = 64.0
    target_modules: tuple[str, ...] | None = None
    init: str | bool = "gaussian"
    dropout: float = 0.0

    def config(self, default_targets: tuple[str, ...]) -> Any:
        from peft import LoraConfig

        targets = list(self.target_modules or default_targets)
        if not targets:
            raise ValueError("LoraSpec has no target_modules and the family has no default")
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=targets,
                          init_lora_weights=self.init, lora_dropout=self.dropout)


def setup_finetune(
    policy: Any, *, lora: LoraSpec | None, full_finetune: bool, gradient_checkpointing: bool,
) -> None:
    """Set how ``policy.transformer`` trains: LoRA (``lora`` given: adapters on
    ``lora.target_modules`` or the family's ``policy.family.lora_targets``; only they train, in
    fp32), full fine-tuning (every weight trains) or frozen (neither; sampling/reference).
    Gradient checkpointing per block."""
    if lora is not None and full_finetune:
        raise ValueError("choose LoRA (lora=LoraSpec(...)) or full_finetune=True, not both")
    transformer = policy.transformer
    transformer.requires_grad_(False)
    if lora is not None:
        _add_lora(transformer, lora, policy.family.lora_targets)
    elif full_finetune:
        transformer.requires_grad_(True)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train(lora is not None or full_finetune)


def _add_lora(transformer: nn.Module, lora: LoraSpec, default_targets: tuple[str, ...]) -> None:
    """Inject the adapter and make its matrices fp32 and trainable (the rest stays frozen)."""
    targets = lora.target_modules or default_targets
    try:
        transformer.add_adapter(lora.config(default_targets), adapter_name=ADAPTER)
    except ValueError as e:
        raise ValueError(f"LoRA targets {targets} matched no module of the transformer; "
                         f"set lora target_modules ({e})") from e
    n = 0
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            n += 1
    if n == 0:
        raise ValueError(f"LoRA targets {targets} matched no module of the transformer; "
                         "set lora target_modules")


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """peft state dict of the LoRA weights (keys without the adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=ADAPTER)


def _metadata(transformer: nn.Module) -> dict[str, Any]:
    cfg = transformer.peft_config[ADAPTER].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}


def save_lora(policy: Any, path: str | os.PathLike) -> Path:
    """Write the policy's LoRA as ``path/pytorch_lora_weights.safetensors`` in the diffusers
    format (``transformer.``-prefixed keys + adapter config metadata, so alpha survives);
    ``pipeline.load_lora_weights(path)`` reproduces the policy's transformer. A transformer
    holding experts (``experts()``: Wan2.2 A14B's `WanExperts`) writes one such file per expert
    with LoRA: ``transformer`` in ``path``, any other expert ``name`` in ``path/name`` (loaded
    with ``load_lora_weights(path/name, load_into_transformer_2=True)``)."""
    tr = policy.transformer
    experts = tr.experts() if hasattr(tr, "experts") else {"transformer": tr}
    tuned = {n: m for n, m in experts.items() if ADAPTER in (getattr(m, "peft_config", None)
                                                              or {})}
    if not tuned:
        raise ValueError("this policy has no LoRA adapter (built without lora=LoraSpec(...))")
    out = Path(path)
    for name, m in tuned.items():
        state = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(m).items()}
        policy.pipeline_class.save_lora_weights(
            out if name == "transformer" else out / name, transformer_lora_layers=state,
            transformer_lora_adapter_metadata=_metadata(m))
    return out


def load_lora(policy: Any, path: str | os.PathLike) -> None:
    """Load a diffusers-format LoRA (saved by `save_lora` or a diffusers trainer) into the
    policy's adapter; adds the adapter (from the file's metadata) when the policy has none. A
    transformer holding experts (``experts()``) loads ``path`` into ``transformer`` and
    ``path/name`` into each other expert, where those files exist (`save_lora`'s layout)."""
    tr = policy.transformer
    if not hasattr(tr, "experts"):
        _load_into(tr, policy.pipeline_class, path)
        return
    found = [(m, where) for name, m in tr.experts().items()
             if (where := Path(path) / ("" if name == "transformer" else name)).is_dir()
             and any(where.glob("*.safetensors"))]
    if not found:
        raise ValueError(f"{path}: no LoRA file for any expert of the policy")
    for m, where in found:
        _load_into(m, policy.pipeline_class, where)


def _load_into(tr: nn.Module, pipeline_class: Any, path: str | os.PathLike) -> None:
    """`load_lora` of one transformer (``transformer.``-prefixed keys of ``path``)."""
    from peft.utils import set_peft_model_state_dict

    state, meta = pipeline_class.lora_state_dict(path, return_lora_metadata=True)
    prefix = "transformer."
    sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not sd:
        raise ValueError(f"{path}: no 'transformer.' LoRA weights found")
    if not getattr(tr, "peft_config", None) or ADAPTER not in tr.peft_config:
        from peft import LoraConfig

        tmeta = {k[len(prefix):]: v for k, v in (meta or {}).items() if k.startswith(prefix)}
        if not tmeta:
            raise ValueError(f"{path}: no adapter metadata; build the policy with the LoraSpec "
                             "it was trained with, then load")
        tr.add_adapter(LoraConfig(**tmeta), adapter_name=ADAPTER)
        tr.requires_grad_(False)
    dev = next(tr.parameters()).device
    res = set_peft_model_state_dict(tr, {k: v.to(dev) for k, v in sd.items()},
                                    adapter_name=ADAPTER)
    bad = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
    if bad:
        raise ValueError(f"{path}: LoRA keys do not match the policy: {bad[:4]} ...")

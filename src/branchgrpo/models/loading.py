"""Loading a family's diffusers pipeline from a checkpoint (resolved by
`branchgrpo.models.hub`) with the weight dtypes diffusers' own ``from_pretrained`` gives, and
`load`: a checkpoint to a ready `DiffusersPolicy`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .hub import ModelNotAvailableError, advice, resolve_checkpoint
from .lora import LoraSpec

if TYPE_CHECKING:
    from .diffusers_policy import DiffusersPolicy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The config's dtype names."""


def dtype_kwarg() -> str:
    """``dtype`` for diffusers versions that deprecate ``torch_dtype``, else ``torch_dtype``."""
    try:
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else (
            "torch_dtype")
    except ImportError:
        return "torch_dtype"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(family_cls: Any, model_id_or_path: str | os.PathLike, dtype: torch.dtype,
                  cache_dir: str | os.PathLike | None = None) -> Any:
    """The family's pipeline (``family_cls.pipeline_name``) from the resolved local folder
    (never the network) in ``dtype``, the components in ``family_cls.fp32_modules`` in fp32
    (their class from ``model_index.json``); ``family_cls.optional_subfolders`` (if any) are
    fetched when the checkpoint has them."""
    import diffusers

    path = resolve_checkpoint(model_id_or_path, family_cls.subfolders, cache_dir,
                              getattr(family_cls, "optional_subfolders", ()))
    try:
        fp32 = {name: _component(path, name, torch.float32) for name in family_cls.fp32_modules}
        return getattr(diffusers, family_cls.pipeline_name).from_pretrained(
            path, local_files_only=True, **{dtype_kwarg(): dtype}, **fp32)
    except OSError as e:
        raise ModelNotAvailableError(advice(str(model_id_or_path),
                                            f"files are missing in {path} ({e})")) from e


def _component(path: str, name: str, dtype: torch.dtype) -> nn.Module:
    """Pipeline component ``name`` of the folder ``path`` in ``dtype``."""
    import importlib

    library, cls = json.loads((Path(path) / "model_index.json").read_text())[name]
    return getattr(importlib.import_module(library), cls).from_pretrained(
        path, subfolder=name, local_files_only=True, **{dtype_kwarg(): dtype})


def load(
    family_cls: Any, model_id_or_path: str | os.PathLike, *,
    dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
    lora: LoraSpec | None = None, full_finetune: bool = False,
    master_dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None,
    **kw: Any,
) -> DiffusersPolicy:
    """The policy of ``family_cls`` from a checkpoint (Hub id or local diffusers folder);
    fails fast with `ModelNotAvailableError` offline. Frozen parts load in ``dtype``; fully
    fine-tuned transformer weights in ``master_dtype``. ``kw``: the family's options and
    `branchgrpo.models.diffusers_policy.compose`'s (gradient_checkpointing, ...)."""
    from .diffusers_policy import compose

    pipe = load_pipeline(family_cls, model_id_or_path, dtype, cache_dir)
    cast_weights(pipe.transformer, weight_dtype(dtype, lora, full_finetune, master_dtype))
    return compose(family_cls, pipe, device=device or default_device(), dtype=dtype, lora=lora,
                   full_finetune=full_finetune, **kw)


def keeps_fp32(module: nn.Module, name: str) -> bool:
    """Whether diffusers keeps tensor ``name`` of ``module`` in fp32 whatever ``torch_dtype``:
    a component of the dotted name is in the class's ``_keep_in_fp32_modules`` (diffusers'
    own test in ``load_model_dict_into_meta``; e.g. Wan's time_embedder, scale_shift_table,
    norm1-3)."""
    keep = getattr(type(module), "_keep_in_fp32_modules", None) or ()
    return bool(keep) and any(k in name.split(".") for k in keep)


def cast_weights(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating parameters and persistent buffers of a diffusers model to ``dtype``
    as ``from_pretrained(torch_dtype=dtype)`` leaves them: tensors under the class's
    ``_keep_in_fp32_modules`` (`keeps_fp32`) stay fp32. ``module.to(dtype)`` would cast those
    too. Non-persistent buffers are left as they are (from_pretrained does not cast them)."""
    persistent = set(module.state_dict(keep_vars=True))
    with torch.no_grad():
        tensors = list(module.named_parameters()) + list(module.named_buffers())
        for name, t in tensors:
            if name not in persistent or not t.is_floating_point():
                continue
            target = torch.float32 if keeps_fp32(module, name) else dtype
            if t.dtype != target:
                t.data = t.data.to(target)
    return module


def weight_dtype(dtype: torch.dtype, lora: LoraSpec | None, full_finetune: bool,
                 master_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """Storage dtype of the transformer weights: ``master_dtype`` (fp32) when they are trained
    in full (docs/algorithms.md §1.7: fp32 master weights, bf16 autocast), else ``dtype``."""
    return master_dtype if full_finetune and lora is None else dtype

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


QUANTIZED_COMPONENTS = ("transformer", "transformer_2")
"""Pipeline components a ``quantize`` other than none loads quantized (Wan2.2 A14B has two
experts); text encoders and VAE keep ``dtype`` (cached or offloaded instead)."""


def quantization_config(quantize: str) -> Any:
    """The diffusers ``TorchAoConfig`` of ``model.quantize`` (None for "none"): int8 is torchao's
    ``Int8WeightOnlyConfig`` (int8 weights + one fp32 scale per output row, dequantized in the
    matmul), fp8 its ``Float8WeightOnlyConfig`` (float8 e4m3 weights, the same scales); both
    run on the CPU and CUDA. Both are in diffusers' trainable torchao configs, and peft wraps
    their linear layers in
    ``TorchaoLoraLinear``, so LoRA trains on the frozen quantized base. ImportError naming the
    extra when torchao is missing."""
    if quantize == "none":
        return None
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError as e:
        raise ImportError(f"model.quantize={quantize} needs torchao: pip install "
                          "'branchgrpo[quant]'") from e
    from diffusers import TorchAoConfig

    configs = {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}
    if quantize not in configs:
        raise ValueError(f"quantize={quantize!r} is not one of {['none', *configs]}")
    return TorchAoConfig(configs[quantize]())


COMPONENTS = ("all", "encoders", "no_encoders")
"""What `load_pipeline` loads: everything; the text encoders and tokenizers only (``branchgrpo
encode``: the other components built on the meta device from their configs); all but them
(``model.prompt_embeddings``)."""


def is_text_component(name: str) -> bool:
    """Whether pipeline component ``name`` is a text encoder or tokenizer."""
    return name.startswith(("text_encoder", "tokenizer"))


def load_pipeline(family_cls: Any, model_id_or_path: str | os.PathLike, dtype: torch.dtype,
                  cache_dir: str | os.PathLike | None = None, quantize: str = "none",
                  components: str = "all") -> Any:
    """The family's pipeline (``family_cls.pipeline_name``) from the resolved local folder
    (never the network) in ``dtype``, the components in ``family_cls.fp32_modules`` in fp32
    (their class from ``model_index.json``); ``family_cls.optional_subfolders`` (if any) are
    fetched when the checkpoint has them. ``quantize`` (not "none"): the transformer(s)
    (`QUANTIZED_COMPONENTS`) load with `quantization_config`. ``components`` (`COMPONENTS`):
    "no_encoders" passes ``None`` for every text encoder and tokenizer (never read from disk);
    "encoders" builds every other model component on the meta device from its config (no
    weights read, no memory; the pipeline and the family still see their configs), and
    ignores ``quantize``."""
    import diffusers

    if components not in COMPONENTS:
        raise ValueError(f"components={components!r} is not one of {COMPONENTS}")
    subfolders, optional, configs = _subfolders(family_cls, components)
    path = resolve_checkpoint(model_id_or_path, subfolders, cache_dir, optional, configs)
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
        present = [n for n, v in index.items()
                   if not n.startswith("_") and isinstance(v, list) and v[0] is not None]
        if components == "encoders":
            parts = {n: m for n in present if not is_text_component(n)
                     if (m := _meta_component(path, n, index[n])) is not None}
            return getattr(diffusers, family_cls.pipeline_name).from_pretrained(
                path, local_files_only=True, **{dtype_kwarg(): dtype}, **parts)
        parts = {name: _component(path, name, index[name], torch.float32)
                 for name in family_cls.fp32_modules}
        if components == "no_encoders":
            parts |= {n: None for n in present if is_text_component(n)}
        if (qc := quantization_config(quantize)) is not None:
            parts |= {name: _component(path, name, index[name], dtype, quantization_config=qc)
                      for name in QUANTIZED_COMPONENTS
                      if (index.get(name) or [None])[0] is not None}
        return getattr(diffusers, family_cls.pipeline_name).from_pretrained(
            path, local_files_only=True, **{dtype_kwarg(): dtype}, **parts)
    except OSError as e:
        raise ModelNotAvailableError(advice(str(model_id_or_path),
                                            f"files are missing in {path} ({e})")) from e


def _subfolders(family_cls: Any, components: str) -> tuple[Any, ...]:
    """`resolve_checkpoint`'s (subfolders, optional, configs_only) for ``components``: no text
    encoder or tokenizer folder without them; only the configs of the other models (and
    optional experts) with "encoders"."""
    subs = list(family_cls.subfolders)
    optional = list(getattr(family_cls, "optional_subfolders", ()))
    if components == "no_encoders":
        return [s for s in subs if not is_text_component(s)], optional, []
    if components == "encoders":
        models = [s for s in subs if not is_text_component(s) and s != "scheduler"]
        return [s for s in subs if s not in models], [], models + optional
    return subs, optional, []


def _component(path: str, name: str, entry: list[str], dtype: torch.dtype,
               **kw: Any) -> nn.Module:
    """Pipeline component ``name`` of the folder ``path`` in ``dtype``; ``entry`` is its
    ``model_index.json`` entry [library, class] (``kw``: more ``from_pretrained`` arguments,
    e.g. ``quantization_config``)."""
    import importlib

    library, cls = entry
    return getattr(importlib.import_module(library), cls).from_pretrained(
        path, subfolder=name, local_files_only=True, **{dtype_kwarg(): dtype}, **kw)


def _meta_component(path: str, name: str, entry: list[str]) -> nn.Module | None:
    """Model component ``name`` of ``path`` built on the meta device from its config (a
    diffusers or transformers model class; ``entry`` its ``model_index.json`` [library,
    class]; no weights read); None when it is not a model (scheduler, processor: loaded as
    usual)."""
    import importlib

    library, cls_name = entry
    cls = getattr(importlib.import_module(library), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return None
    with torch.device("meta"):
        if library == "transformers":
            from transformers import AutoConfig

            return cls._from_config(AutoConfig.from_pretrained(path, subfolder=name))
        return cls.from_config(cls.load_config(path, subfolder=name))


def is_quantized(t: torch.Tensor) -> bool:
    """Whether ``t`` is a quantized tensor subclass (torchao's ``Int8Tensor``, ...), not a
    plain tensor or parameter."""
    return type(t.data) is not torch.Tensor


def load(
    family_cls: Any, model_id_or_path: str | os.PathLike, *,
    dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
    lora: LoraSpec | None = None, full_finetune: bool = False,
    master_dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None,
    quantize: str = "none", **kw: Any,
) -> DiffusersPolicy:
    """The policy of ``family_cls`` from a checkpoint (Hub id or local diffusers folder);
    fails fast with `ModelNotAvailableError` offline. Frozen parts load in ``dtype``; fully
    fine-tuned transformer weights in ``master_dtype``; ``quantize`` (int8, fp8; LoRA only):
    the frozen transformer base stored quantized (`quantization_config`). ``kw``: the
    family's options, `load_pipeline`'s ``components`` and
    `branchgrpo.models.diffusers_policy.compose`'s (gradient_checkpointing, offload_encoders,
    prompt_embeddings, ...)."""
    from .diffusers_policy import compose

    components = kw.pop("components", "all")
    if quantize != "none" and lora is None and components != "encoders":
        raise ValueError(f"quantize={quantize} freezes the base: train it with lora=LoraSpec()")
    pipe = load_pipeline(family_cls, model_id_or_path, dtype, cache_dir, quantize, components)
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
            if name not in persistent or not t.is_floating_point() or is_quantized(t):
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

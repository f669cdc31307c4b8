"""Loading reward weights from a local folder/file or a Hugging Face id, failing fast.

With ``HF_HUB_OFFLINE=1`` (or a local path) nothing is downloaded (``local_files_only``). When
weights are missing, :class:`WeightsNotFound` says what to download or which path to give,
instead of a long hang or a raw stack trace.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from branchgrpo.rewards.base import RewardError

T = TypeVar("T")


class WeightsNotFound(RewardError):
    """Reward weights are neither a local path nor available from the Hugging Face hub."""


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set to a true value."""
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hint(what: str, repo: str, filename: str | None = None) -> str:
    file_part = f" {filename}" if filename else ""
    why = " (HF_HUB_OFFLINE is set)" if offline() else ""
    return (
        f"cannot load {what} weights {repo!r}{file_part}: not a local path and not in the "
        f"Hugging Face cache{why}. Download them first (huggingface-cli download "
        f"{repo}{file_part}) or pass a local path."
    )


def load_pretrained(loader: Callable[..., T], id_or_path: str, what: str, **kwargs: Any) -> T:
    """``loader(id_or_path, local_files_only=..., **kwargs)`` (a transformers ``from_pretrained``)
    with a clear :class:`WeightsNotFound` on failure."""
    local = os.path.isdir(id_or_path)
    if not local and os.path.sep in id_or_path and id_or_path.startswith((".", "/", "~")):
        raise WeightsNotFound(f"{what}: local path {id_or_path!r} does not exist")
    try:
        return loader(id_or_path, local_files_only=local or offline(), **kwargs)
    except (OSError, ValueError) as e:
        msg = _hint(what, id_or_path)
        raise WeightsNotFound(f"{msg}\n  cause: {type(e).__name__}: {str(e)[:300]}") from None


def hub_file(spec: str, filename: str, what: str) -> str:
    """A local file: ``spec`` itself if it is a file, ``spec/filename`` if it is a folder, else
    ``filename`` from the Hugging Face repo ``spec`` (downloaded unless offline)."""
    if os.path.isfile(spec):
        return spec
    if os.path.isdir(spec):
        path = os.path.join(spec, filename)
        if not os.path.isfile(path):
            raise WeightsNotFound(f"{what}: {filename!r} not found in folder {spec!r}")
        return path
    if spec.startswith((".", "/", "~")):
        raise WeightsNotFound(f"{what}: local path {spec!r} does not exist")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(spec, filename, local_files_only=offline())
    except Exception as e:  # hub raises many types (offline, 404, connection)
        msg = _hint(what, spec, filename)
        raise WeightsNotFound(f"{msg}\n  cause: {type(e).__name__}: {str(e)[:300]}") from None


def read_json(id_or_path: str, filename: str) -> dict[str, Any] | None:
    """``filename`` (e.g. preprocessor_config.json) of a folder or hub repo, or None."""
    try:
        path = hub_file(id_or_path, filename, "config")
    except WeightsNotFound:
        return None
    with open(path) as f:
        return json.load(f)


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch checkpoint (``weights_only=True``, so no
    arbitrary pickle code runs); a ``{"state_dict": ...}`` wrapper and ``module.`` prefixes
    are removed."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd: Any = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise RewardError(f"{path!r} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> cuda if available else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` ... -> torch dtype; ``None`` -> fp32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]

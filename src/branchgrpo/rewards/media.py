"""Media tensors for rewards: frame flattening, uint8 quantisation, model preprocessing in torch,
and the JSON-safe encodings (base64 PNG or raw array) used by the reward server and client.

Images are ``[B, C, H, W]`` and videos ``[B, F, C, H, W]``, float in [0, 1].
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP normalisation, also used by open_clip ViT-H-14, PickScore, HPS and ImageReward."""

_DTYPES = {"float32": np.float32, "uint8": np.uint8}


def flatten_frames(media: Tensor) -> tuple[Tensor, int]:
    """``[B, C, H, W] -> ([B, C, H, W], 1)`` and ``[B, F, C, H, W] -> ([B*F, C, H, W], F)``."""
    if media.dim() == 4:
        return media, 1
    if media.dim() == 5:
        b, f = media.shape[:2]
        return media.reshape(b * f, *media.shape[2:]), f
    raise ValueError(
        f"media must be images [B, C, H, W] or videos [B, F, C, H, W], got {tuple(media.shape)}"
    )


def mean_over_frames(scores: Tensor, frames: int) -> Tensor:
    """Per-frame scores ``[B*F]`` -> per-video mean ``[B]`` (identity when ``frames == 1``)."""
    return scores.reshape(-1, frames).mean(dim=1)


def to_uint8(images: Tensor) -> np.ndarray:
    """``[N, C, H, W]`` float in [0, 1] -> uint8 numpy ``[N, H, W, C]``, rounding to nearest."""
    x = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def preprocess(
    images: Tensor,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    crop: bool = True,
) -> Tensor:
    """CLIP-style preprocessing in torch, batched: bicubic resize of the shorter side to
    ``size`` (antialiased), centre crop ``size x size``, normalise.

    images ``[N, 3, H, W]`` in [0, 1] -> ``[N, 3, size, size]`` (same dtype/device).
    With ``crop=False`` the image is resized straight to ``size x size``.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    dtype = images.dtype
    x = images.float()
    h, w = x.shape[-2:]
    if crop:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    else:
        nh, nw = size, size
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0, 1)
    if crop:
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return ((x - m) / s).to(dtype)


# --- transport encodings (no pickle) ---------------------------------------------------------


def encode_png(media: Tensor) -> dict[str, Any]:
    """``{"format": "png", "data": [b64 PNG per image/frame], "frames": F | None}``.

    Lossy only by uint8 quantisation (:func:`to_uint8`)."""
    from PIL import Image

    images, frames = flatten_frames(media)
    data = []
    for arr in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
        data.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return {"format": "png", "data": data, "frames": frames if media.dim() == 5 else None}


def encode_array(media: Tensor, dtype: str = "uint8") -> dict[str, Any]:
    """``{"format": "array", "data": {"dtype", "shape", "b64"}}``: raw C-order bytes.

    ``dtype="uint8"`` quantises like :func:`to_uint8` (values ``round(255 x)``, channel-first);
    ``"float32"`` is exact."""
    if dtype == "uint8":
        arr = (media.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    elif dtype == "float32":
        arr = media.detach().float().cpu().numpy()
    else:
        raise ValueError(f"array dtype must be 'uint8' or 'float32', got {dtype!r}")
    b64 = base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii")
    return {"format": "array", "data": {"dtype": dtype, "shape": list(arr.shape), "b64": b64}}


def encode_media(media: Tensor, fmt: str = "array", dtype: str = "uint8") -> dict[str, Any]:
    """Encode media for JSON: ``fmt`` is ``"array"`` (with ``dtype``) or ``"png"``."""
    if fmt == "png":
        return encode_png(media)
    if fmt == "array":
        return encode_array(media, dtype)
    raise ValueError(f"media format must be 'png' or 'array', got {fmt!r}")


def decode_media(obj: Any) -> Tensor:
    """Inverse of :func:`encode_media`: -> float32 ``[B, C, H, W]`` or ``[B, F, C, H, W]`` in
    [0, 1]. Raises ``ValueError`` with a readable message on any malformed input."""
    if not isinstance(obj, dict) or "format" not in obj or "data" not in obj:
        raise ValueError('media must be an object {"format": "png"|"array", "data": ...}')
    fmt, data = obj["format"], obj["data"]
    if fmt == "array":
        if not isinstance(data, dict) or not {"dtype", "shape", "b64"} <= set(data):
            raise ValueError('array media data must be {"dtype", "shape", "b64"}')
        if data["dtype"] not in _DTYPES:
            raise ValueError(f"array dtype must be one of {sorted(_DTYPES)}, got {data['dtype']!r}")
        shape = data["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) not in (4, 5)
            or not all(isinstance(d, int) and d > 0 for d in shape)
        ):
            raise ValueError(f"array shape must be 4 or 5 positive ints, got {shape!r}")
        try:
            raw = base64.b64decode(data["b64"], validate=True)
        except (ValueError, TypeError) as e:
            raise ValueError(f"array b64 is not valid base64: {e}") from e
        np_dtype = _DTYPES[data["dtype"]]
        if len(raw) != int(np.prod(shape)) * np.dtype(np_dtype).itemsize:
            raise ValueError(f"array has {len(raw)} bytes, which does not match shape {shape}")
        if shape[-3] not in (1, 3):
            raise ValueError(f"array media must be channel-first with 1 or 3 channels: {shape}")
        arr = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
        x = torch.from_numpy(arr.copy())
        return x.float() / 255 if np_dtype is np.uint8 else x.float()
    if fmt == "png":
        return _decode_png(data, obj.get("frames"))
    raise ValueError(f"media format must be 'png' or 'array', got {fmt!r}")


def _decode_png(data: Any, frames: Any) -> Tensor:
    from PIL import Image

    if not isinstance(data, list) or not data or not all(isinstance(d, str) for d in data):
        raise ValueError("png media data must be a non-empty list of base64 strings")
    images = []
    for i, d in enumerate(data):
        try:
            img = Image.open(io.BytesIO(base64.b64decode(d, validate=True)))
            img = img.convert("RGB") if img.mode not in ("RGB", "L") else img
            arr = np.asarray(img)
        except Exception as e:  # PIL raises many types on bad data
            raise ValueError(f"png image {i} cannot be decoded: {e}") from e
        arr = arr[..., None] if arr.ndim == 2 else arr
        images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    if len({tuple(t.shape) for t in images}) != 1:
        raise ValueError("all png images must have the same size and mode")
    x = torch.stack(images).float() / 255
    if frames is None:
        return x
    if not isinstance(frames, int) or frames < 1 or len(images) % frames:
        raise ValueError(f"frames={frames!r} does not divide {len(images)} png images")
    return x.reshape(len(images) // frames, frames, *x.shape[1:])

"""Media tensors for rewards: frame flattening, uint8 quantisation, model preprocessing in torch,
and the JSON-safe encodings (base64 PNG or raw array) used by the reward server and client.

Images are ``[B, C, H, W]`` and videos ``[B, F, C, H, W]``, float in [0, 1].
"""

from __future__ import annotations

import base64
import io
import math
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


def rgb_float(images: Tensor) -> tuple[Tensor, torch.dtype]:
    """Images ``[N, 3, H, W]`` (or grey ``[N, 1, H, W]``, expanded to RGB) as fp32, and their
    original dtype (preprocessing returns in it). Raises ValueError for any other shape."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images.float(), images.dtype


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
    x, dtype = rgb_float(images)
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


class MediaTooLarge(ValueError):
    """Encoded media that would decode to more pixels than allowed (the server answers 413)."""


def _is_count(x: Any) -> bool:
    """A positive int that is not a bool (JSON ``true`` is a Python int)."""
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _check_pixels(pixels: int, max_pixels: int | None, what: str) -> None:
    if max_pixels is not None and pixels > max_pixels:
        raise MediaTooLarge(
            f"{what} would decode to {pixels} pixels, over the limit of {max_pixels} "
            "(send fewer or smaller images per request, or raise the server's --max-pixels)"
        )


def decode_media(obj: Any, max_pixels: int | None = None) -> Tensor:
    """Inverse of :func:`encode_media`: -> float32 ``[B, C, H, W]`` or ``[B, F, C, H, W]`` in
    [0, 1]. Raises ``ValueError`` with a readable message on any malformed input.

    ``max_pixels`` bounds the decoded pixels (images x frames x H x W) of the whole request. It is
    checked from the declared array shape or the PNG headers *before* anything is decoded, and
    exceeding it raises :class:`MediaTooLarge` (a ``ValueError``)."""
    if not isinstance(obj, dict) or "format" not in obj or "data" not in obj:
        raise ValueError('media must be an object {"format": "png"|"array", "data": ...}')
    fmt, data = obj["format"], obj["data"]
    if fmt == "array":
        return _decode_array(data, max_pixels)
    if fmt == "png":
        return _decode_png(data, obj.get("frames"), max_pixels)
    raise ValueError(f"media format must be 'png' or 'array', got {fmt!r}")


def _decode_array(data: Any, max_pixels: int | None) -> Tensor:
    if not isinstance(data, dict) or not {"dtype", "shape", "b64"} <= set(data):
        raise ValueError('array media data must be {"dtype", "shape", "b64"}')
    if data["dtype"] not in _DTYPES:
        raise ValueError(f"array dtype must be one of {sorted(_DTYPES)}, got {data['dtype']!r}")
    shape = data["shape"]
    if not isinstance(shape, list) or len(shape) not in (4, 5) or not all(map(_is_count, shape)):
        raise ValueError(f"array shape must be 4 or 5 positive ints, got {shape!r}")
    if shape[-3] not in (1, 3):
        raise ValueError(f"array media must be channel-first with 1 or 3 channels: {shape}")
    _check_pixels(math.prod(shape) // shape[-3], max_pixels, f"array media of shape {shape}")
    if not isinstance(data["b64"], str):
        raise ValueError("array b64 must be a base64 string")
    try:
        raw = base64.b64decode(data["b64"], validate=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f"array b64 is not valid base64: {e}") from e
    np_dtype = _DTYPES[data["dtype"]]
    if len(raw) != math.prod(shape) * np.dtype(np_dtype).itemsize:
        raise ValueError(f"array has {len(raw)} bytes, which does not match shape {shape}")
    x = torch.from_numpy(np.frombuffer(raw, dtype=np_dtype).reshape(shape).copy())
    return x.float() / 255 if np_dtype is np.uint8 else x.float()


def _decode_png(data: Any, frames: Any, max_pixels: int | None) -> Tensor:
    from PIL import Image

    if not isinstance(data, list) or not data or not all(isinstance(d, str) for d in data):
        raise ValueError("png media data must be a non-empty list of base64 strings")
    if frames is not None and (not _is_count(frames) or len(data) % frames):
        raise ValueError(f"frames={frames!r} does not divide {len(data)} png images")
    opened, pixels = [], 0
    for i, d in enumerate(data):  # headers only: Image.open does not decode the pixels
        try:
            img = Image.open(io.BytesIO(base64.b64decode(d, validate=True)))
        except Image.DecompressionBombError as e:
            raise MediaTooLarge(f"png image {i}: {e}") from e
        except Exception as e:  # PIL raises many types on bad data
            raise ValueError(f"png image {i} cannot be decoded: {e}") from e
        pixels += img.size[0] * img.size[1]
        _check_pixels(pixels, max_pixels, f"png images 0..{i} ({img.size[0]}x{img.size[1]} last)")
        opened.append(img)
    images = []
    for i, img in enumerate(opened):
        try:
            img = img.convert("RGB") if img.mode not in ("RGB", "L") else img
            arr = np.asarray(img)
        except Exception as e:  # truncated or corrupt pixel data
            raise ValueError(f"png image {i} cannot be decoded: {e}") from e
        arr = arr[..., None] if arr.ndim == 2 else arr
        images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    if len({tuple(t.shape) for t in images}) != 1:
        raise ValueError("all png images must have the same size and mode")
    x = torch.stack(images).float() / 255
    if frames is None:
        return x
    return x.reshape(len(images) // frames, frames, *x.shape[1:])

"""OCR text-rendering reward (Flow-GRPO, arXiv 2505.05470, visual text rendering task).

The target is the text between the first pair of double quotes in the prompt (the whole prompt
if it has none). Both strings are lower-cased with spaces removed; if the target occurs in the
recognised text the distance is 0, else the Levenshtein distance clamped to the target length:
``r = 1 - min(d, |target|) / |target|`` in [0, 1] (Flow-GRPO ``ocr.py``; it uses PaddleOCR).

Engines (offline, CPU): ``"rapidocr"`` (PyPI ``rapidocr-onnxruntime``, models bundled in the
wheel; default) or ``"tesseract"`` (``apt-get install -y tesseract-ocr`` + PyPI
``pytesseract``). Videos: the mean over frames.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from branchgrpo.rewards.base import REWARDS, RewardError
from branchgrpo.rewards.media import flatten_frames, to_uint8


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def quoted_text(prompt: str) -> str:
    """``'a sign saying "Hello World"'`` -> ``'Hello World'`` (the whole prompt if unquoted)."""
    parts = prompt.split('"')
    return parts[1] if len(parts) >= 3 else prompt


def text_match(recognised: str, target: str) -> float:
    """``1 - min(d, |t|) / |t|`` on lower-cased, space-free strings; 0 for an empty target."""
    rec = recognised.replace(" ", "").lower()
    tgt = target.replace(" ", "").lower()
    if not tgt:
        return 0.0
    d = 0 if tgt in rec else min(levenshtein(rec, tgt), len(tgt))
    return 1.0 - d / len(tgt)


def _rapidocr() -> Callable[[np.ndarray], str]:
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as e:
        raise RewardError(
            "ocr reward: engine 'rapidocr' is not installed: pip install rapidocr-onnxruntime"
        ) from e
    engine = RapidOCR()

    def read(img: np.ndarray) -> str:
        result, _ = engine(img)
        return "".join(r[1] for r in (result or []) if float(r[2]) > 0)

    return read


def _tesseract() -> Callable[[np.ndarray], str]:
    try:
        import pytesseract

        pytesseract.get_tesseract_version()
    except Exception as e:  # ImportError or TesseractNotFoundError
        raise RewardError(
            "ocr reward: engine 'tesseract' is not available: apt-get install -y tesseract-ocr "
            f"&& pip install pytesseract ({type(e).__name__}: {e})"
        ) from e

    def read(img: np.ndarray) -> str:
        return pytesseract.image_to_string(img).replace("\n", " ").strip()

    return read


ENGINES: dict[str, Callable[[], Callable[[np.ndarray], str]]] = {
    "rapidocr": _rapidocr,
    "tesseract": _tesseract,
}


class OcrReward:
    """media ``[B, C, H, W]`` / ``[B, F, C, H, W]`` in [0, 1], prompts -> fp32 ``[B]`` in [0, 1].

    ``read``: uint8 ``[H, W, 3]`` -> recognised text."""

    groupwise = False
    name = "ocr"

    def __init__(self, read: Callable[[np.ndarray], str]) -> None:
        self.read = read

    def __call__(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        images, frames = flatten_frames(media)
        arrays = to_uint8(images)
        scores = []
        for i, arr in enumerate(arrays):
            target = quoted_text(prompts[i // frames])
            try:
                text = self.read(arr if arr.shape[-1] == 3 else np.repeat(arr, 3, axis=-1))
            except Exception as e:  # as Flow-GRPO: a failed read is the maximum penalty
                warnings.warn(f"ocr reward: engine failed on sample {i}: {e}", stacklevel=2)
                text = ""
            scores.append(text_match(text, target))
        return torch.tensor(scores, dtype=torch.float32).reshape(-1, frames).mean(1)


@REWARDS.register("ocr")
def ocr(engine: str = "rapidocr", **_: object) -> OcrReward:
    """OCR reward with ``engine`` in ``{"rapidocr", "tesseract"}`` (runs on the CPU)."""
    if engine not in ENGINES:
        raise ValueError(f"ocr: unknown engine {engine!r}; choose from {sorted(ENGINES)}")
    return OcrReward(ENGINES[engine]())

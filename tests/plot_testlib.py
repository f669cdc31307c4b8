"""Reading the benches' PNG plots back: how many pixels of a curve's colour a figure holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CYCLE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")  # matplotlib's first default colours


def colour_pixels(png: Path, colour: str, tol: int = 45) -> int:
    """Pixels of ``png`` within ``tol`` (per channel) of ``colour`` (``#rrggbb``; the loose
    default also counts a curve seen through another curve's translucent band)."""
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img - rgb).max(-1) <= tol).sum())


LEGEND_SWATCH = 60  # pixels of a legend entry's line; a drawn curve has far more


def curve_pixels(png: Path, n: int) -> list[int]:
    """Pixel counts of the first ``n`` default colours of ``png`` (the first ``n`` curves)."""
    return [colour_pixels(png, c) for c in CYCLE[:n]]

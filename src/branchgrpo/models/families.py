"""The model family registry: one line per family, ``model.kind`` -> the module that builds it.

A family module exposes ``build(options: ModelOptions, device) -> Policy``
(`branchgrpo.models.factory.ModelOptions`: plain values, no config object). A diffusers family
module also names its `branchgrpo.models.family.Family` class ``FAMILY`` (it builds with
`branchgrpo.models.loading.load`); the recipe layer (`branchgrpo.spec`, ``branchgrpo plan``)
reads the family's class-level facts (pipeline, released config, schedule rule) from it. The
embedded ones (tiny, analytic) are `Policy` modules of their own, without ``FAMILY``. Modules
are imported on first use, so listing a family costs nothing. See ``models/README.md`` for
adding one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .family import Family

FAMILIES: dict[str, str] = {
    "tiny": ".tiny",          # the embedded default: a tiny FLUX transformer in pixel space
    "analytic": ".analytic",  # closed-form Gaussian flow (tests, benchmarks)
    "flux": ".flux",          # FLUX.1
    "sd3": ".sd3",            # Stable Diffusion 3 / 3.5
    "wan": ".wan",            # Wan2.1 text-to-video
    "qwenimage": ".qwenimage",  # Qwen-Image text-to-image
    "wan22": ".wan22",        # Wan2.2 text-to-video: TI2V-5B, T2V-A14B (two experts)
    "wan_i2v": ".wan_i2v",    # Wan image-to-video: Wan2.2-I2V-A14B, Wan2.1-I2V-14B
    "flux2": ".flux2",        # FLUX.2 (dev)
    "zimage": ".zimage",      # Z-Image (base and Turbo)
}
"""``kind`` -> family module, relative to this package."""


def family_module(kind: str) -> Any:
    """The module of family ``kind`` (ValueError naming the registered ones otherwise)."""
    import importlib

    if kind not in FAMILIES:
        raise ValueError(f"unknown model kind {kind!r}; registered: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[kind], __package__)


def family_class(kind: str) -> type[Family] | None:
    """The `branchgrpo.models.family.Family` class of diffusers family ``kind`` (its module's
    ``FAMILY``), or None for an embedded family (tiny, analytic)."""
    return getattr(family_module(kind), "FAMILY", None)


def module_of(policy: Any) -> nn.Module:
    """The module whose parameters a checkpoint holds: the policy itself when it is a module
    (tiny, analytic), else its transformer (diffusers families)."""
    return policy if isinstance(policy, nn.Module) else policy.transformer

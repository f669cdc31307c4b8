"""The `Family` protocol: what one diffusers model family (FLUX.1, SD3.5, Wan2.1, ...) provides,
and the helpers its hooks share. The generic `branchgrpo.models.diffusers_policy.DiffusersPolicy`
composes a family with what every family shares (prompt cache, encoder offload, freezing, bf16
autocast); `branchgrpo.models.lora.setup_finetune` adds LoRA / full fine-tuning. There is no
base class: a family is a plain (data)class with the members below, in one file, plus one line
in `branchgrpo.models.families.FAMILIES` (see ``models/README.md``).

Shapes: B prompts, N latent rows, ``*L`` = ``latent_shape``. Conventions
(docs/algorithms.md §1.1): rectified flow, ``x_sigma = (1 - sigma) x0 + sigma eps``, velocity
``v = eps - x0``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .base import Cond


class Parts(Protocol):
    """What a family's hooks see of the policy that composes them (`DiffusersPolicy`).

    ``transformer`` is read at every call: distributed training replaces it by its DDP/FSDP
    wrapper. ``pipe`` is the diffusers pipeline holding the frozen text encoders and VAE, or
    ``None`` for an embedding-only benchmark policy. ``model_dtype`` is the dtype of the
    transformer's base weights (bf16 when loaded so, fp32 master weights in full fine-tuning)."""

    transformer: nn.Module
    pipe: Any | None
    device: torch.device
    model_dtype: torch.dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast for the transformer forward when the compute dtype asks for it."""
        ...

    def model_input(self, t: Tensor) -> Tensor:
        """``t`` on ``device`` in ``model_dtype`` (a floating transformer input)."""
        ...


@runtime_checkable
class Family(Protocol):
    """One model family, configured for a run (size, guidance, schedule options).

    Class-level facts (``ClassVar``):

    - ``pipeline_name``: the diffusers pipeline class name (``"FluxPipeline"``); loading
      (`branchgrpo.models.loading.load_pipeline`) and LoRA export/import
      (`branchgrpo.models.lora.save_lora`) use it.
    - ``subfolders``: the checkpoint subfolders to resolve/download (``"transformer"``, ...).
    - ``lora_targets``: default LoRA target module names inside the transformer (used when
      ``LoraSpec.target_modules`` is None).
    - ``fp32_modules``: pipeline components loaded in fp32 whatever the run's dtype (Wan's
      ``"vae"``). Transformer submodules kept in fp32 are the diffusers class's own
      ``_keep_in_fp32_modules`` (`branchgrpo.models.loading.keeps_fp32`), not listed here.

    Recipe facts (``ClassVar``), read by `branchgrpo.spec` and ``branchgrpo plan`` without
    loading weights:

    - ``transformer_class``: the diffusers transformer class name (its
      ``_keep_in_fp32_modules`` are reported by ``branchgrpo plan``).
    - ``released_config``: the released checkpoint's config values that decide the schedule,
      used when no config file can be read: ``{"scheduler": {...}, "transformer": {...},
      "vae_scale_factor": f}``. `branchgrpo.memory` (``branchgrpo plan``'s memory and cost)
      builds ``"transformer"`` on the meta device, so give the full released config, and
      reads the optional keys ``"params"`` (``{component: parameter count}`` of the text
      encoders and ``"vae"``, used when their config files are not on disk),
      ``"text_tokens"`` (the text sequence the transformer sees; default: the family's
      ``max_sequence_length``), ``"token_patch"`` (latent pixels per token side when the
      transformer's ``patch_size`` does not say it: FLUX's 2x2 packing) and
      ``"frame_period"`` (a video VAE's temporal factor, default 4); a family of several
      checkpoints puts them in each ``released_configs`` entry.
    - ``pipeline_grid(scheduler, steps, height, width, vae_scale_factor, shift, dynamic)``
      (classmethod): the `Grid` the family's diffusers pipeline runs for ``steps`` steps with
      the checkpoint's scheduler config (FLUX: FluxPipeline's linspace(1, 1/T, T) with a
      dynamic mu of its image tokens; SD3/Wan: `scheduler_grid`, the scheduler's own grid).
      ``shift`` overrides the checkpoint's static shift; ``dynamic`` asks for the dynamic-mu
      grid (``rollout.schedule=flux_dynamic``). ValueError with the reason otherwise.
    - ``timestep_scale``, ``timestep_sigma_max``: with the instance's ``quantize_timestep``
      they decide the transformer's timestep, `family_timestep` (1 for FLUX's sigma, 1000
      for SD3/Wan; Wan's UniPC grid starts at ``UNIPC_SIGMA_MAX``).
    - ``guidance_kind``: ``"embedding"`` (a distilled guidance embedding, FLUX.1-dev),
      ``"cfg"`` (classifier-free guidance) or ``"true_cfg"`` (Qwen-Image: CFG with a negative
      prompt and the pipeline's norm rescaling, on only when the scale is > 1).
    - ``video``: decoded media are videos (``num_frames`` is an option of ``of``).
    - ``schedule_rule(plan)`` (classmethod): (schedule kind, quantize_timestep) of plan name
      ``plan`` when the config leaves them null (`branchgrpo.spec.schedule_rule`).

    Construction: ``of(pipe, transformer=None, **options)`` reads the geometry from the pipeline
    (VAE factors, channels) and validates the options; ``transformer`` defaults to
    ``pipe.transformer`` (given alone, with ``pipe=None``, for benchmark policies).

    Instance members:

    - ``latent_shape``: per-sample latent shape ``L`` (no batch dim).
    - ``token_period``: pixels per token side in decoded media (VAE factor x patch/packing).
    - ``encode(parts, prompts)``: embeddings ``{name: [b, ...]}`` of b distinct prompts, no
      grad (the policy caches them per prompt and stacks rows into a `Cond`).
    - ``velocity(parts, x, sigma, cond)``: guided ``v`` [N, *L] fp32 at latents x [N, *L],
      sigma [N] in [0, 1], conditioning rows [N, ...] aligned with x (CFG happens inside: see
      `classifier_free`).
    - ``decode(parts, x0)``: media in [0, 1] from clean latents x0 [N, *L]: images
      [N, 3, H, W], videos [N, F, 3, H, W]; fp32.
    - ``quantize_timestep``: floor the timestep as the method's published code does (set by
      the recipe from `branchgrpo.spec.resolve`).
    - ``default_schedule()``: kwargs of `branchgrpo.engine.schedule.make_sigmas` (add num_steps).
    """

    pipeline_name: ClassVar[str]
    subfolders: ClassVar[tuple[str, ...]]
    lora_targets: ClassVar[tuple[str, ...]]
    fp32_modules: ClassVar[tuple[str, ...]]
    transformer_class: ClassVar[str]
    released_config: ClassVar[dict[str, Any]]
    timestep_scale: ClassVar[float]
    timestep_sigma_max: ClassVar[float]
    guidance_kind: ClassVar[str]
    video: ClassVar[bool]
    latent_shape: tuple[int, ...]
    token_period: int
    quantize_timestep: bool

    @classmethod
    def schedule_rule(cls, plan: str) -> tuple[str, bool]: ...

    @classmethod
    def pipeline_grid(cls, scheduler: dict[str, Any], steps: int, height: int, width: int,
                      vae_scale_factor: int, shift: float | None, dynamic: bool) -> Grid: ...

    def encode(self, parts: Parts, prompts: list[str]) -> dict[str, Tensor]: ...

    def velocity(self, parts: Parts, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor: ...

    def decode(self, parts: Parts, x0: Tensor) -> Tensor: ...

    def default_schedule(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Grid:
    """A pipeline's sigma grid: ``sigmas`` [T + 1] (ending in 0), the static ``shift`` or the
    dynamic ``mu`` it used (the other None), and the image token count ``image_seq_len`` that
    decided ``mu`` (None for a static grid)."""

    sigmas: Tensor
    shift: float | None = None
    mu: float | None = None
    image_seq_len: int | None = None


@dataclass(frozen=True)
class Distilled:
    """A distilled few-step checkpoint, as a family's optional classmethod
    ``distilled(scheduler, transformer) -> Distilled | None`` recognises it from its config
    files (FLUX.1-schnell: ``guidance_embeds`` false; Z-Image-Turbo: its scheduler's shift).
    ``steps``: the step count of the sampler it was distilled for (the default
    ``rollout.num_steps`` and its most); ``guidance_free``: distilled to sample without CFG;
    ``evidence``: the config value that says so (for messages). docs/algorithms.md §1.10;
    `branchgrpo.preflight` refuses what such a model cannot do."""

    name: str
    steps: int
    guidance_free: bool
    evidence: str


def distilled_of(family_cls: Any, scheduler: dict[str, Any], transformer: dict[str, Any],
                 ) -> Distilled | None:
    """The family's `Distilled` verdict on these config values (None: not distilled, or the
    family has no ``distilled`` hook)."""
    hook = getattr(family_cls, "distilled", None)
    return hook(scheduler, transformer) if hook is not None else None


# ---- helpers for family hooks -----------------------------------------------------------
def scheduler_grid(scheduler: dict[str, Any], steps: int, shift: float | None,
                   dynamic: bool = False) -> Grid:
    """The grid a pipeline gets from ``scheduler.set_timesteps(steps)`` (SD3, Wan): UniPC's
    ``use_flow_sigmas`` grid at ``flow_shift``, or FlowMatchEulerDiscreteScheduler's static
    ``shift``; ``shift`` (not None) overrides the config's. ValueError for any other scheduler
    config and for ``dynamic`` (FLUX's grid)."""
    from ..engine import schedule as sch

    if dynamic:
        raise ValueError("rollout.schedule=flux_dynamic is FLUX's schedule, not this "
                         "family's; use diffusers or shifted")
    cls = scheduler.get("_class_name", "")
    n_train = int(scheduler.get("num_train_timesteps", 1000))
    if cls == "UniPCMultistepScheduler" and scheduler.get("use_flow_sigmas"):
        s = shift if shift is not None else float(scheduler.get("flow_shift", 1.0))
        return Grid(sch.flow_sigmas(steps, s, n_train), shift=s)
    if cls == "FlowMatchEulerDiscreteScheduler" and not scheduler.get("use_dynamic_shifting"):
        s = shift if shift is not None else float(scheduler.get("shift", 1.0))
        return Grid(sch.diffusers_static(steps, s, n_train), shift=s)
    raise ValueError(f"scheduler {cls or '?'} (dynamic shifting "
                     f"{bool(scheduler.get('use_dynamic_shifting'))}) has no diffusers grid "
                     "here; set rollout.schedule=shifted")


def scheduler_mu(scheduler: dict[str, Any], image_seq_len: int) -> float:
    """The dynamic shift mu a pipeline's ``calculate_shift`` gives ``image_seq_len`` tokens
    with the scheduler config's ``base/max_image_seq_len`` and ``base/max_shift`` (FLUX.1's
    defaults where a key is missing)."""
    from ..engine import schedule as sch

    return sch.flux_mu(image_seq_len, scheduler.get("base_image_seq_len", 256),
                       scheduler.get("max_image_seq_len", 4096),
                       scheduler.get("base_shift", 0.5), scheduler.get("max_shift", 1.15))


def image_tokens(height: int, width: int, factor: int) -> int:
    """Image tokens the transformer sees at ``height`` x ``width``: (H / factor)(W / factor)
    (``factor`` = VAE factor x patch or packing side); ValueError when they do not divide."""
    if height % factor or width % factor:
        raise ValueError(f"model.height and model.width must be multiples of {factor} for "
                         f"this checkpoint, got {height}x{width}")
    return (height // factor) * (width // factor)


def family_timestep(family: Family, sigma: Tensor) -> Tensor:
    """The transformer's timestep [N] fp32 from sigma [N]: `transformer_timesteps` of the
    family's ``timestep_scale``, ``quantize_timestep`` and ``timestep_sigma_max`` (FLUX: sigma,
    or int(1000 sigma) / 1000; SD3: 1000 sigma; Wan: 1000 sigma, or the int64 of UniPC's grid
    that WanPipeline passes, 999 at sigma 1)."""
    from ..engine.schedule import transformer_timesteps

    return transformer_timesteps(sigma, family.timestep_scale, family.quantize_timestep,
                                 family.timestep_sigma_max)


def default_guidance(family: type) -> float:
    """The ``guidance_scale`` a family dataclass uses when the config leaves
    ``model.guidance`` null (its field default: the pipeline's, or the published recipe's)."""
    import dataclasses

    return next(float(f.default) for f in dataclasses.fields(family)
                if f.name == "guidance_scale")


def classifier_free(
    forward: Callable[..., Tensor], x: Tensor, t: Tensor, cond: Sequence[Tensor],
    uncond: Sequence[Tensor] | None, *, scale: float | Tensor, detach_uncond: bool,
    uncond_first: bool,
) -> Tensor:
    """Guided velocity ``u + scale (c - u)`` [N, *L] fp32 with the conditional and
    unconditional rows in one batched forward ``forward(x [2N, *L], t [2N], *embeddings)``.

    ``cond`` / ``uncond``: the embedding tensors [N, ...] passed positionally; ``uncond`` None
    turns CFG off (one forward of the N rows). ``uncond_first``: the batch order the family's
    pipeline uses ([uncond; cond] for SD3, [cond; uncond] for Wan), so the forward sees the same
    batch. ``detach_uncond``: no gradient through the unconditional half (Flow-GRPO's Jul-2025
    code). ``scale``: one float, or per row [N, 1, ...] (Wan2.2 A14B's two experts)."""
    if uncond is None:
        return forward(x, t, *cond).float()
    pairs = [(u, c) if uncond_first else (c, u) for c, u in zip(cond, uncond, strict=True)]
    out = forward(torch.cat([x, x]), torch.cat([t, t]),
                  *(torch.cat(list(p)) for p in pairs)).float()
    first, second = out.chunk(2)
    u, c = (first, second) if uncond_first else (second, first)
    if detach_uncond:
        u = u.detach()
    return u + scale * (c - u)


def decode_vae(vae: nn.Module, latents: Tensor, batch: int) -> Tensor:
    """``vae.decode`` of VAE-space latents [N, C, ...] in chunks of ``batch``, mapped from
    [-1, 1] to [0, 1] (clamped) in fp32."""
    out = [vae.decode(c.to(vae.dtype), return_dict=False)[0].float()
           for c in latents.split(batch)]
    return (torch.cat(out) * 0.5 + 0.5).clamp(0, 1)


def prompt_seed(prompt: str) -> int:
    """A stable per-prompt seed (for embedding-free benchmark policies)."""
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)


def plan_kwargs(schedule: dict[str, Any]) -> dict[str, Any]:
    """`Family.default_schedule` (make_sigmas kwargs) as keyword arguments of
    `branchgrpo.engine.plans.build_plan` (``kind`` is called ``schedule`` there)."""
    return {("schedule" if k == "kind" else k): v for k, v in schedule.items()}

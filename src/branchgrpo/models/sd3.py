"""Stable Diffusion 3 / 3.5 as a model family (`SD3Family`, composed into a `DiffusersPolicy`):
SD3Transformer2DModel on latents [C, H, W], two CLIP encoders + T5 (joint sequence and pooled
embeddings), classifier-free guidance with the unconditional and conditional rows in one batched
forward (as StableDiffusion3Pipeline and Flow-GRPO do; the pipeline's default scale 7.0,
Flow-GRPO's recipe 4.5), VAE with scaling/shift
factors.

The transformer gets ``timestep = 1000 sigma`` (the scheduler's timesteps). The schedule is the
scheduler config's static shift (3.0 for SD3.5) applied to linspace(1, 0, T + 1).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .base import Cond
from .diffusers_policy import DiffusersPolicy, compose
from .family import (
    Grid,
    Parts,
    classifier_free,
    decode_vae,
    family_timestep,
    scheduler_grid,
)
from .loading import load
from .lora import JOINT_ATTENTION_TARGETS
from .testing import (
    tiny_clip_encoder,
    tiny_clip_tokenizer,
    tiny_image_vae,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
)

if TYPE_CHECKING:
    from .factory import ModelOptions

SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"
SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
              "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")
RELEASED_CONFIG: dict[str, Any] = {
    "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
                  "num_train_timesteps": 1000},
    "transformer": {  # SD3.5-medium transformer/config.json (testing.REPLICAS["sd3"])
        "_class_name": "SD3Transformer2DModel", "attention_head_dim": 64,
        "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096,
        "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2,
        "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
        "sample_size": 128, "dual_attention_layers": list(range(13))},
    "vae_scale_factor": 8,
    # branchgrpo.memory: 77 CLIP + 256 T5 tokens; parameters counted on the meta device from
    # the released text_encoder{,_2,_3}/ and vae/ config.json (CLIP-L and CLIP-G with
    # projection 123.65M / 694.66M, T5-XXL encoder 4.762B, AutoencoderKL 83.8M)
    "text_tokens": 333,
    "params": {"text_encoder": 123_650_304, "text_encoder_2": 694_659_840,
               "text_encoder_3": 4_762_310_656, "vae": 83_819_683}}
"""SD3.5-medium's config values that decide the schedule and size the model
(`SD3Family.released_config`)."""


@dataclass
class SD3Family:
    """SD3.5 as a `branchgrpo.models.family.Family`. ``guidance_scale`` <= 1 turns CFG off (one
    forward per row); ``negative_prompt`` is encoded once per row beside the prompt;
    ``shift`` defaults to the scheduler config's; ``quantize_timestep`` floors 1000 sigma;
    ``detach_uncond``: see `classifier_free`."""

    pipeline_name: ClassVar[str] = "StableDiffusion3Pipeline"
    subfolders: ClassVar[tuple[str, ...]] = SUBFOLDERS
    lora_targets: ClassVar[tuple[str, ...]] = JOINT_ATTENTION_TARGETS
    fp32_modules: ClassVar[tuple[str, ...]] = ()
    transformer_class: ClassVar[str] = "SD3Transformer2DModel"
    released_config: ClassVar[dict[str, Any]] = RELEASED_CONFIG
    timestep_scale: ClassVar[float] = 1000.0
    timestep_sigma_max: ClassVar[float] = 1.0
    guidance_kind: ClassVar[str] = "cfg"
    video: ClassVar[bool] = False
    latent_shape: tuple[int, ...]
    token_period: int
    shift: float
    height: int = 512
    width: int = 512
    guidance_scale: float = 7.0
    negative_prompt: str = ""
    max_sequence_length: int = 256
    detach_uncond: bool = False
    quantize_timestep: bool = False
    decode_batch: int = 4

    @classmethod
    def of(cls, pipe: Any, transformer: nn.Module | None = None, *, height: int = 512,
           width: int = 512, shift: float | None = None, **options: Any) -> SD3Family:
        """The family for ``pipe`` at ``height`` x ``width``; ``options``: the fields above."""
        tr = transformer if transformer is not None else pipe.transformer
        f = pipe.vae_scale_factor
        mult = f * tr.config.patch_size
        if height % mult or width % mult:
            raise ValueError(f"height and width must be multiples of {mult} for this SD3 "
                             f"(VAE factor {f} x patch {tr.config.patch_size}), "
                             f"got {height}x{width}")
        shift = shift if shift is not None else pipe.scheduler.config.get("shift", 3.0)
        return cls(latent_shape=(tr.config.in_channels, height // f, width // f),
                   token_period=mult, shift=float(shift), height=height, width=width,
                   **options)

    @property
    def do_cfg(self) -> bool:
        """CFG is on above scale 1 (one forward per row otherwise)."""
        return self.guidance_scale > 1.0

    def default_schedule(self) -> dict[str, Any]:
        """kwargs of `branchgrpo.engine.schedule.make_sigmas`: the shifted schedule at ``shift``."""
        return {"kind": "shifted", "shift": self.shift}

    @classmethod
    def schedule_rule(cls, plan: str) -> tuple[str, bool]:
        """(schedule, quantize_timestep) of every plan by default: StableDiffusion3Pipeline's
        grid (Flow-GRPO's) and 1000 sigma."""
        return "diffusers", False

    @classmethod
    def pipeline_grid(cls, scheduler: dict[str, Any], steps: int, height: int, width: int,
                      vae_scale_factor: int, shift: float | None, dynamic: bool) -> Grid:
        """The scheduler config's own grid (`scheduler_grid`)."""
        return scheduler_grid(scheduler, steps, shift, dynamic)

    def encode(self, parts: Parts, prompts: list[str]) -> dict[str, Tensor]:
        """Joint embeddings [b, 77 + L, D], pooled [b, P] (+ the negative prompt's, per row)."""
        pe, ne, pp, npool = parts.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=parts.device,
            num_images_per_prompt=1, do_classifier_free_guidance=self.do_cfg,
            negative_prompt=[self.negative_prompt] * len(prompts),
            max_sequence_length=self.max_sequence_length)
        out = {"prompt_embeds": pe, "pooled_prompt_embeds": pp}
        if self.do_cfg:
            out |= {"negative_prompt_embeds": ne, "negative_pooled_prompt_embeds": npool}
        return out

    def velocity(self, parts: Parts, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """Guided v [N, C, H, W] fp32: u + g (c - u), with [uncond; cond] in one forward."""

        def forward(x: Tensor, t: Tensor, emb: Tensor, pooled: Tensor) -> Tensor:
            with parts.autocast():
                return parts.transformer(
                    hidden_states=parts.model_input(x), timestep=parts.model_input(t),
                    encoder_hidden_states=parts.model_input(emb),
                    pooled_projections=parts.model_input(pooled), return_dict=False)[0]

        uncond = ((cond["negative_prompt_embeds"], cond["negative_pooled_prompt_embeds"])
                  if self.do_cfg else None)
        return classifier_free(
            forward, x, family_timestep(self, sigma.to(parts.device)),
            (cond["prompt_embeds"], cond["pooled_prompt_embeds"]), uncond,
            scale=self.guidance_scale, detach_uncond=self.detach_uncond, uncond_first=True)

    def decode(self, parts: Parts, x0: Tensor) -> Tensor:
        """Images [N, 3, H, W] in [0, 1] from latents x0 [N, C, H/f, W/f]."""
        vae = parts.pipe.vae
        lat = x0.to(parts.device).float() / vae.config.scaling_factor + vae.config.shift_factor
        return decode_vae(vae, lat, self.decode_batch)


FAMILY = SD3Family
"""The registry's family class (`branchgrpo.models.families.family_class`)."""


def build(o: ModelOptions, device: torch.device) -> DiffusersPolicy:
    """The registry's builder: the checkpoint ``o.path`` as an SD3 policy on ``device``."""
    return load(SD3Family, o.path, device=device, **o.diffusers_kwargs())


def tiny_sd3(
    height: int = 16, width: int = 16, *, seed: int = 0, max_sequence_length: int = 8,
    guidance_scale: float = 4.5, **kw: Any,
) -> tuple[DiffusersPolicy, Any]:
    """A tiny random SD3 (1 joint block, 4 latent channels, VAE factor 2, two CLIP + T5 with
    offline tokenizers) as (policy, reference StableDiffusion3Pipeline with its own transformer
    copy and a shift-1 scheduler that follows ``sigmas=`` unchanged). ``kw``: `SD3Family`
    options and `compose`'s (lora, full_finetune, dtype, ...)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=height // 2, patch_size=1, in_channels=4, num_layers=1,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
        joint_attention_dim=32, pooled_projection_dim=32, out_channels=4)
    parts = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=tiny_image_vae(4, seed),
        text_encoder=tiny_clip_encoder(16, 16, seed), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=tiny_clip_encoder(16, 16, seed + 1), tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=tiny_t5_encoder(32, False, seed),
        tokenizer_3=tiny_t5_tokenizer(max_sequence_length))
    ref = StableDiffusion3Pipeline(transformer=copy.deepcopy(transformer), **parts)
    pipe = StableDiffusion3Pipeline(transformer=transformer, **parts)
    kw.setdefault("shift", 3.0)
    policy = compose(SD3Family, pipe, height=height, width=width, guidance_scale=guidance_scale,
                     max_sequence_length=max_sequence_length, **kw)
    return policy, ref

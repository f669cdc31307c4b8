"""Stable Diffusion 3 / 3.5 as a `Policy`: SD3Transformer2DModel on latents [C, H, W], two
CLIP encoders + T5 (joint sequence and pooled embeddings), classifier-free guidance with the
conditional and unconditional rows in one batched forward (as StableDiffusion3Pipeline and
Flow-GRPO do, guidance 4.5), VAE with scaling/shift factors.

The transformer gets ``timestep = 1000 sigma`` (the scheduler's timesteps). The schedule is the
scheduler config's static shift (3.0 for SD3.5) applied to linspace(1, 0, T + 1).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import Tensor

from .hub import (
    ShiftedCFGPolicy,
    cast_weights,
    default_device,
    load_pipeline,
    tiny_clip_encoder,
    tiny_clip_tokenizer,
    tiny_image_vae,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
    weight_dtype,
)
from .lora import JOINT_ATTENTION_TARGETS, LoraSpec

SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"
SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
              "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")


class SD3Policy(ShiftedCFGPolicy):
    """SD3.5 policy; ``pipe`` is a StableDiffusion3Pipeline whose transformer is trained in
    place. CFG, negative prompt and ``detach_uncond``: see `ShiftedCFGPolicy`."""

    default_lora_targets = JOINT_ATTENTION_TARGETS

    def __init__(
        self, pipe: Any, *, height: int = 512, width: int = 512, guidance_scale: float = 4.5,
        negative_prompt: str = "", max_sequence_length: int = 256, shift: float | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
        lora: LoraSpec | None = None, full_finetune: bool = False,
        gradient_checkpointing: bool = False, offload_encoders: bool = False,
        detach_uncond: bool = False, quantize_timestep: bool = False,
        decode_batch: int = 4,
    ) -> None:
        from diffusers import StableDiffusion3Pipeline

        self.pipeline_class = StableDiffusion3Pipeline
        tr = pipe.transformer
        f = pipe.vae_scale_factor
        mult = f * tr.config.patch_size
        if height % mult or width % mult:
            raise ValueError(f"height and width must be multiples of {mult} for this SD3 "
                             f"(VAE factor {f} x patch {tr.config.patch_size}), "
                             f"got {height}x{width}")
        self.height, self.width = height, width
        self.token_period = mult  # pixels per token side: VAE factor x patch size
        self.latent_shape = (tr.config.in_channels, height // f, width // f)
        super().__init__(
            pipe, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            max_sequence_length=max_sequence_length, detach_uncond=detach_uncond,
            quantize_timestep=quantize_timestep,
            shift=shift if shift is not None else pipe.scheduler.config.get("shift", 3.0),
            decode_batch=decode_batch, device=device, dtype=dtype, lora=lora,
            full_finetune=full_finetune, gradient_checkpointing=gradient_checkpointing,
            offload_encoders=offload_encoders)

    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str | os.PathLike = SD35_MEDIUM, *,
        dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
        lora: LoraSpec | None = None, full_finetune: bool = False,
        master_dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None,
        **kw: Any,
    ) -> SD3Policy:
        """Load an SD3/SD3.5 checkpoint (Hub id or local diffusers folder); fails fast with
        `ModelNotAvailableError` offline. ``kw``: the constructor's options."""
        from diffusers import StableDiffusion3Pipeline

        pipe = load_pipeline(StableDiffusion3Pipeline, model_id_or_path, SUBFOLDERS, dtype,
                             cache_dir)
        cast_weights(pipe.transformer, weight_dtype(dtype, lora, full_finetune, master_dtype))
        return cls(pipe, device=device or default_device(), dtype=dtype, lora=lora,
                   full_finetune=full_finetune, **kw)

    def _encode_uncached(self, prompts: list[str]) -> dict[str, Tensor]:
        """Joint embeddings [b, 77 + L, D], pooled [b, P] (+ the negative prompt's, per row)."""
        pe, ne, pp, npool = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            num_images_per_prompt=1, do_classifier_free_guidance=self.do_cfg,
            negative_prompt=[self.negative_prompt] * len(prompts),
            max_sequence_length=self.max_sequence_length)
        out = {"prompt_embeds": pe, "pooled_prompt_embeds": pp}
        if self.do_cfg:
            out |= {"negative_prompt_embeds": ne, "negative_pooled_prompt_embeds": npool}
        return out

    def velocity(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Guided v [N, C, H, W] fp32: u + g (c - u), with [uncond; cond] in one forward."""
        t = self.timestep(sigma)
        emb, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        if self.do_cfg:
            x = torch.cat([x, x])
            t = torch.cat([t, t])
            emb = torch.cat([cond["negative_prompt_embeds"], emb])
            pooled = torch.cat([cond["negative_pooled_prompt_embeds"], pooled])
        with self.autocast():
            out = self.transformer(
                hidden_states=self.model_input(x), timestep=self.model_input(t),
                encoder_hidden_states=self.model_input(emb),
                pooled_projections=self.model_input(pooled), return_dict=False)[0]
        out = out.float()
        if not self.do_cfg:
            return out
        u, c = out.chunk(2)
        if self.detach_uncond:  # Flow-GRPO's Jul-2025 code: no gradient through uncond
            u = u.detach()
        return u + self.guidance_scale * (c - u)

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        """Images [N, 3, H, W] in [0, 1] from latents x0 [N, C, H/f, W/f]."""
        vae = self.pipe.vae
        lat = x0.to(self.device).float() / vae.config.scaling_factor + vae.config.shift_factor
        out = [vae.decode(c.to(vae.dtype), return_dict=False)[0].float()
               for c in lat.split(self.decode_batch)]
        return (torch.cat(out) * 0.5 + 0.5).clamp(0, 1)


def tiny_sd3(
    height: int = 16, width: int = 16, *, seed: int = 0, max_sequence_length: int = 8,
    guidance_scale: float = 4.5, **kw: Any,
) -> tuple[SD3Policy, Any]:
    """A tiny random SD3 (1 joint block, 4 latent channels, VAE factor 2, two CLIP + T5 with
    offline tokenizers) as (policy, reference StableDiffusion3Pipeline with its own transformer
    copy and a shift-1 scheduler that follows ``sigmas=`` unchanged). ``kw``: SD3Policy
    options."""
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
    policy = SD3Policy(pipe, height=height, width=width, guidance_scale=guidance_scale,
                       max_sequence_length=max_sequence_length, **kw)
    return policy, ref

"""Wan2.1 text-to-video as a `Policy`: WanTransformer3DModel on video latents [C, F, H, W],
the UMT5 text encoder (padding rows zeroed as WanPipeline does), classifier-free guidance with
the conditional and unconditional rows in one batched forward (WanPipeline runs two forwards;
the result is the same up to float rounding), and AutoencoderKLWan with its per-channel latent
mean/std. ``decode`` returns videos [N, F, 3, H, W] in [0, 1].

The transformer gets ``timestep = 1000 sigma``. The schedule is shifted linspace with the
checkpoint's ``flow_shift`` (3.0 for Wan2.1-T2V-1.3B at 480p; DanceGRPO also uses 3).
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
    tiny_t5_encoder,
    tiny_t5_tokenizer,
    weight_dtype,
)
from .lora import LoraSpec

WAN_1_3B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""Self- and cross-attention projections of every Wan block (attn1, attn2)."""


class WanPolicy(ShiftedCFGPolicy):
    """Wan2.1 T2V policy; ``pipe`` is a WanPipeline whose transformer is trained in place.
    ``num_frames`` must be 4k + 1 (VAE temporal factor 4)."""

    default_lora_targets = WAN_LORA_TARGETS

    def __init__(
        self, pipe: Any, *, height: int = 480, width: int = 832, num_frames: int = 33,
        guidance_scale: float = 5.0, negative_prompt: str = "", max_sequence_length: int = 512,
        shift: float | None = None, device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32, lora: LoraSpec | None = None,
        full_finetune: bool = False, gradient_checkpointing: bool = False,
        offload_encoders: bool = False, detach_uncond: bool = False,
        quantize_timestep: bool = False,
        decode_batch: int = 1,
    ) -> None:
        from diffusers import WanPipeline

        self.pipeline_class = WanPipeline
        tr = pipe.transformer
        ft, fs = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        _, ph, pw = tr.config.patch_size
        if (num_frames - 1) % ft:
            raise ValueError(f"num_frames must be {ft}k + 1 for the Wan VAE, got {num_frames}")
        if height % (fs * ph) or width % (fs * pw):
            raise ValueError(f"height and width must be multiples of {fs * ph}, "
                             f"got {height}x{width}")
        self.height, self.width, self.num_frames = height, width, num_frames
        self.token_period = fs * ph  # pixels per token side: spatial VAE factor x patch
        self.latent_shape = (tr.config.in_channels, (num_frames - 1) // ft + 1,
                             height // fs, width // fs)
        cfg = pipe.scheduler.config
        if shift is None:
            shift = cfg.get("flow_shift", None) or cfg.get("shift", 3.0)
        super().__init__(
            pipe, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            max_sequence_length=max_sequence_length, detach_uncond=detach_uncond,
            quantize_timestep=quantize_timestep,
            shift=shift,
            decode_batch=decode_batch, device=device, dtype=dtype, lora=lora,
            full_finetune=full_finetune, gradient_checkpointing=gradient_checkpointing,
            offload_encoders=offload_encoders)

    def timestep(self, sigma: Tensor) -> Tensor:
        """The transformer's timestep [N] fp32: 1000 sigma, or with ``quantize_timestep`` the
        int64(1000 sigma) of UniPC's grid that WanPipeline passes (999 at sigma 1)."""
        from ..engine.schedule import UNIPC_SIGMA_MAX, transformer_timesteps

        return transformer_timesteps(sigma.to(self.device), 1000.0, self.quantize_timestep,
                                     UNIPC_SIGMA_MAX)

    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str | os.PathLike = WAN_1_3B, *,
        dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
        lora: LoraSpec | None = None, full_finetune: bool = False,
        master_dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None,
        vae_dtype: torch.dtype = torch.float32, **kw: Any,
    ) -> WanPolicy:
        """Load a Wan2.1 T2V checkpoint (Hub id or local diffusers folder); fails fast with
        `ModelNotAvailableError` offline. The VAE loads in ``vae_dtype`` (fp32, as the
        diffusers docs advise). ``kw``: the constructor's options."""
        from diffusers import AutoencoderKLWan, WanPipeline

        from .hub import resolve_checkpoint

        path = resolve_checkpoint(model_id_or_path, SUBFOLDERS, cache_dir)
        vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype,
                                               local_files_only=True)
        pipe = load_pipeline(WanPipeline, path, SUBFOLDERS, dtype, vae=vae)
        cast_weights(pipe.transformer, weight_dtype(dtype, lora, full_finetune, master_dtype))
        return cls(pipe, device=device or default_device(), dtype=dtype, lora=lora,
                   full_finetune=full_finetune, **kw)

    def _encode_uncached(self, prompts: list[str]) -> dict[str, Tensor]:
        """UMT5 embeddings [b, L, 4096] (zero past each prompt's length), + the negative's."""
        pe, ne = self.pipe.encode_prompt(
            prompt=prompts, negative_prompt=[self.negative_prompt] * len(prompts),
            do_classifier_free_guidance=self.do_cfg, num_videos_per_prompt=1,
            max_sequence_length=self.max_sequence_length, device=self.device)
        return {"prompt_embeds": pe} | ({"negative_prompt_embeds": ne} if self.do_cfg else {})

    def velocity(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Guided v [N, C, F, H, W] fp32: u + g (c - u), [cond; uncond] in one forward."""
        t = self.timestep(sigma)
        emb = cond["prompt_embeds"]
        if self.do_cfg:
            x, t = torch.cat([x, x]), torch.cat([t, t])
            emb = torch.cat([emb, cond["negative_prompt_embeds"]])
        with self.autocast():
            out = self.transformer(hidden_states=self.model_input(x), timestep=t,
                                   encoder_hidden_states=self.model_input(emb),
                                   return_dict=False)[0]
        out = out.float()
        if not self.do_cfg:
            return out
        c, u = out.chunk(2)
        if self.detach_uncond:  # Flow-GRPO's Jul-2025 code: no gradient through uncond
            u = u.detach()
        return u + self.guidance_scale * (c - u)

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        """Videos [N, F, 3, H, W] in [0, 1] from latents x0 [N, C, F', H', W']."""
        vae = self.pipe.vae
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean, device=self.device).view(1, z, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=self.device).view(1, z, 1, 1, 1)
        lat = x0.to(self.device).float() * std + mean
        out = [vae.decode(c.to(vae.dtype), return_dict=False)[0].float()
               for c in lat.split(self.decode_batch)]
        return (torch.cat(out) * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)


def tiny_wan(
    height: int = 16, width: int = 16, num_frames: int = 5, *, seed: int = 0,
    max_sequence_length: int = 8, guidance_scale: float = 5.0, **kw: Any,
) -> tuple[WanPolicy, Any]:
    """A tiny random Wan (2 blocks, 16 latent channels, VAE factors 8 spatial / 4 temporal,
    UMT5 with an offline tokenizer) as (policy, reference WanPipeline with its own transformer
    copy and a shift-1 Euler scheduler). WanPipeline takes no ``sigmas=``: set them with
    `set_pipeline_sigmas`. ``kw``: WanPolicy options."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
        out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    parts = dict(vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                 text_encoder=tiny_t5_encoder(32, True, seed),
                 tokenizer=tiny_t5_tokenizer(max_sequence_length))
    ref = WanPipeline(transformer=copy.deepcopy(transformer), **parts)
    pipe = WanPipeline(transformer=transformer, **parts)
    kw.setdefault("shift", 3.0)
    policy = WanPolicy(pipe, height=height, width=width, num_frames=num_frames,
                       guidance_scale=guidance_scale, max_sequence_length=max_sequence_length,
                       **kw)
    return policy, ref


def set_pipeline_sigmas(pipe: Any, sigmas: Tensor) -> None:
    """Make ``pipe``'s FlowMatchEulerDiscreteScheduler use ``sigmas`` [T + 1] (ending in 0)
    whatever num_inference_steps the pipeline asks for (WanPipeline has no ``sigmas=``)."""
    sched = pipe.scheduler
    base = type(sched).set_timesteps
    sig = [float(s) for s in sigmas[:-1]]

    def set_timesteps(num_inference_steps: int | None = None, device: Any = None,
                      **_: Any) -> None:
        base(sched, device=device, sigmas=sig)

    sched.set_timesteps = set_timesteps

"""FLUX.1-dev as a `Policy`: FluxTransformer2DModel on 2x2-packed latent tokens, CLIP (pooled)
+ T5 prompt embeddings, the distilled guidance embedding (3.5), and the VAE with its scaling
and shift factors.

Latents are the packed tokens the transformer sees: ``latent_shape = (S, 4 C)`` with
``S = (H / 2f)(W / 2f)`` for VAE factor f (16 channels, f = 8 for FLUX.1-dev: 720 px ->
(2025, 64)). The transformer gets ``timestep = sigma`` exactly as diffusers' FluxPipeline
passes it ((1000 sigma) / 1000 in fp32); ``quantize_timestep=True`` gives the FastVideo repos'
``int(1000 sigma) / 1000`` (DanceGRPO / BranchGRPO, docs/algorithms.md §1.1) instead.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .hub import (
    DiffusersPolicy,
    cast_weights,
    default_device,
    load_pipeline,
    prompt_seed,
    tiny_clip_encoder,
    tiny_clip_tokenizer,
    tiny_image_vae,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
    weight_dtype,
)
from .lora import JOINT_ATTENTION_TARGETS, LoraSpec

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
              "tokenizer_2", "scheduler")


def flux_dev_config() -> dict[str, Any]:
    """The FLUX.1-dev transformer config (FluxTransformer2DModel(**flux_dev_config()) builds
    the 12B model with random weights, e.g. for benchmarks)."""
    return {
        "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19,
        "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
        "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    }


def pack(latents: Tensor) -> Tensor:
    """[N, C, H, W] -> packed tokens [N, (H/2)(W/2), 4C] (FluxPipeline._pack_latents)."""
    n, c, h, w = latents.shape
    x = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, latent_h: int, latent_w: int) -> Tensor:
    """Packed tokens [N, S, 4C] -> latents [N, C, H, W] (FluxPipeline._unpack_latents)."""
    n, _, d = tokens.shape
    x = tokens.view(n, latent_h // 2, latent_w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, latent_h, latent_w)


def latent_ids(latent_h: int, latent_w: int) -> Tensor:
    """Positional ids [S, 3] of the packed image tokens (0, row, col)."""
    ids = torch.zeros(latent_h // 2, latent_w // 2, 3)
    ids[..., 1] += torch.arange(latent_h // 2)[:, None]
    ids[..., 2] += torch.arange(latent_w // 2)[None, :]
    return ids.reshape(-1, 3)


class FluxPolicy(DiffusersPolicy):
    """FLUX.1 policy; see the module docstring. ``pipe`` is a FluxPipeline holding the
    transformer (trained in place), text encoders and VAE, or ``None`` with a ``transformer``
    for the embedding-only benchmark policy (`from_transformer`)."""

    default_lora_targets = JOINT_ATTENTION_TARGETS

    def __init__(
        self, pipe: Any | None, *, height: int = 720, width: int = 720,
        guidance_scale: float = 3.5, max_sequence_length: int = 512,
        quantize_timestep: bool = False, schedule: str = "shifted", shift: float = 3.0,
        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
        lora: LoraSpec | None = None, full_finetune: bool = False,
        gradient_checkpointing: bool = False, offload_encoders: bool = False,
        transformer: nn.Module | None = None, vae_scale_factor: int | None = None,
        decode_batch: int = 4,
    ) -> None:
        from diffusers import FluxPipeline

        self.pipeline_class = FluxPipeline
        tr = transformer if transformer is not None else pipe.transformer
        f = vae_scale_factor or (pipe.vae_scale_factor if pipe is not None else 8)
        if height % (2 * f) or width % (2 * f):
            raise ValueError(f"height and width must be multiples of {2 * f} for FLUX "
                             f"(VAE factor {f} x 2x2 packing), got {height}x{width}")
        self.height, self.width, self.vae_scale_factor = height, width, f
        self.token_period = 2 * f  # pixels per token side: VAE factor x 2x2 packing
        self.latent_hw = (height // f, width // f)
        cfg = tr.config
        self.latent_shape = ((height // (2 * f)) * (width // (2 * f)), cfg.in_channels)
        self.guidance_scale = guidance_scale
        self.guidance_embeds = bool(cfg.guidance_embeds)
        self.max_sequence_length = max_sequence_length
        self.quantize_timestep = quantize_timestep
        self.schedule, self.shift = schedule, shift
        self.decode_batch = decode_batch
        self._embed_dims = (cfg.joint_attention_dim, cfg.pooled_projection_dim)
        super().__init__(tr, pipe, device=device, dtype=dtype, lora=lora,
                         full_finetune=full_finetune,
                         gradient_checkpointing=gradient_checkpointing,
                         offload_encoders=offload_encoders)
        self.img_ids = latent_ids(*self.latent_hw).to(self.device, self._model_dtype)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str | os.PathLike = FLUX_DEV, *,
        dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
        lora: LoraSpec | None = None, full_finetune: bool = False,
        master_dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None,
        **kw: Any,
    ) -> FluxPolicy:
        """Load a FLUX.1 checkpoint (Hub id or local diffusers folder); fails fast with
        `ModelNotAvailableError` offline. Frozen parts load in ``dtype``; fully fine-tuned
        transformer weights in ``master_dtype``. ``kw``: the constructor's options."""
        from diffusers import FluxPipeline

        pipe = load_pipeline(FluxPipeline, model_id_or_path, SUBFOLDERS, dtype, cache_dir)
        cast_weights(pipe.transformer, weight_dtype(dtype, lora, full_finetune, master_dtype))
        return cls(pipe, device=device or default_device(), dtype=dtype, lora=lora,
                   full_finetune=full_finetune, **kw)

    @classmethod
    def from_transformer(cls, transformer: nn.Module, height: int, width: int,
                         **kw: Any) -> FluxPolicy:
        """A policy without text encoders or VAE (benchmarks): ``encode`` returns random
        prompt embeddings seeded by the prompt, ``decode`` a cheap latent preview."""
        return cls(None, height=height, width=width, transformer=transformer, **kw)

    def default_schedule(self) -> dict[str, Any]:
        """kwargs of `branchgrpo.engine.schedule.make_sigmas` (add num_steps): the FastVideo repos'
        shifted schedule (shift 3) by default, or diffusers' "flux_dynamic"."""
        return {"kind": self.schedule, "shift": self.shift, "image_seq_len": self.latent_shape[0]}

    def plan_kwargs(self) -> dict[str, Any]:
        """The same schedule as keyword arguments of `branchgrpo.engine.plans.build_plan`."""
        s = self.default_schedule()
        return {"schedule": s["kind"], "shift": s["shift"], "image_seq_len": s["image_seq_len"]}

    # ---- Policy protocol ----------------------------------------------------------------
    def _encode_uncached(self, prompts: list[str]) -> dict[str, Tensor]:
        """T5 sequence embeddings [b, L, 4096] and pooled CLIP embeddings [b, 768]."""
        if self.pipe is None:
            d, p = self._embed_dims
            rows = []
            for s in prompts:
                g = torch.Generator().manual_seed(prompt_seed(s))
                rows.append((torch.randn(self.max_sequence_length, d, generator=g),
                             torch.randn(p, generator=g)))
            return {"prompt_embeds": torch.stack([r[0] for r in rows]).to(self._model_dtype),
                    "pooled_prompt_embeds": torch.stack([r[1] for r in rows]).to(
                        self._model_dtype)}
        emb, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": emb, "pooled_prompt_embeds": pooled}

    def timestep(self, sigma: Tensor) -> Tensor:
        """The transformer's timestep [N] fp32 from sigma [N] (see the module docstring)."""
        from ..engine.schedule import transformer_timesteps

        return transformer_timesteps(sigma.to(self.device), 1.0, self.quantize_timestep)

    def velocity(self, x: Tensor, sigma: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """v [N, S, 4C] fp32 at packed latents x [N, S, 4C], sigma [N]."""
        emb = cond["prompt_embeds"]
        n = x.shape[0]
        guidance = (torch.full((n,), self.guidance_scale, device=self.device)
                    if self.guidance_embeds else None)
        txt_ids = torch.zeros(emb.shape[1], 3, device=self.device, dtype=self._model_dtype)
        pooled = cond["pooled_prompt_embeds"]
        with self.autocast():
            out = self.transformer(
                hidden_states=self.model_input(x), timestep=self.model_input(self.timestep(sigma)),
                guidance=guidance, pooled_projections=self.model_input(pooled),
                encoder_hidden_states=self.model_input(emb), txt_ids=txt_ids,
                img_ids=self.img_ids, return_dict=False)[0]
        return out.float()

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        """Images [N, 3, H, W] in [0, 1] from packed latents x0 [N, S, 4C] (in chunks of
        ``decode_batch``). Without a VAE: sigmoid of 3 latent channels [N, 3, H/f, W/f]."""
        lat = unpack(x0.to(self.device).float(), *self.latent_hw)
        if self.pipe is None or getattr(self.pipe, "vae", None) is None:
            return lat[:, :3].sigmoid()
        vae = self.pipe.vae
        lat = lat / vae.config.scaling_factor + vae.config.shift_factor
        out = [vae.decode(c.to(vae.dtype), return_dict=False)[0].float()
               for c in lat.split(self.decode_batch)]
        return (torch.cat(out) * 0.5 + 0.5).clamp(0, 1)


def tiny_flux(
    height: int = 16, width: int = 16, *, seed: int = 0, max_sequence_length: int = 8,
    guidance_scale: float = 3.5, **kw: Any,
) -> tuple[FluxPolicy, Any]:
    """A tiny random FLUX (1 double + 1 single block, 16 latent channels, VAE factor 2, CLIP
    and T5 with offline tokenizers) as (policy, reference FluxPipeline).

    The pipeline shares the text encoders and VAE but holds its own copy of the initial
    transformer (so a LoRA loaded into it does not touch the policy), and its scheduler
    (shift 1, no dynamic shift) follows any ``sigmas=`` passed to it unchanged.
    ``kw``: FluxPolicy options (lora, full_finetune, dtype, ...)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8), guidance_embeds=True)
    parts = dict(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=tiny_image_vae(4, seed), text_encoder=tiny_clip_encoder(32, None, seed),
        tokenizer=tiny_clip_tokenizer(), text_encoder_2=tiny_t5_encoder(32, False, seed),
        tokenizer_2=tiny_t5_tokenizer(max_sequence_length))
    ref = FluxPipeline(transformer=copy.deepcopy(transformer), **parts)
    pipe = FluxPipeline(transformer=transformer, **parts)
    policy = FluxPolicy(pipe, height=height, width=width, guidance_scale=guidance_scale,
                        max_sequence_length=max_sequence_length, **kw)
    return policy, ref


__all__: Sequence[str] = ("FluxPolicy", "flux_dev_config", "tiny_flux", "pack", "unpack",
                          "latent_ids")

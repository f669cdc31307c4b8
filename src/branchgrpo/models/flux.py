"""FLUX.1-dev as a model family (`FluxFamily`, composed into a `DiffusersPolicy`):
FluxTransformer2DModel on 2x2-packed latent tokens, CLIP (pooled) + T5 prompt embeddings, the
distilled guidance embedding (3.5), and the VAE with its scaling and shift factors.

Latents are the packed tokens the transformer sees: ``latent_shape = (S, 4 C)`` with
``S = (H / 2f)(W / 2f)`` for VAE factor f (16 channels, f = 8 for FLUX.1-dev: 720 px ->
(2025, 64)). The transformer gets ``timestep = sigma`` exactly as diffusers' FluxPipeline
passes it ((1000 sigma) / 1000 in fp32); ``quantize_timestep=True`` gives the FastVideo repos'
``int(1000 sigma) / 1000`` (DanceGRPO / BranchGRPO, docs/algorithms.md §1.1) instead.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..engine import schedule as sch
from .base import Cond
from .diffusers_policy import DiffusersPolicy, compose
from .family import (
    Distilled,
    Grid,
    Parts,
    decode_vae,
    family_timestep,
    image_tokens,
    prompt_seed,
    scheduler_mu,
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

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
              "tokenizer_2", "scheduler")
FASTVIDEO_PLANS = frozenset({"dance", "branch", "branch_mix", "mix", "mix_flash", "g2rpo",
                             "branch_flash"})
"""Plans whose published FLUX code (the FastVideo repos) runs the shifted linspace, shift 3,
and gives the transformer int(1000 sigma) / 1000."""
RELEASED_CONFIG: dict[str, Any] = {
    "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True,
                  "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096, "shift": 3.0, "num_train_timesteps": 1000},
    "transformer": {  # FLUX.1-dev transformer/config.json (testing.REPLICAS["flux"])
        "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
        "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
        "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768},
    "vae_scale_factor": 8,
    # branchgrpo.memory: 2x2-packed tokens; T5 max_sequence_length 512; parameters counted on
    # the meta device from the released text_encoder/, text_encoder_2/, vae/ config.json
    # (CLIP-L text 123.06M, T5-XXL encoder 4.762B, the 16-channel AutoencoderKL 83.8M)
    "token_patch": 2, "text_tokens": 512,
    "params": {"text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656,
               "vae": 83_819_683}}
"""FLUX.1-dev's config values that decide the schedule and size the model
(`FluxFamily.released_config`)."""
SCHNELL_STEPS = 4
"""FLUX.1-schnell's distilled step count (its model card: 1-4 steps, 4 in its example)."""


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


@dataclass
class FluxFamily:
    """FLUX.1 as a `branchgrpo.models.family.Family` (see the module docstring). ``schedule``
    is the default schedule's kind: the FastVideo repos' "shifted" (``shift``) or diffusers'
    "flux_dynamic"; ``guidance_scale`` feeds the distilled guidance embedding (3.5)."""

    pipeline_name: ClassVar[str] = "FluxPipeline"
    subfolders: ClassVar[tuple[str, ...]] = SUBFOLDERS
    lora_targets: ClassVar[tuple[str, ...]] = JOINT_ATTENTION_TARGETS
    fp32_modules: ClassVar[tuple[str, ...]] = ()
    transformer_class: ClassVar[str] = "FluxTransformer2DModel"
    released_config: ClassVar[dict[str, Any]] = RELEASED_CONFIG
    timestep_scale: ClassVar[float] = 1.0
    timestep_sigma_max: ClassVar[float] = 1.0
    guidance_kind: ClassVar[str] = "embedding"
    video: ClassVar[bool] = False
    latent_shape: tuple[int, ...]
    token_period: int
    latent_hw: tuple[int, int]
    guidance_embeds: bool
    embed_dims: tuple[int, int]
    """(T5 width, pooled CLIP width): the random embeddings of the benchmark policy."""
    height: int = 720
    width: int = 720
    guidance_scale: float = 3.5
    max_sequence_length: int = 512
    quantize_timestep: bool = False
    schedule: str = "shifted"
    shift: float = 3.0
    decode_batch: int = 4

    @classmethod
    def of(cls, pipe: Any | None, transformer: nn.Module | None = None, *, height: int = 720,
           width: int = 720, vae_scale_factor: int | None = None, **options: Any) -> FluxFamily:
        """The family for ``pipe`` (or a bare ``transformer``, VAE factor ``vae_scale_factor``
        or 8) at ``height`` x ``width``; ``options``: the dataclass fields above."""
        tr = transformer if transformer is not None else pipe.transformer
        f = vae_scale_factor or (pipe.vae_scale_factor if pipe is not None else 8)
        if height % (2 * f) or width % (2 * f):
            raise ValueError(f"height and width must be multiples of {2 * f} for FLUX "
                             f"(VAE factor {f} x 2x2 packing), got {height}x{width}")
        cfg = tr.config
        return cls(latent_shape=((height // (2 * f)) * (width // (2 * f)), cfg.in_channels),
                   token_period=2 * f, latent_hw=(height // f, width // f),
                   guidance_embeds=bool(cfg.guidance_embeds),
                   embed_dims=(cfg.joint_attention_dim, cfg.pooled_projection_dim),
                   height=height, width=width, **options)

    @classmethod
    def schedule_rule(cls, plan: str) -> tuple[str, bool]:
        """(schedule, quantize_timestep) of ``plan`` by default: the FastVideo repos' shifted
        linspace and int(1000 sigma) / 1000 for their plans, else FluxPipeline's grid."""
        return ("shifted", True) if plan in FASTVIDEO_PLANS else ("diffusers", False)

    @classmethod
    def distilled(cls, scheduler: dict[str, Any], transformer: dict[str, Any],
                  ) -> Distilled | None:
        """FLUX.1-schnell when the transformer has no guidance embedding (``guidance_embeds``
        false): timestep-distilled for 4 steps without guidance (its model card: 1-4 steps,
        guidance 0)."""
        if transformer.get("guidance_embeds", True):
            return None
        return Distilled("FLUX.1-schnell", SCHNELL_STEPS, True,
                         "transformer guidance_embeds: false")

    @classmethod
    def pipeline_grid(cls, scheduler: dict[str, Any], steps: int, height: int, width: int,
                      vae_scale_factor: int, shift: float | None, dynamic: bool) -> Grid:
        """FluxPipeline's grid: linspace(1, 1/T, T) time-shifted by the dynamic mu of the
        (H/2f)(W/2f) image tokens (``use_dynamic_shifting`` or ``dynamic``), else by the static
        ``shift`` (the config's unless given)."""
        seq = image_tokens(height, width, 2 * vae_scale_factor)
        if dynamic or scheduler.get("use_dynamic_shifting"):
            if shift is not None:
                raise ValueError("rollout.shift is not used by FLUX's dynamic schedule (mu "
                                 "from the image size); remove it, or set "
                                 "rollout.schedule=shifted")
            mu = scheduler_mu(scheduler, seq)
            return Grid(sch.flux_pipeline(steps, mu=mu), mu=mu, image_seq_len=seq)
        s = shift if shift is not None else float(scheduler.get("shift", 1.0))
        return Grid(sch.flux_pipeline(steps, shift=s), shift=s, image_seq_len=seq)

    def default_schedule(self) -> dict[str, Any]:
        """kwargs of `branchgrpo.engine.schedule.make_sigmas` (add num_steps): the FastVideo repos'
        shifted schedule (shift 3) by default, or diffusers' "flux_dynamic"."""
        return {"kind": self.schedule, "shift": self.shift, "image_seq_len": self.latent_shape[0]}

    def encode(self, parts: Parts, prompts: list[str]) -> dict[str, Tensor]:
        """T5 sequence embeddings [b, L, 4096] and pooled CLIP embeddings [b, 768]; without a
        pipeline, random ones seeded by the prompt."""
        if parts.pipe is None:
            d, p = self.embed_dims
            rows = []
            for s in prompts:
                g = torch.Generator().manual_seed(prompt_seed(s))
                rows.append((torch.randn(self.max_sequence_length, d, generator=g),
                             torch.randn(p, generator=g)))
            return {"prompt_embeds": torch.stack([r[0] for r in rows]).to(parts.model_dtype),
                    "pooled_prompt_embeds": torch.stack([r[1] for r in rows]).to(
                        parts.model_dtype)}
        emb, pooled, _ = parts.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=parts.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": emb, "pooled_prompt_embeds": pooled}

    def velocity(self, parts: Parts, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """v [N, S, 4C] fp32 at packed latents x [N, S, 4C], sigma [N]."""
        emb = cond["prompt_embeds"]
        n = x.shape[0]
        guidance = (torch.full((n,), self.guidance_scale, device=parts.device)
                    if self.guidance_embeds else None)
        txt_ids = torch.zeros(emb.shape[1], 3, device=parts.device, dtype=parts.model_dtype)
        img_ids = parts.model_input(latent_ids(*self.latent_hw))
        pooled = cond["pooled_prompt_embeds"]
        t = family_timestep(self, sigma.to(parts.device))
        with parts.autocast():
            out = parts.transformer(
                hidden_states=parts.model_input(x), timestep=parts.model_input(t),
                guidance=guidance, pooled_projections=parts.model_input(pooled),
                encoder_hidden_states=parts.model_input(emb), txt_ids=txt_ids,
                img_ids=img_ids, return_dict=False)[0]
        return out.float()

    def decode(self, parts: Parts, x0: Tensor) -> Tensor:
        """Images [N, 3, H, W] in [0, 1] from packed latents x0 [N, S, 4C] (in chunks of
        ``decode_batch``). Without a VAE: sigmoid of 3 latent channels [N, 3, H/f, W/f]."""
        lat = unpack(x0.to(parts.device).float(), *self.latent_hw)
        vae = getattr(parts.pipe, "vae", None) if parts.pipe is not None else None
        if vae is None:
            return lat[:, :3].sigmoid()
        lat = lat / vae.config.scaling_factor + vae.config.shift_factor
        return decode_vae(vae, lat, self.decode_batch)


FAMILY = FluxFamily
"""The registry's family class (`branchgrpo.models.families.family_class`)."""


def build(o: ModelOptions, device: torch.device) -> DiffusersPolicy:
    """The registry's builder: the checkpoint ``o.path`` as a FLUX policy on ``device``."""
    return load(FluxFamily, o.path, device=device, **o.diffusers_kwargs())


def from_transformer(transformer: nn.Module, height: int, width: int,
                     **kw: Any) -> DiffusersPolicy:
    """A FLUX policy without text encoders or VAE (benchmarks): ``encode`` returns random
    prompt embeddings seeded by the prompt, ``decode`` a cheap latent preview. ``kw``: the
    `FluxFamily` options and `compose`'s (device, dtype, lora, ...)."""
    return compose(FluxFamily, None, transformer=transformer, height=height, width=width, **kw)


def tiny_flux(
    height: int = 16, width: int = 16, *, seed: int = 0, max_sequence_length: int = 8,
    guidance_scale: float = 3.5, **kw: Any,
) -> tuple[DiffusersPolicy, Any]:
    """A tiny random FLUX (1 double + 1 single block, 16 latent channels, VAE factor 2, CLIP
    and T5 with offline tokenizers) as (policy, reference FluxPipeline).

    The pipeline shares the text encoders and VAE but holds its own copy of the initial
    transformer (so a LoRA loaded into it does not touch the policy), and its scheduler
    (shift 1, no dynamic shift) follows any ``sigmas=`` passed to it unchanged.
    ``kw``: `FluxFamily` options and `compose`'s (lora, full_finetune, dtype, ...)."""
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
    policy = compose(FluxFamily, pipe, height=height, width=width, guidance_scale=guidance_scale,
                     max_sequence_length=max_sequence_length, **kw)
    return policy, ref

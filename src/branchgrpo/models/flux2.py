"""FLUX.2 (dev) as a model family (`Flux2Family`, composed into a `DiffusersPolicy`):
Flux2Transformer2DModel on 2x2-patchified VAE latents, the Mistral3 text encoder (its chat
template with FLUX.2's system message; hidden states of layers 10, 20, 30 stacked per token),
the distilled guidance embedding (4.0), and AutoencoderKLFlux2 with its batch-norm latent
normalisation.

What Flux2Pipeline (diffusers 0.42.1) does, and we reproduce:

- latents: the VAE's 32 channels patchified 2x2 into 128 channels at H/16 x W/16 and
  normalised by the VAE's BatchNorm running stats, ``(z - mean) / sqrt(var + eps)``; the
  transformer sees them packed as tokens [(H/16)(W/16), 128] in row-major order. Our
  ``latent_shape`` is the unpacked ``(128, H/16, W/16)`` (the pipeline's ``latents=`` input);
- position ids: 4 axes (T, H, W, L): image tokens (0, h, w, 0), text tokens (0, 0, 0, l);
- grid: ``sigmas = linspace(1, 1/T, T)`` time-shifted (exponential) by the empirical mu
  ``compute_empirical_mu(image_seq_len, T)`` (`branchgrpo.engine.schedule.flux2_empirical_mu`)
  handed to the scheduler (``use_dynamic_shifting``), then a final 0;
- timestep: ``t / 1000`` with the scheduler's ``t = 1000 sigma`` (our ``timestep_scale`` 1),
  the guidance embedding gets ``guidance_scale`` (4.0), no CFG; the transformer predicts
  ``v = eps - x0`` directly (no sign or time flip).
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
from .family import Grid, Parts, decode_vae, family_timestep, image_tokens
from .loading import load
from .lora import JOINT_ATTENTION_TARGETS
from .testing import tiny_chat_tokenizer

if TYPE_CHECKING:
    from .factory import ModelOptions

FLUX2_DEV = "black-forest-labs/FLUX.2-dev"
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
FLUX2_LORA_TARGETS = (*JOINT_ATTENTION_TARGETS, "to_qkv_mlp_proj")
"""Joint attention of the double-stream blocks (image and text streams) and the fused
QKV + MLP input projection of the single-stream blocks."""
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set text = m['content'] if m['content'] is string"
    " else m['content'][0]['text'] %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}"
    "[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]{% endif %}"
    "{% endfor %}")
"""Mistral-Small-3's chat layout for a system and a user text turn (the replica's tokenizer;
the released checkpoint ships a PixtralProcessor with the full template)."""
RELEASED_CONFIG: dict[str, Any] = {
    # black-forest-labs/FLUX.2-dev scheduler/scheduler_config.json (as released; the file
    # itself was not re-read here, no Hub access): dynamic exponential shifting, which
    # Flux2Pipeline drives with its empirical mu (base/max shift and shift go unused)
    "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
                  "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                  "num_train_timesteps": 1000, "shift": 3.0, "time_shift_type": "exponential",
                  "use_dynamic_shifting": True},
    # black-forest-labs/FLUX.2-dev transformer/config.json (every key of the 32B model)
    "transformer": {"_class_name": "Flux2Transformer2DModel", "attention_head_dim": 128,
                    "axes_dims_rope": [32, 32, 32, 32], "eps": 1e-06, "guidance_embeds": True,
                    "in_channels": 128, "joint_attention_dim": 15360, "mlp_ratio": 3.0,
                    "num_attention_heads": 48, "num_layers": 8, "num_single_layers": 48,
                    "out_channels": None, "patch_size": 1, "rope_theta": 2000,
                    "timestep_guidance_channels": 256},
    "vae_scale_factor": 8,
    # parameter counts for `branchgrpo plan`'s memory estimate (meta-device builds of the
    # released architectures): Mistral-Small-3.1-24B (Mistral3ForConditionalGeneration: 40
    # layers of 5120, Pixtral vision tower) and AutoencoderKLFlux2
    "params": {"text_encoder": 24_011_361_280, "vae": 84_046_115}}
"""FLUX.2-dev's released config values (`Flux2Family.released_config`)."""
TEXT_LAYERS = (10, 20, 30)
"""Flux2Pipeline's ``text_encoder_out_layers``: the Mistral hidden states stacked per token."""


def latent_ids(h: int, w: int) -> Tensor:
    """Position ids [h w, 4] (T, H, W, L) = (0, row, col, 0) of the packed image tokens
    (Flux2Pipeline._prepare_latent_ids)."""
    z = torch.arange(1)
    return torch.cartesian_prod(z, torch.arange(h), torch.arange(w), z)


def text_ids(length: int) -> Tensor:
    """Position ids [L, 4] = (0, 0, 0, l) of the text tokens (Flux2Pipeline._prepare_text_ids)."""
    z = torch.arange(1)
    return torch.cartesian_prod(z, z, z, torch.arange(length))


@dataclass
class Flux2Family:
    """FLUX.2 as a `branchgrpo.models.family.Family` (see the module docstring).
    ``guidance_scale`` feeds the distilled guidance embedding (4.0, Flux2Pipeline's default)."""

    pipeline_name: ClassVar[str] = "Flux2Pipeline"
    subfolders: ClassVar[tuple[str, ...]] = SUBFOLDERS
    lora_targets: ClassVar[tuple[str, ...]] = FLUX2_LORA_TARGETS
    fp32_modules: ClassVar[tuple[str, ...]] = ()
    transformer_class: ClassVar[str] = "Flux2Transformer2DModel"
    released_config: ClassVar[dict[str, Any]] = RELEASED_CONFIG
    timestep_scale: ClassVar[float] = 1.0
    timestep_sigma_max: ClassVar[float] = 1.0
    guidance_kind: ClassVar[str] = "embedding"
    video: ClassVar[bool] = False
    latent_shape: tuple[int, ...]
    token_period: int
    guidance_embeds: bool
    height: int = 1024
    width: int = 1024
    guidance_scale: float = 4.0
    max_sequence_length: int = 512
    quantize_timestep: bool = False
    shift: float = 3.0
    decode_batch: int = 4

    @classmethod
    def of(cls, pipe: Any, transformer: nn.Module | None = None, *, height: int = 1024,
           width: int = 1024, **options: Any) -> Flux2Family:
        """The family for ``pipe`` at ``height`` x ``width``; ``options``: the fields above."""
        tr = transformer if transformer is not None else pipe.transformer
        f = 2 * pipe.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for FLUX.2 (VAE "
                             f"factor {f // 2} x 2x2 patchify), got {height}x{width}")
        cfg = tr.config
        return cls(latent_shape=(cfg.in_channels, height // f, width // f), token_period=f,
                   guidance_embeds=bool(cfg.guidance_embeds), height=height, width=width,
                   **options)

    @classmethod
    def schedule_rule(cls, plan: str) -> tuple[str, bool]:
        """(schedule, quantize_timestep) of every plan by default: Flux2Pipeline's grid and
        its float timestep."""
        return "diffusers", False

    @classmethod
    def pipeline_grid(cls, scheduler: dict[str, Any], steps: int, height: int, width: int,
                      vae_scale_factor: int, shift: float | None, dynamic: bool) -> Grid:
        """Flux2Pipeline's grid: linspace(1, 1/T, T) shifted by the empirical mu of the
        (H/2f)(W/2f) image tokens and T (``use_dynamic_shifting``), else by the static
        ``shift`` (the config's unless given)."""
        seq = image_tokens(height, width, 2 * vae_scale_factor)
        if dynamic:
            raise ValueError("rollout.schedule=flux_dynamic is FLUX.1's mu; FLUX.2's own "
                             "grid is rollout.schedule=diffusers (its empirical mu)")
        if scheduler.get("use_dynamic_shifting"):
            if shift is not None:
                raise ValueError("rollout.shift is not used by FLUX.2's dynamic schedule (mu "
                                 "from the image size and step count); remove it, or set "
                                 "rollout.schedule=shifted")
            if scheduler.get("time_shift_type", "exponential") != "exponential":
                raise ValueError("only the exponential time shift of FLUX.2's scheduler is "
                                 "reproduced; set rollout.schedule=shifted")
            mu = sch.flux2_empirical_mu(seq, steps)
            return Grid(sch.flux_pipeline(steps, mu=mu), mu=mu, image_seq_len=seq)
        s = shift if shift is not None else float(scheduler.get("shift", 1.0))
        return Grid(sch.flux_pipeline(steps, shift=s), shift=s, image_seq_len=seq)

    def default_schedule(self) -> dict[str, Any]:
        """kwargs of `branchgrpo.engine.schedule.make_sigmas`: the shifted schedule."""
        return {"kind": "shifted", "shift": self.shift}

    def encode(self, parts: Parts, prompts: list[str]) -> dict[str, Tensor]:
        """Stacked Mistral hidden states [b, max_sequence_length, 3 hidden] (padded to the
        length, as the pipeline pads)."""
        emb, _ = parts.pipe.encode_prompt(
            prompt=list(prompts), device=parts.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length, text_encoder_out_layers=TEXT_LAYERS)
        return {"prompt_embeds": emb}

    def velocity(self, parts: Parts, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """v [N, C, h, w] fp32 at latents x [N, C, h, w] (C = 128 patchified channels)."""
        n, c, h, w = x.shape
        emb = cond["prompt_embeds"]
        tokens = x.reshape(n, c, h * w).permute(0, 2, 1)
        guidance = (torch.full((n,), self.guidance_scale, device=parts.device)
                    if self.guidance_embeds else None)
        t = family_timestep(self, sigma.to(parts.device))
        with parts.autocast():
            out = parts.transformer(
                hidden_states=parts.model_input(tokens), timestep=parts.model_input(t),
                guidance=guidance, encoder_hidden_states=parts.model_input(emb),
                txt_ids=text_ids(emb.shape[1]).to(parts.device),
                img_ids=latent_ids(h, w).to(parts.device), return_dict=False)[0]
        return out.float().permute(0, 2, 1).reshape(n, c, h, w)

    def decode(self, parts: Parts, x0: Tensor) -> Tensor:
        """Images [N, 3, H, W] in [0, 1] from latents x0 [N, 128, H/16, W/16]: the VAE's
        batch-norm stats undone, unpatchified to [N, 32, H/8, W/8], decoded."""
        vae = parts.pipe.vae
        lat = x0.to(parts.device).float()
        bn = vae.bn
        std = torch.sqrt(bn.running_var.float() + vae.config.batch_norm_eps)
        lat = lat * std.view(1, -1, 1, 1) + bn.running_mean.float().view(1, -1, 1, 1)
        n, c, h, w = lat.shape
        lat = lat.reshape(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return decode_vae(vae, lat.reshape(n, c // 4, 2 * h, 2 * w), self.decode_batch)


FAMILY = Flux2Family
"""The registry's family class (`branchgrpo.models.families.family_class`)."""


def build(o: ModelOptions, device: torch.device) -> DiffusersPolicy:
    """The registry's builder: the checkpoint ``o.path`` as a FLUX.2 policy on ``device``."""
    return load(Flux2Family, o.path, device=device, **o.diffusers_kwargs())


def tiny_flux2_parts(seed: int = 0, vae_levels: int = 4) -> dict[str, Any]:
    """Tiny random Flux2Pipeline components: a 1 double + 1 single block Flux2Transformer2DModel
    (the released 4-axis RoPE layout, rope_theta, guidance embedding), a 30-layer Mistral3
    (hidden 16, so the pipeline's layers 10, 20, 30 exist) with `tiny_chat_tokenizer` (a fast
    tokenizer with Mistral's chat layout: the released PixtralProcessor needs torchvision), and an
    AutoencoderKLFlux2 (``vae_levels`` levels: factor 2^(levels-1); widths 8) whose batch-norm
    running stats are random (so the normalisation is exercised)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    rel = RELEASED_CONFIG["transformer"]
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32,
        mlp_ratio=rel["mlp_ratio"], axes_dims_rope=(4, 4, 4, 4), rope_theta=rel["rope_theta"],
        eps=rel["eps"], guidance_embeds=rel["guidance_embeds"])
    torch.manual_seed(seed)
    text = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": 100, "hidden_size": 16,
                     "intermediate_size": 24, "num_hidden_layers": max(TEXT_LAYERS),
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                     "max_position_embeddings": 1024, "pad_token_id": 0, "bos_token_id": 2,
                     "eos_token_id": 3},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 24,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 8,
                       "image_size": 32, "patch_size": 16},
        image_token_index=1)).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels, block_out_channels=(8,) * vae_levels,
        layers_per_block=1, norm_num_groups=4, sample_size=32, batch_norm_eps=1e-4).eval()
    g = torch.Generator().manual_seed(seed + 1)
    vae.bn.running_mean.copy_(torch.randn(128, generator=g) * 0.3)
    vae.bn.running_var.copy_(torch.rand(128, generator=g) + 0.5)
    return dict(transformer=transformer, vae=vae, text_encoder=text,
                tokenizer=tiny_chat_tokenizer(MISTRAL_CHAT_TEMPLATE))


def tiny_flux2(height: int = 32, width: int = 32, *, seed: int = 0,
               max_sequence_length: int = 256, guidance_scale: float = 4.0, **kw: Any,
               ) -> tuple[DiffusersPolicy, Any]:
    """A tiny random FLUX.2 (`tiny_flux2_parts`, VAE factor 4) as (policy, reference
    Flux2Pipeline with its own transformer copy and a shift-1 static Euler scheduler, which
    follows any ``sigmas=`` unchanged). ``kw``: `Flux2Family` options and `compose`'s."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    parts = tiny_flux2_parts(seed, vae_levels=3)
    transformer = parts.pop("transformer")
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=1.0)
    ref = Flux2Pipeline(transformer=copy.deepcopy(transformer), **parts)
    pipe = Flux2Pipeline(transformer=transformer, **parts)
    policy = compose(Flux2Family, pipe, height=height, width=width,
                     guidance_scale=guidance_scale, max_sequence_length=max_sequence_length, **kw)
    return policy, ref

"""Wan2.1 text-to-video as a model family (`WanFamily`, composed into a `DiffusersPolicy`):
WanTransformer3DModel on video latents [C, F, H, W], the UMT5 text encoder (padding rows zeroed
as WanPipeline does), classifier-free guidance with the conditional and unconditional rows in
one batched forward (WanPipeline runs two forwards; the result is the same up to float
rounding), and AutoencoderKLWan (loaded in fp32, as the diffusers docs advise) with its
per-channel latent mean/std. ``decode`` returns videos [N, F, 3, H, W] in [0, 1].

The transformer gets ``timestep = 1000 sigma``. The schedule is shifted linspace with the
checkpoint's ``flow_shift`` (3.0 for Wan2.1-T2V-1.3B at 480p; DanceGRPO also uses 3).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..engine.schedule import UNIPC_SIGMA_MAX
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
from .testing import tiny_t5_encoder, tiny_t5_tokenizer

if TYPE_CHECKING:
    from .factory import ModelOptions

WAN_1_3B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""Self- and cross-attention projections of every Wan block (attn1, attn2)."""
RELEASED_CONFIG: dict[str, Any] = {
    "scheduler": {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True,
                  "flow_shift": 3.0, "prediction_type": "flow_prediction",
                  "final_sigmas_type": "zero", "num_train_timesteps": 1000},
    "transformer": {  # Wan2.1-T2V-1.3B transformer/config.json (testing.REPLICAS["wan"])
        "_class_name": "WanTransformer3DModel", "attention_head_dim": 128,
        "cross_attn_norm": True, "ffn_dim": 8960, "freq_dim": 256, "in_channels": 16,
        "num_attention_heads": 12, "num_layers": 30, "out_channels": 16,
        "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "text_dim": 4096},
    "vae_scale_factor": 8,
    # branchgrpo.memory: VAE temporal factor 4; UMT5 max_sequence_length 512; parameters
    # counted on the meta device from the released text_encoder/ and vae/ config.json
    # (UMT5-XXL encoder 5.681B, AutoencoderKLWan 126.9M, kept in fp32)
    "frame_period": 4, "text_tokens": 512,
    "params": {"text_encoder": 5_680_910_336, "vae": 126_892_531}}
"""Wan2.1-T2V-1.3B-Diffusers' config values that decide the schedule and size the model
(`WanFamily.released_config`)."""
WAN_14B = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
RELEASED_CONFIGS: dict[str, dict[str, Any]] = {WAN_14B: {
    **RELEASED_CONFIG,
    # Wan2.1-T2V-14B transformer/config.json: the 1.3B's keys at the 14B's width (Wan's own
    # wan/configs/wan_t2v_14B.py: dim 5120 = 40 heads x 128, ffn_dim 13824, 40 layers); the
    # same UMT5-XXL encoder, VAE and UniPC flow_shift 3.0 (diffusers'
    # scripts/convert_wan_to_diffusers.py, as the Wan2.1-I2V-14B entry of wan_i2v.RELEASED)
    "transformer": {**RELEASED_CONFIG["transformer"], "ffn_dim": 13824,
                    "num_attention_heads": 40, "num_layers": 40}}}
"""Other Wan2.1 T2V checkpoints' config values, by Hub id (`WanFamily.released_configs`)."""


@dataclass
class WanFamily:
    """Wan2.1 T2V as a `branchgrpo.models.family.Family`. ``num_frames`` must be 4k + 1 (VAE
    temporal factor 4); ``shift`` defaults to the scheduler config's ``flow_shift``; CFG,
    negative prompt and ``detach_uncond`` as `SD3Family`'s."""

    pipeline_name: ClassVar[str] = "WanPipeline"
    subfolders: ClassVar[tuple[str, ...]] = SUBFOLDERS
    lora_targets: ClassVar[tuple[str, ...]] = WAN_LORA_TARGETS
    fp32_modules: ClassVar[tuple[str, ...]] = ("vae",)
    transformer_class: ClassVar[str] = "WanTransformer3DModel"
    released_config: ClassVar[dict[str, Any]] = RELEASED_CONFIG
    released_configs: ClassVar[dict[str, dict[str, Any]]] = RELEASED_CONFIGS
    timestep_scale: ClassVar[float] = 1000.0
    timestep_sigma_max: ClassVar[float] = UNIPC_SIGMA_MAX
    guidance_kind: ClassVar[str] = "cfg"
    video: ClassVar[bool] = True
    latent_shape: tuple[int, ...]
    token_period: int
    shift: float
    height: int = 480
    width: int = 832
    num_frames: int = 33
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    max_sequence_length: int = 512
    detach_uncond: bool = False
    quantize_timestep: bool = False
    decode_batch: int = 1

    @classmethod
    def of(cls, pipe: Any, transformer: nn.Module | None = None, *, height: int = 480,
           width: int = 832, num_frames: int = 33, shift: float | None = None,
           **options: Any) -> WanFamily:
        """The family for ``pipe`` at ``num_frames`` x ``height`` x ``width``; ``options``:
        the fields above."""
        tr = transformer if transformer is not None else pipe.transformer
        ft, fs = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        _, ph, pw = tr.config.patch_size
        if (num_frames - 1) % ft:
            raise ValueError(f"num_frames must be {ft}k + 1 for the Wan VAE, got {num_frames}")
        if height % (fs * ph) or width % (fs * pw):
            raise ValueError(f"height and width must be multiples of {fs * ph}, "
                             f"got {height}x{width}")
        cfg = pipe.scheduler.config
        if shift is None:
            shift = cfg.get("flow_shift", None) or cfg.get("shift", 3.0)
        return cls(latent_shape=(tr.config.in_channels, (num_frames - 1) // ft + 1,
                                 height // fs, width // fs),
                   token_period=fs * ph, shift=float(shift), height=height, width=width,
                   num_frames=num_frames, **options)

    @property
    def do_cfg(self) -> bool:
        """CFG is on above scale 1 (one forward per row otherwise)."""
        return self.guidance_scale > 1.0

    def default_schedule(self) -> dict[str, Any]:
        """kwargs of `branchgrpo.engine.schedule.make_sigmas`: the shifted schedule at ``shift``."""
        return {"kind": "shifted", "shift": self.shift}

    @classmethod
    def schedule_rule(cls, plan: str) -> tuple[str, bool]:
        """(schedule, quantize_timestep) of every plan by default: WanPipeline's UniPC grid and
        the int64 timesteps UniPC hands the transformer."""
        return "diffusers", True

    @classmethod
    def pipeline_grid(cls, scheduler: dict[str, Any], steps: int, height: int, width: int,
                      vae_scale_factor: int, shift: float | None, dynamic: bool) -> Grid:
        """The scheduler config's own grid (`scheduler_grid`)."""
        return scheduler_grid(scheduler, steps, shift, dynamic)

    def encode(self, parts: Parts, prompts: list[str]) -> dict[str, Tensor]:
        """UMT5 embeddings [b, L, 4096] (zero past each prompt's length), + the negative's."""
        pe, ne = parts.pipe.encode_prompt(
            prompt=prompts, negative_prompt=[self.negative_prompt] * len(prompts),
            do_classifier_free_guidance=self.do_cfg, num_videos_per_prompt=1,
            max_sequence_length=self.max_sequence_length, device=parts.device)
        return {"prompt_embeds": pe} | ({"negative_prompt_embeds": ne} if self.do_cfg else {})

    def velocity(self, parts: Parts, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """Guided v [N, C, F, H, W] fp32: u + g (c - u), [cond; uncond] in one forward."""

        def forward(x: Tensor, t: Tensor, emb: Tensor) -> Tensor:
            with parts.autocast():
                return parts.transformer(hidden_states=parts.model_input(x), timestep=t,
                                         encoder_hidden_states=parts.model_input(emb),
                                         return_dict=False)[0]

        uncond = (cond["negative_prompt_embeds"],) if self.do_cfg else None
        return classifier_free(
            forward, x, family_timestep(self, sigma.to(parts.device)), (cond["prompt_embeds"],),
            uncond,
            scale=self.guidance_scale, detach_uncond=self.detach_uncond, uncond_first=False)

    def decode(self, parts: Parts, x0: Tensor) -> Tensor:
        """Videos [N, F, 3, H, W] in [0, 1] from latents x0 [N, C, F', H', W']."""
        vae = parts.pipe.vae
        z = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean, device=parts.device).view(1, z, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=parts.device).view(1, z, 1, 1, 1)
        lat = x0.to(parts.device).float() * std + mean
        return decode_vae(vae, lat, self.decode_batch).permute(0, 2, 1, 3, 4)


FAMILY = WanFamily
"""The registry's family class (`branchgrpo.models.families.family_class`)."""


def build(o: ModelOptions, device: torch.device) -> DiffusersPolicy:
    """The registry's builder: the checkpoint ``o.path`` as a Wan policy on ``device``."""
    return load(WanFamily, o.path, device=device, num_frames=o.num_frames,
                **o.diffusers_kwargs())


def tiny_wan(
    height: int = 16, width: int = 16, num_frames: int = 5, *, seed: int = 0,
    max_sequence_length: int = 8, guidance_scale: float = 5.0, **kw: Any,
) -> tuple[DiffusersPolicy, Any]:
    """A tiny random Wan (2 blocks, 16 latent channels, VAE factors 8 spatial / 4 temporal,
    UMT5 with an offline tokenizer) as (policy, reference WanPipeline with its own transformer
    copy and a shift-1 Euler scheduler). WanPipeline takes no ``sigmas=``: set them with
    `set_pipeline_sigmas`. ``kw``: `WanFamily` options and `compose`'s."""
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
    policy = compose(WanFamily, pipe, height=height, width=width, num_frames=num_frames,
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

"""Z-Image (base and Turbo) as a model family (`ZImageFamily`, composed into a
`DiffusersPolicy`): ZImageTransformer2DModel on VAE latents [16, H/8, W/8] (2x2 patches inside
the transformer), the Qwen3 text encoder (chat template with ``enable_thinking=True``, the
second-to-last hidden state, padding tokens dropped), classifier-free guidance as ZImagePipeline
writes it, and FLUX.1's AutoencoderKL with its scaling and shift factors.

What ZImagePipeline (diffusers 0.42.1) does, and we reproduce:

- grid: ``sigmas = linspace(1, 1/T, T)`` handed to FlowMatchEulerDiscreteScheduler, which
  applies its static ``shift`` (3.0 in the released configs, ``use_dynamic_shifting`` false;
  the pipeline also computes a mu, used only under dynamic shifting);
- timestep: the transformer gets ``(1000 - t) / 1000`` with the scheduler's ``t = 1000
  sigma``, i.e. ``1 - sigma`` (its time runs from noise 0 to data 1);
- sign: the transformer predicts ``x0 - eps``; the pipeline negates it before the Euler step,
  so our ``v = eps - x0`` is minus its (guided) output;
- CFG: ``pos + g (pos - neg)`` (= ``u + (1 + g)(c - u)``), on whenever ``g > 0``, with the
  negative prompt "" and [cond; uncond] in one forward; ``cfg_truncation`` (no CFG on rows
  whose ``1 - sigma`` exceeds it) and ``cfg_normalization`` (the guided output's norm capped
  at that multiple of the conditional one's, per sample) as the pipeline applies them, off
  under its defaults (1.0, False); the base model's card runs ``cfg_normalization=True``.

The text embeddings have one length per prompt (the pipeline passes lists); we keep them
zero-padded to ``max_sequence_length`` with their lengths (``prompt_len``) so they batch and
cache, and hand the transformer the unpadded lists.

Z-Image-Turbo is a distilled few-step model: 8 steps, ``guidance_scale=0`` (diffusers' example;
its model card says 9 steps, guidance 0); see docs/algorithms.md §1.10.
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
    scheduler_mu,
)
from .loading import load
from .testing import tiny_chat_tokenizer, tiny_image_vae

if TYPE_CHECKING:
    from .factory import ModelOptions

ZIMAGE_TURBO = "Tongyi-MAI/Z-Image-Turbo"
ZIMAGE = "Tongyi-MAI/Z-Image"
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
ZIMAGE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The attention projections of every ZImageTransformerBlock (refiners and main layers)."""
TURBO_STEPS = 8
"""Z-Image-Turbo's step count (the ZImagePipeline example of diffusers 0.42.1; the model card
runs 9, one of which it calls a no-op)."""
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}")
"""Qwen3's chat template for one user turn (what the real one renders for ZImagePipeline's
call: ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``)."""
TURBO_CONFIG: dict[str, Any] = {
    # Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json
    "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                  "use_dynamic_shifting": False, "shift": 3.0},
    # Tongyi-MAI/Z-Image-Turbo transformer/config.json (every key; the base model's has the
    # same architecture values)
    "transformer": {"_class_name": "ZImageTransformer2DModel", "all_f_patch_size": [1],
                    "all_patch_size": [2], "axes_dims": [32, 48, 48],
                    "axes_lens": [1536, 512, 512], "cap_feat_dim": 2560, "dim": 3840,
                    "in_channels": 16, "n_heads": 30, "n_kv_heads": 30, "n_layers": 30,
                    "n_refiner_layers": 2, "norm_eps": 1e-05, "qk_norm": True,
                    "rope_theta": 256.0, "t_scale": 1000.0},
    "vae_scale_factor": 8,
    # parameter counts for `branchgrpo plan`'s memory estimate (meta-device builds): Qwen3-4B
    # (Qwen3Model, 36 layers of 2560) and FLUX.1's 16-channel AutoencoderKL
    "params": {"text_encoder": 4_022_468_096, "vae": 83_819_683}}
"""Z-Image-Turbo's released config values (`ZImageFamily.released_configs`)."""
TURBO_SHIFT = 3.0
"""The static shift of Turbo's scheduler; the base Z-Image's ships 6.0."""
RELEASED_CONFIG: dict[str, Any] = {
    # Tongyi-MAI/Z-Image scheduler/scheduler_config.json: static shift 6.0
    "scheduler": {**TURBO_CONFIG["scheduler"], "shift": 6.0},
    "transformer": TURBO_CONFIG["transformer"], "vae_scale_factor": 8,
    "params": TURBO_CONFIG["params"]}
"""The base Z-Image's released config values (`ZImageFamily.released_config`)."""


@dataclass
class ZImageFamily:
    """Z-Image as a `branchgrpo.models.family.Family` (see the module docstring).
    ``guidance_scale`` is the pipeline's ``g`` (CFG on above 0; 5.0 its default, 0 for Turbo);
    ``shift`` defaults to the scheduler config's static shift."""

    pipeline_name: ClassVar[str] = "ZImagePipeline"
    subfolders: ClassVar[tuple[str, ...]] = SUBFOLDERS
    lora_targets: ClassVar[tuple[str, ...]] = ZIMAGE_LORA_TARGETS
    fp32_modules: ClassVar[tuple[str, ...]] = ()
    transformer_class: ClassVar[str] = "ZImageTransformer2DModel"
    released_config: ClassVar[dict[str, Any]] = RELEASED_CONFIG
    released_configs: ClassVar[dict[str, dict[str, Any]]] = {ZIMAGE_TURBO: TURBO_CONFIG}
    """Released configs of other checkpoints of the family, by Hub id (`branchgrpo.spec`
    reads them when ``model.path`` is that id and no config file is at hand)."""
    timestep_scale: ClassVar[float] = 1000.0
    timestep_sigma_max: ClassVar[float] = 1.0
    guidance_kind: ClassVar[str] = "cfg"
    cfg_above: ClassVar[float] = 0.0
    """CFG is on for ``guidance_scale`` above this (ZImagePipeline: any > 0; SD3/Wan: 1)."""
    video: ClassVar[bool] = False
    latent_shape: tuple[int, ...]
    token_period: int
    shift: float
    height: int = 1024
    width: int = 1024
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    max_sequence_length: int = 512
    detach_uncond: bool = False
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0
    quantize_timestep: bool = False
    decode_batch: int = 4

    @classmethod
    def of(cls, pipe: Any, transformer: nn.Module | None = None, *, height: int = 1024,
           width: int = 1024, shift: float | None = None, **options: Any) -> ZImageFamily:
        """The family for ``pipe`` at ``height`` x ``width``; ``options``: the fields above."""
        tr = transformer if transformer is not None else pipe.transformer
        f = pipe.vae_scale_factor
        p = int(tr.config.all_patch_size[0])
        if height % (f * p) or width % (f * p):
            raise ValueError(f"height and width must be multiples of {f * p} for Z-Image "
                             f"(VAE factor {f} x {p}x{p} patches), got {height}x{width}")
        if shift is None:
            shift = float(pipe.scheduler.config.get("shift", 1.0))
        return cls(latent_shape=(tr.config.in_channels, height // f, width // f),
                   token_period=f * p, shift=float(shift), height=height, width=width,
                   **options)

    @property
    def do_cfg(self) -> bool:
        """ZImagePipeline's rule: CFG whenever ``guidance_scale > 0``."""
        return self.guidance_scale > self.cfg_above

    @classmethod
    def schedule_rule(cls, plan: str) -> tuple[str, bool]:
        """(schedule, quantize_timestep) of every plan by default: ZImagePipeline's grid, its
        float timestep."""
        return "diffusers", False

    @classmethod
    def distilled(cls, scheduler: dict[str, Any], transformer: dict[str, Any],
                  ) -> Distilled | None:
        """Z-Image-Turbo when the scheduler is Turbo's (static shift 3.0; the base model's is
        6.0): distilled for 8 steps without CFG."""
        if scheduler.get("use_dynamic_shifting") or scheduler.get("shift") != TURBO_SHIFT:
            return None
        return Distilled("Z-Image-Turbo", TURBO_STEPS, True,
                         f"scheduler shift {TURBO_SHIFT} (Turbo's released scheduler; the base "
                         "Z-Image ships 6.0)")

    @classmethod
    def pipeline_grid(cls, scheduler: dict[str, Any], steps: int, height: int, width: int,
                      vae_scale_factor: int, shift: float | None, dynamic: bool) -> Grid:
        """ZImagePipeline's grid: linspace(1, 1/T, T) through the scheduler's static shift
        (``shift`` overrides it), or its mu of the (H/2f)(W/2f) image tokens under
        ``use_dynamic_shifting``."""
        seq = image_tokens(height, width, 2 * vae_scale_factor)
        if dynamic:
            raise ValueError("rollout.schedule=flux_dynamic is FLUX's schedule, not Z-Image's; "
                             "use diffusers or shifted")
        if scheduler.get("use_dynamic_shifting"):
            mu = scheduler_mu(scheduler, seq)
            return Grid(sch.flux_pipeline(steps, mu=mu), mu=mu, image_seq_len=seq)
        s = shift if shift is not None else float(scheduler.get("shift", 1.0))
        return Grid(sch.flux_pipeline(steps, shift=s), shift=s, image_seq_len=seq)

    def default_schedule(self) -> dict[str, Any]:
        """kwargs of `branchgrpo.engine.schedule.make_sigmas`: the shifted schedule."""
        return {"kind": "shifted", "shift": self.shift}

    def encode(self, parts: Parts, prompts: list[str]) -> dict[str, Tensor]:
        """Qwen3 embeddings [b, max_sequence_length, D] (zero past each prompt's length) and
        the lengths ``prompt_len`` [b]; the negative prompt's too when CFG is on."""
        b = len(prompts)
        pos, neg = parts.pipe.encode_prompt(
            prompt=list(prompts), device=parts.device, do_classifier_free_guidance=self.do_cfg,
            negative_prompt=[self.negative_prompt] * b,
            max_sequence_length=self.max_sequence_length)
        out = dict(zip(("prompt_embeds", "prompt_len"), self._padded(pos), strict=True))
        if self.do_cfg:
            out |= dict(zip(("negative_prompt_embeds", "negative_prompt_len"),
                            self._padded(neg), strict=True))
        return out

    def _padded(self, rows: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-prompt embeddings [L_i, D] -> ([b, max_sequence_length, D], lengths [b])."""
        out = rows[0].new_zeros(len(rows), self.max_sequence_length, rows[0].shape[-1])
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out, torch.tensor([len(r) for r in rows], device=out.device)

    def velocity(self, parts: Parts, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """Guided v = eps - x0 [N, C, H, W] fp32: minus the transformer's guided output, at
        its timestep 1 - sigma ((1000 - 1000 sigma) / 1000, as the pipeline computes it)."""

        def forward(x: Tensor, t: Tensor, emb: Tensor, lens: Tensor) -> Tensor:
            xs = list(parts.model_input(x).unsqueeze(2).unbind(0))
            caps = [parts.model_input(e[:n]) for e, n in zip(emb, lens.tolist(), strict=True)]
            with parts.autocast():
                out = parts.transformer(xs, t, caps, return_dict=False)[0]
            return torch.stack([o.float() for o in out]).squeeze(2)

        t = (1000 - family_timestep(self, sigma.to(parts.device))) / 1000
        emb, lens = cond["prompt_embeds"], cond["prompt_len"]
        if not self.do_cfg:
            return -forward(x, t, emb, lens)
        both = forward(torch.cat([x, x]), torch.cat([t, t]),
                       torch.cat([emb, cond["negative_prompt_embeds"]]),
                       torch.cat([lens, cond["negative_prompt_len"]]))
        pos, neg = both.chunk(2)
        if self.detach_uncond:
            neg = neg.detach()
        return -self._guided(pos, neg, t)

    def _guided(self, pos: Tensor, neg: Tensor, t: Tensor) -> Tensor:
        """ZImagePipeline's guidance of the transformer outputs [N, ...] at its timesteps t
        [N]: ``pos + g (pos - neg)``, g = 0 on rows past ``cfg_truncation``, the norm capped at
        ``cfg_normalization`` x |pos| per row when it is > 0."""
        g = torch.where(t > self.cfg_truncation, 0.0, self.guidance_scale) if (
            self.cfg_truncation <= 1) else torch.full_like(t, self.guidance_scale)
        pred = pos + g.view(-1, *[1] * (pos.dim() - 1)) * (pos - neg)
        if self.cfg_normalization > 0:
            dims = tuple(range(1, pos.dim()))
            cap = torch.linalg.vector_norm(pos, dim=dims) * self.cfg_normalization
            norm = torch.linalg.vector_norm(pred, dim=dims)
            scale = torch.where(norm > cap, cap / norm, torch.ones_like(norm))
            pred = pred * torch.where(g > 0, scale, 1.0).view(-1, *[1] * (pos.dim() - 1))
        return pred

    def decode(self, parts: Parts, x0: Tensor) -> Tensor:
        """Images [N, 3, H, W] in [0, 1] from latents x0 [N, C, H/8, W/8]."""
        vae = parts.pipe.vae
        lat = x0.to(parts.device).float() / vae.config.scaling_factor + vae.config.shift_factor
        return decode_vae(vae, lat, self.decode_batch)


FAMILY = ZImageFamily
"""The registry's family class (`branchgrpo.models.families.family_class`)."""


def build(o: ModelOptions, device: torch.device) -> DiffusersPolicy:
    """The registry's builder: the checkpoint ``o.path`` as a Z-Image policy on ``device``."""
    return load(ZImageFamily, o.path, device=device, **o.diffusers_kwargs())


def tiny_zimage_parts(seed: int = 0, vae: nn.Module | None = None) -> dict[str, Any]:
    """Tiny random ZImagePipeline components: a 1+1+1-layer ZImageTransformer2DModel (dim 32,
    2 heads, the released patch 2, qk_norm, rope_theta, t_scale), a 2-layer Qwen3 (hidden 32)
    with `tiny_chat_tokenizer` and Qwen3's template, and ``vae`` (default: `tiny_image_vae`,
    16 channels, factor 2)."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tr = TURBO_CONFIG["transformer"]
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=tuple(tr["all_patch_size"]), all_f_patch_size=tuple(tr["all_f_patch_size"]),
        in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, norm_eps=tr["norm_eps"], qk_norm=tr["qk_norm"], cap_feat_dim=32,
        rope_theta=tr["rope_theta"], t_scale=tr["t_scale"], axes_dims=[4, 6, 6],
        axes_lens=[256, 64, 64])
    torch.manual_seed(seed)
    text = Qwen3Model(Qwen3Config(
        vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
        pad_token_id=0, bos_token_id=2, eos_token_id=3)).eval()
    return dict(transformer=transformer, text_encoder=text,
                vae=vae if vae is not None else tiny_image_vae(16, seed),
                tokenizer=tiny_chat_tokenizer(QWEN3_CHAT_TEMPLATE))


def tiny_zimage(height: int = 16, width: int = 16, *, seed: int = 0,
                max_sequence_length: int = 64, guidance_scale: float = 5.0, **kw: Any,
                ) -> tuple[DiffusersPolicy, Any]:
    """A tiny random Z-Image (`tiny_zimage_parts`, VAE factor 2) as (policy, reference
    ZImagePipeline with its own transformer copy and a shift-1 static Euler scheduler, which
    follows any ``sigmas=`` unchanged; the policy's default schedule has shift 3). ``kw``:
    `ZImageFamily` options and `compose`'s (lora, full_finetune, dtype, ...)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    parts = tiny_zimage_parts(seed)
    transformer = parts.pop("transformer")
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=1.0)
    ref = ZImagePipeline(transformer=copy.deepcopy(transformer), **parts)
    pipe = ZImagePipeline(transformer=transformer, **parts)
    kw.setdefault("shift", 3.0)
    policy = compose(ZImageFamily, pipe, height=height, width=width,
                     guidance_scale=guidance_scale, max_sequence_length=max_sequence_length, **kw)
    return policy, ref

"""Qwen-Image text-to-image as a model family (`QwenImageFamily`, composed into a
`DiffusersPolicy`), reproducing diffusers 0.42's ``QwenImagePipeline`` under its defaults:
QwenImageTransformer2DModel (MMDiT, 60 double-stream blocks) on 2x2-packed latent tokens, the
Qwen2.5-VL text encoder (its last hidden state under the pipeline's chat template, whose first
34 tokens, the system prompt, are dropped), true classifier-free guidance with the pipeline's
norm rescaling, and AutoencoderKLQwenImage (a causal Wan-style VAE, one frame) with its
per-channel latent mean / std.

Latents are the packed tokens the transformer sees: ``latent_shape = (S, 64)``, ``S = (H / 16)
(W / 16)`` (VAE factor 8, 2x2 packing; 1328 px -> (6889, 64)). The transformer gets
``timestep = sigma`` (the pipeline passes the scheduler's ``1000 sigma`` / 1000) and, for the
text, ``encoder_hidden_states_mask``: prompt embeddings vary in length, so `encode` pads every
prompt's rows to ``max_sequence_length`` (the pipeline's 512) with a mask, and `velocity` trims
the batch to its longest prompt and drops an all-ones mask, as the pipeline's own batching does.

Guidance, as in the pipeline: CFG runs only with ``guidance_scale`` (``true_cfg_scale``, 4.0)
> 1 **and** a ``negative_prompt``; the pipeline's default has none, so it samples one
conditional forward per step, and so does this family by default. With CFG the guided
prediction ``u + g (c - u)`` is rescaled per token to the conditional's norm,
``comb * |c| / |comb|`` (``norm_rescale``; False gives plain CFG). ``build`` maps
``model.guidance``: above 1 it turns on the model card's CFG (that scale, negative prompt
``" "``); at or below 1 it is the pipeline's default (no CFG).

The pipeline's schedule (`pipeline_grid`, ``rollout.schedule=diffusers``) is
``linspace(1, 1/T, T)`` under the scheduler's exponential time shift of ``mu`` (linear in the
image tokens between the checkpoint's base/max shift 0.5 / 0.9 at 256 / 8192 tokens),
stretched so the last sigma is ``shift_terminal`` 0.02, then 0. The schedule rule follows
FLUX's (``schedule_rule``): the FastVideo plans (DanceGRPO, BranchGRPO, MixGRPO, G2RPO) get
the FastVideo repos' shifted linspace (shift 3, DanceGRPO's Qwen-Image setting,
docs/algorithms.md §2.2) and ``int(1000 sigma) / 1000`` (as the DanceGRPO-based Qwen-Image
trainer CodeGoat24/Pref-GRPO fastvideo/train_qwenimage.py feeds it); Flow-GRPO gets the
pipeline's grid and ``sigma``. Qwen-Image-Edit (image conditioning) is not covered.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..engine import schedule as sch
from .base import Cond
from .diffusers_policy import DiffusersPolicy, compose
from .family import Grid, Parts, decode_vae, family_timestep, image_tokens, scheduler_mu
from .flux import FASTVIDEO_PLANS, unpack
from .loading import load
from .lora import JOINT_ATTENTION_TARGETS
from .testing import REPLICAS

if TYPE_CHECKING:
    from .factory import ModelOptions

QWEN_IMAGE = "Qwen/Qwen-Image"
SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
MODEL_CARD_NEGATIVE = " "
"""The negative prompt the Qwen-Image model card passes ("using an empty string if you do not
have specific concept to remove"); `build` uses it when ``model.guidance`` > 1."""
RELEASED_CONFIG: dict[str, Any] = {
    "scheduler": REPLICAS["qwenimage"]["scheduler/scheduler_config.json"],
    "transformer": REPLICAS["qwenimage"]["transformer/config.json"], "vae_scale_factor": 8,
    # parameters counted on the meta device from the released configs: Qwen2.5-VL-7B (its
    # 677M vision tower included), AutoencoderKLQwenImage; the transformer is 20.43B
    "params": {"text_encoder": 8_292_166_656, "vae": 126_892_531}}
"""Qwen/Qwen-Image's scheduler and transformer configs (every key of the released files, in
`branchgrpo.models.testing.REPLICAS`), its VAE factor (2 ** len(temperal_downsample)) and the
frozen components' sizes."""
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, "
                   "texture, quantity, text, spatial relationships of the objects and "
                   "background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                   "<|im_start|>assistant\n")
"""QwenImagePipeline.prompt_template_encode (its first 34 tokens are dropped): the tiny
tokenizer is trained on it, so it drops exactly the system prompt there too."""


def pad_rows(emb: Tensor, mask: Tensor | None, length: int) -> tuple[Tensor, Tensor]:
    """Prompt embeddings [b, L, D] and their mask [b, L] (None: all valid) padded with zero
    rows / mask 0, or cut, to [b, length, D] and [b, length] (int64)."""
    b, n, d = emb.shape
    m = (torch.ones(b, n, dtype=torch.long, device=emb.device) if mask is None
         else mask.to(torch.long))
    if n >= length:
        return emb[:, :length], m[:, :length]
    return (torch.cat([emb, emb.new_zeros(b, length - n, d)], 1),
            torch.cat([m, m.new_zeros(b, length - n)], 1))


def trim_rows(emb: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """Padded rows [N, L, D] / mask [N, L] cut to the longest prompt of the batch; the mask is
    None when every kept row is valid (what QwenImagePipeline.encode_prompt hands over)."""
    n = max(int(mask.sum(1).max()), 1)
    emb, mask = emb[:, :n], mask[:, :n]
    return emb, (None if bool(mask.all()) else mask)


@dataclass
class QwenImageFamily:
    """Qwen-Image as a `branchgrpo.models.family.Family` (see the module docstring).
    ``guidance_scale`` is the pipeline's ``true_cfg_scale``; CFG is on when it is > 1 and
    ``negative_prompt`` is not None; ``norm_rescale`` the pipeline's rescaling of the guided
    prediction; ``detach_uncond``: no gradient through the unconditional rows; ``shift``: the
    shifted linspace of `default_schedule` (the FastVideo repos' 3)."""

    pipeline_name: ClassVar[str] = "QwenImagePipeline"
    subfolders: ClassVar[tuple[str, ...]] = SUBFOLDERS
    lora_targets: ClassVar[tuple[str, ...]] = JOINT_ATTENTION_TARGETS
    fp32_modules: ClassVar[tuple[str, ...]] = ()
    transformer_class: ClassVar[str] = "QwenImageTransformer2DModel"
    released_config: ClassVar[dict[str, Any]] = RELEASED_CONFIG
    timestep_scale: ClassVar[float] = 1.0
    timestep_sigma_max: ClassVar[float] = 1.0
    guidance_kind: ClassVar[str] = "true_cfg"
    video: ClassVar[bool] = False
    latent_shape: tuple[int, ...]
    token_period: int
    latent_hw: tuple[int, int]
    height: int = 1024
    width: int = 1024
    guidance_scale: float = 4.0
    negative_prompt: str | None = None
    norm_rescale: bool = True
    max_sequence_length: int = 512
    detach_uncond: bool = False
    quantize_timestep: bool = False
    shift: float = 3.0
    decode_batch: int = 4

    @classmethod
    def of(cls, pipe: Any, transformer: nn.Module | None = None, *, height: int = 1024,
           width: int = 1024, **options: Any) -> QwenImageFamily:
        """The family for ``pipe`` at ``height`` x ``width`` (multiples of 16); ``options``:
        the fields above."""
        tr = transformer if transformer is not None else pipe.transformer
        f = pipe.vae_scale_factor
        p = tr.config.patch_size
        if height % (p * f) or width % (p * f):
            raise ValueError(f"height and width must be multiples of {p * f} for Qwen-Image "
                             f"(VAE factor {f} x {p}x{p} packing), got {height}x{width}")
        seq = (height // (p * f)) * (width // (p * f))
        return cls(latent_shape=(seq, tr.config.in_channels), token_period=p * f,
                   latent_hw=(height // f, width // f), height=height, width=width, **options)

    @property
    def do_cfg(self) -> bool:
        """QwenImagePipeline's ``do_true_cfg``: scale > 1 and a negative prompt given."""
        return self.guidance_scale > 1.0 and self.negative_prompt is not None

    @classmethod
    def schedule_rule(cls, plan: str) -> tuple[str, bool]:
        """(schedule, quantize_timestep) of ``plan`` by default: the FastVideo repos' shifted
        linspace and int(1000 sigma) / 1000 for their plans (as DanceGRPO's Qwen-Image code),
        else QwenImagePipeline's grid and sigma."""
        return ("shifted", True) if plan in FASTVIDEO_PLANS else ("diffusers", False)

    @classmethod
    def pipeline_grid(cls, scheduler: dict[str, Any], steps: int, height: int, width: int,
                      vae_scale_factor: int, shift: float | None, dynamic: bool) -> Grid:
        """QwenImagePipeline's grid (`branchgrpo.engine.schedule.qwen_image_pipeline`): the
        dynamic mu of the (H/2f)(W/2f) image tokens with the config's base/max shift and seq
        lens (``use_dynamic_shifting`` or ``dynamic``), else the static ``shift``; the config's
        ``time_shift_type`` and ``shift_terminal``."""
        seq = image_tokens(height, width, 2 * vae_scale_factor)
        kw = {"time_shift_type": scheduler.get("time_shift_type", "exponential"),
              "shift_terminal": scheduler.get("shift_terminal")}
        if dynamic or scheduler.get("use_dynamic_shifting"):
            if shift is not None:
                raise ValueError("rollout.shift is not used by Qwen-Image's dynamic schedule "
                                 "(mu from the image size); remove it, or set "
                                 "rollout.schedule=shifted")
            mu = scheduler_mu(scheduler, seq)
            return Grid(sch.qwen_image_pipeline(steps, mu=mu, **kw), mu=mu, image_seq_len=seq)
        s = shift if shift is not None else float(scheduler.get("shift", 1.0))
        return Grid(sch.qwen_image_pipeline(steps, shift=s, **kw), shift=s, image_seq_len=seq)

    def default_schedule(self) -> dict[str, Any]:
        """kwargs of `branchgrpo.engine.schedule.make_sigmas` (add num_steps): the FastVideo
        repos' shifted linspace at ``shift`` (make_sigmas has no QwenImagePipeline grid:
        `branchgrpo.spec.resolve` takes that from `pipeline_grid`)."""
        return {"kind": "shifted", "shift": self.shift}

    def encode(self, parts: Parts, prompts: list[str]) -> dict[str, Tensor]:
        """Qwen2.5-VL embeddings [b, max_sequence_length, D] and their masks [b, L] (the
        pipeline's ``encode_prompt``, padded), + the negative prompt's when CFG is on."""
        pipe = parts.pipe

        def rows(texts: list[str]) -> tuple[Tensor, Tensor]:
            emb, mask = pipe.encode_prompt(prompt=texts, device=parts.device,
                                           max_sequence_length=self.max_sequence_length)
            return pad_rows(emb, mask, self.max_sequence_length)

        emb, mask = rows(prompts)
        out = {"prompt_embeds": emb, "prompt_embeds_mask": mask}
        if self.do_cfg:
            ne, nm = rows([self.negative_prompt])
            out |= {"negative_prompt_embeds": ne.expand(len(prompts), -1, -1),
                    "negative_prompt_embeds_mask": nm.expand(len(prompts), -1)}
        return out

    def _forward(self, parts: Parts, x: Tensor, t: Tensor, emb: Tensor, mask: Tensor) -> Tensor:
        """The transformer's prediction [N, S, 64] at packed x [N, S, 64], timestep t [N]."""
        emb, m = trim_rows(emb, mask)
        h, w = self.latent_hw
        with parts.autocast():
            return parts.transformer(
                hidden_states=parts.model_input(x), timestep=parts.model_input(t),
                encoder_hidden_states=parts.model_input(emb),
                encoder_hidden_states_mask=None if m is None else m.to(parts.device),
                img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0], return_dict=False)[0]

    def velocity(self, parts: Parts, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """Guided v [N, S, 64] fp32 at packed latents x [N, S, 64], sigma [N]: the conditional
        prediction, or with CFG ``comb = u + g (c - u)`` rescaled to ``comb |c| / |comb|`` per
        token (``norm_rescale``), [cond; uncond] in one forward (the pipeline runs two)."""
        t = family_timestep(self, sigma.to(parts.device))
        emb, mask = cond["prompt_embeds"], cond["prompt_embeds_mask"]
        if not self.do_cfg:
            return self._forward(parts, x, t, emb, mask).float()
        out = self._forward(parts, torch.cat([x, x]), torch.cat([t, t]),
                            torch.cat([emb, cond["negative_prompt_embeds"]]),
                            torch.cat([mask, cond["negative_prompt_embeds_mask"]])).float()
        c, u = out.chunk(2)
        if self.detach_uncond:
            u = u.detach()
        comb = u + self.guidance_scale * (c - u)
        if not self.norm_rescale:
            return comb
        return comb * (c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))

    def decode(self, parts: Parts, x0: Tensor) -> Tensor:
        """Images [N, 3, H, W] in [0, 1] from packed latents x0 [N, S, 64]: unpacked to one
        frame [N, 16, 1, H/8, W/8], un-normalised as the pipeline does (``x / (1 / std) +
        mean`` in the VAE's dtype), decoded in chunks of ``decode_batch``."""
        vae = parts.pipe.vae
        z = vae.config.z_dim
        lat = unpack(x0.to(parts.device).float(), *self.latent_hw).unsqueeze(2).to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(lat.device,
                                                                          lat.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(lat.device,
                                                                                   lat.dtype)
        return decode_vae(vae, lat / inv_std + mean, self.decode_batch)[:, :, 0]


FAMILY = QwenImageFamily
"""The registry's family class (`branchgrpo.models.families.family_class`)."""


def build(o: ModelOptions, device: torch.device) -> DiffusersPolicy:
    """The registry's builder: the checkpoint ``o.path`` as a Qwen-Image policy on ``device``;
    ``model.guidance`` > 1 turns on the model card's CFG (negative prompt " ")."""
    negative = MODEL_CARD_NEGATIVE if (o.guidance or 0.0) > 1.0 else None
    return load(QwenImageFamily, o.path, device=device, negative_prompt=negative,
                **o.diffusers_kwargs())


# ---- tiny components (tests): an offline Qwen2 tokenizer, Qwen2.5-VL, VAE, transformer ----
def tiny_qwen_tokenizer() -> Any:
    """A byte-level BPE Qwen2Tokenizer trained in memory (no download) on the pipeline's
    prompt template: every template word is one token, so the template's system prompt is 34
    tokens as with the real vocabulary; any other text falls back to byte tokens. Specials:
    <|endoftext|> 0 (pad), <|im_start|> 1, <|im_end|> 2; vocab < 384."""
    from tokenizers import pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Qwen2Tokenizer(vocab={specials[0]: 0}, merges=[])._tokenizer
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=1, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator([PROMPT_TEMPLATE.format("")], trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, model_max_length=131072)
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tok


def tiny_qwen_encoder(hidden: int = 32, seed: int = 0) -> Any:
    """A random Qwen2_5_VLForConditionalGeneration (2 text layers of width ``hidden``, GQA,
    mrope as released; a 1-block vision tower the text-to-image path never runs) matching
    `tiny_qwen_tokenizer`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}
    text = dict(vocab_size=384, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                rms_norm_eps=1e-6, rope_theta=1e6, **ids,
                rope_scaling={"type": "mrope", "rope_type": "default",
                              "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                  out_hidden_size=hidden, fullatt_block_indexes=[0])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=380,
                           video_token_id=381, vision_start_token_id=382,
                           vision_end_token_id=383, **ids)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def tiny_qwen_vae(seed: int = 0) -> Any:
    """A random AutoencoderKLQwenImage (widths 4, one res block per level) with the released
    z_dim, temporal layout (spatial factor 8) and latents mean / std."""
    from diffusers import AutoencoderKLQwenImage

    vae = REPLICAS["qwenimage"]["vae/config.json"]
    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=4, z_dim=vae["z_dim"], dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=vae["temperal_downsample"], latents_mean=vae["latents_mean"],
        latents_std=vae["latents_std"]).eval()


def replica_parts(seed: int = 0) -> dict[str, Any]:
    """The tiny components of the Qwen-Image replica pipeline (`branchgrpo.models.testing.
    write_replica_pipeline`): a 2-block transformer with the released patch size, channels
    (64 in, 16 out) and no guidance embedding, text width 32, plus the tiny tokenizer, text
    encoder and VAE."""
    from diffusers import QwenImageTransformer2DModel

    tr = REPLICAS["qwenimage"]["transformer/config.json"]
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=tr["patch_size"], in_channels=tr["in_channels"],
        out_channels=tr["out_channels"], num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, guidance_embeds=tr["guidance_embeds"],
        axes_dims_rope=(4, 6, 6))
    return dict(transformer=transformer, vae=tiny_qwen_vae(seed),
                text_encoder=tiny_qwen_encoder(32, seed), tokenizer=tiny_qwen_tokenizer())


def tiny_qwenimage(height: int = 32, width: int = 32, *, seed: int = 0,
                   max_sequence_length: int = 16, **kw: Any) -> tuple[DiffusersPolicy, Any]:
    """A tiny random Qwen-Image (`replica_parts`) as (policy, reference QwenImagePipeline with
    its own transformer copy). As `tiny_flux`'s, its scheduler (shift 1, no dynamic shift, no
    terminal stretch) follows any ``sigmas=`` passed to it unchanged; the replica checkpoint
    has the released one. ``kw``: `QwenImageFamily` options and `compose`'s (lora,
    full_finetune, dtype, ...)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    parts = replica_parts(seed)
    transformer = parts.pop("transformer")
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    ref = QwenImagePipeline(transformer=copy.deepcopy(transformer), **parts)
    pipe = QwenImagePipeline(transformer=transformer, **parts)
    policy = compose(QwenImageFamily, pipe, height=height, width=width,
                     max_sequence_length=max_sequence_length, **kw)
    return policy, ref

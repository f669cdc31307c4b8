"""Wan image-to-video through WanImageToVideoPipeline as a model family (`WanI2VFamily`):
Wan2.2-I2V-A14B (two experts switched at ``boundary_ratio`` 0.9, no image encoder) and
Wan2.1-I2V-14B (one transformer with a CLIP image encoder, ``image_dim`` 1280). One family per
pipeline class, as ``model.kind`` is everywhere: what the checkpoint holds (``transformer_2``,
``image_encoder``) switches the behaviour, as in the pipeline.

The first frame is the condition. Each prompt's image comes from ``model.images``, a text file
of ``prompt<TAB>image path`` lines (paths relative to that file; `read_images`), checked for
every training and held-out prompt before a run starts (`check_prompts`); rewards see the
prompt text alone. `encode` builds what WanImageToVideoPipeline builds, with its own
``video_processor.preprocess`` and ``prepare_latents``: the VAE latents (argmax, normalised) of
the image followed by zero frames, behind a 4-channel first-frame mask, ``condition`` [20, F',
H', W'] (16 + 4 channels of the Wan2.1 VAE), concatenated to the noisy latents on the channel
axis at every forward (36 transformer input channels); with an image encoder also its
penultimate hidden states, ``image_embeds`` [257, 1280]. The policy's latents are the 16 noisy
channels. TI2V-5B's image mode (``expand_timesteps``: the condition replaces the first latent
frame, whose tokens get timestep 0) is not supported here.

Released values: the diffusers conversion script that wrote the ``-Diffusers`` checkpoints
(``scripts/convert_wan_to_diffusers.py``: the ``Wan2.2-I2V-14B-720p`` and ``Wan-I2V-14B-480p``
transformer configs, UniPC ``flow_shift`` 3.0, ``boundary_ratio`` 0.9 for Wan2.2 I2V).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .base import Cond
from .diffusers_policy import DiffusersPolicy
from .family import Parts
from .loading import DTYPES, load_pipeline
from .wan import SUBFOLDERS
from .wan22 import A14B_TRANSFORMER, UNIPC, Wan22Family, compose_wan22, tiny_wan_transformer

if TYPE_CHECKING:
    from .factory import ModelOptions

I2V_A14B = "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
I2V_14B_480P = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
RELEASED: dict[str, dict[str, Any]] = {
    I2V_A14B: {"scheduler": {**UNIPC, "flow_shift": 3.0},
               "transformer": {**A14B_TRANSFORMER, "in_channels": 36}, "vae_scale_factor": 8,
               "params": {"text_encoder": 5_680_910_336, "vae": 126_892_531},
               "model_index": {"_class_name": "WanImageToVideoPipeline", "boundary_ratio": 0.9,
                               "expand_timesteps": False}},
    I2V_14B_480P: {"scheduler": {**UNIPC, "flow_shift": 3.0},
                   "transformer": {**A14B_TRANSFORMER, "in_channels": 36, "image_dim": 1280,
                                   "added_kv_proj_dim": 5120},
                   "vae_scale_factor": 8,
                   # + the CLIP ViT-H/14 vision tower (CLIPVisionModel, 32 layers of 1280)
                   "params": {"text_encoder": 5_680_910_336, "image_encoder": 630_766_080,
                              "vae": 126_892_531},
                   "model_index": {"_class_name": "WanImageToVideoPipeline",
                                   "boundary_ratio": None, "expand_timesteps": False}},
}
"""The released WanImageToVideoPipeline checkpoints' config values, by Hub id (every key of
their ``transformer/config.json``)."""


def read_images(path: str | Path) -> dict[str, str]:
    """``{prompt: image path}`` of a ``prompt<TAB>image path`` file (relative paths against the
    file's folder; blank lines skipped); ValueError naming the line otherwise."""
    if not path:
        raise ValueError("model.kind=wan_i2v needs model.images: a file of 'prompt<TAB>image "
                         "path' lines, the first frame of each prompt's video")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"model.images file {str(p)!r} not found")
    out: dict[str, str] = {}
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        prompt, tab, image = line.rpartition("\t")
        if not tab or not prompt.strip() or not image.strip():
            raise ValueError(f"line {i} of model.images {str(p)!r} is not 'prompt<TAB>image "
                             "path'")
        out[prompt.strip()] = str((p.parent / image.strip()).resolve())
    return out


@dataclass
class WanI2VFamily(Wan22Family):
    """Wan I2V as a `branchgrpo.models.family.Family`: `Wan22Family`'s experts, CFG and
    decoding; ``encode`` adds each prompt's image condition (``images``: prompt -> path)."""

    pipeline_name: ClassVar[str] = "WanImageToVideoPipeline"
    subfolders: ClassVar[tuple[str, ...]] = SUBFOLDERS
    optional_subfolders: ClassVar[tuple[str, ...]] = ("transformer_2", "image_encoder",
                                                      "image_processor")
    released_config: ClassVar[dict[str, Any]] = RELEASED[I2V_A14B]
    released_configs: ClassVar[dict[str, dict[str, Any]]] = RELEASED
    images: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, pipe: Any, transformer: nn.Module | None = None, **options: Any,
           ) -> WanI2VFamily:
        """`Wan22Family.of`, with the VAE's channels (the noisy latents) in ``latent_shape``."""
        if pipe.config.get("expand_timesteps"):
            raise ValueError("TI2V-5B's image mode (expand_timesteps) is not supported by "
                             "model.kind=wan_i2v; train it as text-to-video (model.kind=wan22)")
        fam = super().of(pipe, transformer, **options)
        return dataclasses.replace(fam, latent_shape=(pipe.vae.config.z_dim,
                                                      *fam.latent_shape[1:]))

    @classmethod
    def prompt_check(cls, images: str) -> Callable[[str], None]:
        """A check that a prompt has a readable image in the ``model.images`` file
        (`branchgrpo.preflight`); ValueError for the file itself."""
        table = read_images(images)

        def check(prompt: str) -> None:
            if prompt not in table:
                raise ValueError(f"model.images {images!r} has no image for this prompt")
            if not Path(table[prompt]).is_file():
                raise ValueError(f"its image {table[prompt]!r} (model.images) is missing")

        return check

    def encode(self, parts: Parts, prompts: list[str]) -> dict[str, Tensor]:
        """`WanFamily.encode`'s text embeddings, + ``condition`` [b, 20, F', H', W'] and, with
        an image encoder, ``image_embeds`` [b, 257, D] of each prompt's image."""
        out = self._text(parts, prompts)
        rows = [self._condition(parts, p) for p in prompts]
        out["condition"] = torch.cat([c for c, _ in rows])
        if rows[0][1] is not None:
            out["image_embeds"] = torch.cat([e for _, e in rows])
        return out

    def _text(self, parts: Parts, prompts: list[str]) -> dict[str, Tensor]:
        """UMT5 embeddings [b, L, 4096] of the prompts (+ the negative's) by WanPipeline's
        ``_get_t5_prompt_embeds`` on this pipeline's tokenizer and encoder: the same code as
        WanImageToVideoPipeline's copy, which in diffusers 0.42 calls ``ftfy`` without
        checking that it is installed (identical results when it is)."""
        from diffusers import WanPipeline

        def embed(texts: list[str]) -> Tensor:
            return WanPipeline._get_t5_prompt_embeds(
                parts.pipe, prompt=texts, num_videos_per_prompt=1,
                max_sequence_length=self.max_sequence_length, device=parts.device)

        out = {"prompt_embeds": embed(prompts)}
        if self.do_cfg:
            out["negative_prompt_embeds"] = embed([self.negative_prompt] * len(prompts))
        return out

    def _condition(self, parts: Parts, prompt: str) -> tuple[Tensor, Tensor | None]:
        """WanImageToVideoPipeline's condition [1, 20, F', H', W'] and image embeddings of the
        prompt's image (its preprocess, prepare_latents and encode_image)."""
        from diffusers.utils import load_image

        if prompt not in self.images:
            raise ValueError(f"no image for prompt {prompt!r} in model.images")
        pipe, image = parts.pipe, load_image(self.images[prompt])
        x = pipe.video_processor.preprocess(image, height=self.height, width=self.width).to(
            parts.device, dtype=torch.float32)
        _, cond = pipe.prepare_latents(
            x, 1, pipe.vae.config.z_dim, self.height, self.width, self.num_frames,
            torch.float32, parts.device, None, torch.zeros(1, *self.latent_shape))
        has_clip = pipe.transformer.config.image_dim is not None  # (unwrapped: DDP/FSDP)
        return cond, (pipe.encode_image(image, parts.device) if has_clip else None)

    def shared_inputs(self, cond: Cond) -> tuple[Tensor, ...]:
        """(condition, [image_embeds]) rows, the same in both CFG halves."""
        return (cond["condition"], *((cond["image_embeds"],) if "image_embeds" in cond else ()))

    def model_inputs(self, parts: Parts, x: Tensor, shared: tuple[Tensor, ...],
                     ) -> dict[str, Tensor]:
        """[noisy latents; condition] on the channel axis, and the image embeddings."""
        kw = {"hidden_states": parts.model_input(torch.cat([x, shared[0]], dim=1))}
        if len(shared) > 1:
            kw["encoder_hidden_states_image"] = parts.model_input(shared[1])
        return kw


FAMILY = WanI2VFamily
"""The registry's family class (`branchgrpo.models.families.family_class`)."""


def build(o: ModelOptions, device: torch.device) -> DiffusersPolicy:
    """The registry's builder: the checkpoint ``o.path`` as a Wan I2V policy on ``device``,
    the images of ``o.images``."""
    kw = o.diffusers_kwargs()
    pipe = load_pipeline(WanI2VFamily, o.path, DTYPES[o.dtype], quantize=kw.pop("quantize"),
                         components=kw.pop("components"))
    if getattr(pipe, "image_encoder", None) is not None:
        pipe.image_encoder.requires_grad_(False).eval().to(device)
    return compose_wan22(pipe, family_cls=WanI2VFamily, experts=o.experts, device=device,
                         num_frames=o.num_frames, guidance_scale_2=o.guidance_2,
                         images=read_images(o.images), **kw)


def tiny_wan_i2v_parts(seed: int = 0, clip: bool = False) -> dict[str, Any]:
    """WanImageToVideoPipeline components of a tiny random Wan2.2-I2V-A14B (two 2-block
    transformers with 36 input channels, ``boundary_ratio`` 0.9) or with ``clip`` Wan2.1-I2V-14B
    (one transformer with ``image_dim`` and ``added_kv_proj_dim``, a 2-layer CLIP vision
    encoder and its image processor at 32 px); the Wan2.1 VAE."""
    from diffusers import AutoencoderKLWan

    from .testing import tiny_t5_encoder, tiny_t5_tokenizer

    rel = RELEASED[I2V_14B_480P if clip else I2V_A14B]
    tr = rel["transformer"]
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()

    def transformer(s: int) -> nn.Module:
        return tiny_wan_transformer(tr, s, image_dim=32 if clip else None,
                                    added_kv_proj_dim=24 if clip else None)

    parts = dict(transformer=transformer(seed), vae=vae,
                 text_encoder=tiny_t5_encoder(32, True, seed), tokenizer=tiny_t5_tokenizer(512),
                 boundary_ratio=rel["model_index"]["boundary_ratio"],
                 expand_timesteps=rel["model_index"]["expand_timesteps"])
    if clip:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        torch.manual_seed(seed)
        parts["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8)).eval()
        parts["image_processor"] = CLIPImageProcessor(size={"shortest_edge": 32},
                                                      crop_size={"height": 32, "width": 32})
    else:
        parts["transformer_2"] = transformer(seed + 1)
    return parts

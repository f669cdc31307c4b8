"""Wan2.2 text-to-video through WanPipeline as a model family (`Wan22Family`, a `WanFamily`
with what Wan2.2's checkpoints switch on in ``model_index.json``):

- TI2V-5B (``expand_timesteps: true``): one WanTransformer3DModel on the 48-channel VAE
  (spatial factor 16: AutoencoderKLWan with ``patch_size`` 2, ``is_residual``), fed per-token
  timesteps [N, F' (H'/2) (W'/2)] as WanPipeline builds them (all equal in text-to-video).
- T2V-A14B (``boundary_ratio: 0.875``): a mixture of two experts, ``transformer`` (high
  noise, timesteps >= ``boundary_ratio * num_train_timesteps``) and ``transformer_2`` (low
  noise) with its own CFG scale ``guidance_scale_2`` (null: ``guidance_scale``). Both sit in one
  `WanExperts` module (the policy's ``transformer``: checkpoints, DDP and the optimizer see
  both); ``model.experts`` says which train (the others stay frozen, without LoRA). A LoRA run
  writes one diffusers LoRA per trained expert: ``lora/`` for ``transformer``,
  ``lora/transformer_2/`` for the low-noise expert (``pipe.load_lora_weights(...,
  load_into_transformer_2=True)``).

Released values from the diffusers conversion script that wrote the ``-Diffusers`` checkpoints
(``scripts/convert_wan_to_diffusers.py``: transformer configs, ``vae22_diffusers_config``,
UniPC ``flow_shift`` 5.0 for TI2V and 3.0 otherwise, ``boundary_ratio`` 0.875 for T2V-A14B).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .base import Cond
from .diffusers_policy import DiffusersPolicy, compose
from .family import Parts, classifier_free, family_timestep
from .loading import DTYPES, cast_weights, load_pipeline, weight_dtype
from .testing import tiny_t5_encoder, tiny_t5_tokenizer
from .wan import SUBFOLDERS, WanFamily

if TYPE_CHECKING:
    from .factory import ModelOptions

TI2V_5B = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
T2V_A14B = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
UNIPC = {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True,
          "prediction_type": "flow_prediction", "final_sigmas_type": "zero",
          "num_train_timesteps": 1000, "solver_order": 2, "predict_x0": True,
          "solver_type": "bh2", "lower_order_final": True, "timestep_spacing": "linspace"}
TI2V_5B_TRANSFORMER: dict[str, Any] = {
    "_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
    "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 14336, "freq_dim": 256,
    "image_dim": None, "in_channels": 48, "num_attention_heads": 24, "num_layers": 30,
    "out_channels": 48, "patch_size": [1, 2, 2], "pos_embed_seq_len": None,
    "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096}
"""Every key of TI2V-5B's ``transformer/config.json`` (WanTransformer3DModel's arguments)."""
A14B_TRANSFORMER: dict[str, Any] = {**TI2V_5B_TRANSFORMER, "ffn_dim": 13824, "in_channels": 16,
                                    "num_attention_heads": 40, "num_layers": 40,
                                    "out_channels": 16}
"""T2V-A14B's ``transformer/config.json`` (and ``transformer_2/``: the same shape)."""
TI2V_5B_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKLWan", "base_dim": 160, "decoder_base_dim": 256, "z_dim": 48,
    "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "temperal_downsample": [False, True, True],
    "is_residual": True, "in_channels": 12, "out_channels": 12, "patch_size": 2,
    "scale_factor_temporal": 4, "scale_factor_spatial": 16,
    "latents_mean": [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
                     -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
                     -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
                     -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
                     -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
                     0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667],
    "latents_std": [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158,
                    1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523,
                    0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659, 0.7069, 0.5338, 0.4889,
                    0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444,
                    0.4089, 0.7468, 0.7744]}
"""TI2V-5B's ``vae/config.json`` (the Wan2.2 VAE: 48 channels, 4 x 16 x 16 compression)."""
RELEASED: dict[str, dict[str, Any]] = {
    TI2V_5B: {"scheduler": {**UNIPC, "flow_shift": 5.0}, "transformer": TI2V_5B_TRANSFORMER,
              "vae_scale_factor": 16,
              # UMT5-XXL encoder (Wan2.1's) and the 48-channel Wan2.2 VAE (meta-device count)
              "params": {"text_encoder": 5_680_910_336, "vae": 704_688_668},
              "model_index": {"_class_name": "WanPipeline", "boundary_ratio": None,
                              "expand_timesteps": True}},
    T2V_A14B: {"scheduler": {**UNIPC, "flow_shift": 3.0}, "transformer": A14B_TRANSFORMER,
               "vae_scale_factor": 8,
               "params": {"text_encoder": 5_680_910_336, "vae": 126_892_531},  # Wan2.1's VAE
               "model_index": {"_class_name": "WanPipeline", "boundary_ratio": 0.875,
                               "expand_timesteps": False}},
}
"""The released Wan2.2 WanPipeline checkpoints' config values, by Hub id."""
EXPERTS = ("transformer", "transformer_2")


class WanExperts(nn.Module):
    """Wan2.2 A14B's two experts as one module: ``transformer`` (high noise) and
    ``transformer_2`` (low noise); ``forward(expert, **kw)`` runs expert 0 or 1. ``trains``:
    which of them fine-tune (LoRA or full); the others are frozen by `freeze_untrained`.
    ``_keep_in_fp32_modules`` is WanTransformer3DModel's, so the dtype rules see through it."""

    _keep_in_fp32_modules: ClassVar[list[str]] = [
        "rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module,
                 trains: tuple[bool, bool] = (True, True)) -> None:
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.trains = trains

    @property
    def config(self) -> Any:
        """The high-noise expert's config (both experts have the same shapes)."""
        return self.transformer.config

    @property
    def peft_config(self) -> dict[str, Any]:
        """The first trained expert's LoRA config ({} without LoRA)."""
        return next((c for m in self.experts().values()
                     if (c := getattr(m, "peft_config", None))), {})

    def experts(self) -> dict[str, nn.Module]:
        """``{"transformer": high, "transformer_2": low}``."""
        return {EXPERTS[0]: self.transformer, EXPERTS[1]: self.transformer_2}

    def forward(self, expert: Tensor, **kw: Any) -> tuple[Tensor]:
        """Each row's expert (``expert`` [M]: 0 ``transformer``, 1 ``transformer_2``) on its
        rows of the row-aligned inputs ``kw`` ([M, ...] tensors); ``(output [M, ...],)``.
        One call however the rows split, so DDP sees one forward per backward."""
        used = expert.unique().tolist()
        if len(used) == 1:
            return (self.experts()[EXPERTS[int(used[0])]](**kw)[0],)
        out: Tensor | None = None
        for e in used:
            rows = (expert == e).nonzero().squeeze(1)
            sub = {k: v[rows] if isinstance(v, Tensor) and v.dim() and len(v) == len(expert)
                   else v for k, v in kw.items()}
            y = self.experts()[EXPERTS[int(e)]](**sub)[0]
            if out is None:
                out = y.new_empty((len(expert), *y.shape[1:]))
            out = out.index_copy(0, rows, y)
        return (out,)

    def add_adapter(self, config: Any, adapter_name: str) -> None:
        """LoRA on the trained experts only."""
        for m, t in zip(self.experts().values(), self.trains, strict=True):
            if t:
                m.add_adapter(config, adapter_name=adapter_name)

    def enable_gradient_checkpointing(self) -> None:
        for m in self.experts().values():
            m.enable_gradient_checkpointing()

    def freeze_untrained(self) -> None:
        """requires_grad False and eval mode for the experts that do not train."""
        for m, t in zip(self.experts().values(), self.trains, strict=True):
            if not t:
                m.requires_grad_(False).eval()


@dataclass
class Wan22Family(WanFamily):
    """Wan2.2 T2V (TI2V-5B or T2V-A14B) as a `branchgrpo.models.family.Family`: `WanFamily`'s
    encode/decode/CFG, plus ``expand_timesteps`` (per-token timesteps) and the A14B expert
    switch at ``boundary_timestep`` with ``guidance_scale_2``, both read from the pipeline's
    config by `of`."""

    subfolders: ClassVar[tuple[str, ...]] = SUBFOLDERS
    optional_subfolders: ClassVar[tuple[str, ...]] = ("transformer_2",)
    released_config: ClassVar[dict[str, Any]] = RELEASED[TI2V_5B]
    released_configs: ClassVar[dict[str, dict[str, Any]]] = RELEASED
    expand_timesteps: bool = False
    boundary_timestep: float | None = None
    guidance_scale_2: float | None = None

    @classmethod
    def of(cls, pipe: Any, transformer: nn.Module | None = None, *,
           guidance_scale_2: float | None = None, **options: Any) -> Wan22Family:
        """The family for ``pipe`` (see `WanFamily.of`); ``expand_timesteps`` and the boundary
        ``boundary_ratio * num_train_timesteps`` come from ``pipe.config``."""
        cfg = pipe.config
        ratio = cfg.get("boundary_ratio", None)
        if ratio is None and guidance_scale_2 is not None:
            raise ValueError("model.guidance_2 needs a two-expert checkpoint (boundary_ratio "
                             "in model_index.json: Wan2.2 A14B)")
        boundary = (None if ratio is None
                    else float(ratio) * pipe.scheduler.config.num_train_timesteps)
        g = options.get("guidance_scale", 5.0)
        return super().of(pipe, transformer, expand_timesteps=bool(cfg.get("expand_timesteps")),
                          boundary_timestep=boundary,
                          guidance_scale_2=None if ratio is None else (
                              g if guidance_scale_2 is None else guidance_scale_2),
                          **options)

    def expert_of(self, t: Tensor) -> Tensor:
        """The expert index [N] (0 high noise, 1 low noise) WanPipeline uses at timesteps t."""
        if self.boundary_timestep is None:
            return torch.zeros_like(t, dtype=torch.long)
        return (t < self.boundary_timestep).long()

    def velocity(self, parts: Parts, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """Guided v [N, C, F, H, W] fp32: u + g (c - u) of the expert and scale of each row's
        timestep ([cond; uncond] in one forward per expert)."""
        t = family_timestep(self, sigma.to(parts.device))
        which = self.expert_of(t)
        scale = torch.full(t.shape, float(self.guidance_scale), device=parts.device)
        if self.guidance_scale_2 is not None:
            scale[which == 1] = float(self.guidance_scale_2)
        return self._guided(parts, which, x.to(parts.device), t, cond,
                            scale.view(-1, *[1] * (x.dim() - 1)))

    def shared_inputs(self, cond: Cond) -> tuple[Tensor, ...]:
        """Conditioning rows both CFG halves share, beyond the text (none in text-to-video;
        the image condition of `branchgrpo.models.wan_i2v`)."""
        return ()

    def model_inputs(self, parts: Parts, x: Tensor, shared: tuple[Tensor, ...],
                     ) -> dict[str, Tensor]:
        """The transformer's inputs from latents x [M, *L] and the `shared_inputs` rows."""
        return {"hidden_states": parts.model_input(x)}

    def _guided(self, parts: Parts, expert: Tensor, x: Tensor, t: Tensor, cond: Cond,
                scale: Tensor) -> Tensor:
        """Guided v [N, *L] of rows x with experts ``expert`` [N] and CFG scales ``scale``
        [N, 1, ...]: the conditional and unconditional rows in one forward."""
        _, f, h, w = self.latent_shape
        seq = f * len(range(0, h, 2)) * len(range(0, w, 2))  # WanPipeline's mask[:, ::2, ::2]

        def forward(x: Tensor, t: Tensor, emb: Tensor, *shared: Tensor) -> Tensor:
            ts = t[:, None].expand(-1, seq) if self.expand_timesteps else t
            kw = dict(self.model_inputs(parts, x, shared), timestep=ts,
                      encoder_hidden_states=parts.model_input(emb), return_dict=False)
            if self.boundary_timestep is not None:
                kw["expert"] = torch.cat([expert, expert]) if len(x) > len(expert) else expert
            with parts.autocast():
                return parts.transformer(**kw)[0]

        shared = self.shared_inputs(cond)
        uncond = (cond["negative_prompt_embeds"], *shared) if self.do_cfg else None
        return classifier_free(forward, x, t, (cond["prompt_embeds"], *shared), uncond,
                               scale=scale, detach_uncond=self.detach_uncond,
                               uncond_first=False)


FAMILY = Wan22Family
"""The registry's family class (`branchgrpo.models.families.family_class`)."""


def compose_wan22(pipe: Any, *, experts: str = "all", dtype: torch.dtype = torch.float32,
                  lora: Any = None, full_finetune: bool = False,
                  master_dtype: torch.dtype = torch.float32, family_cls: Any = None,
                  **kw: Any) -> DiffusersPolicy:
    """The Wan2.2 policy (``family_cls``, default `Wan22Family`) over ``pipe``: with a
    ``transformer_2`` (A14B) both experts in one `WanExperts`, ``experts`` (all, high, low)
    training, each stored in the dtype its mode needs (`weight_dtype`); ``kw``: `compose`'s and
    the family's options."""
    family_cls = family_cls or Wan22Family
    pair = getattr(pipe, "transformer_2", None)
    if pair is None:
        if experts != "all":
            raise ValueError(f"model.experts={experts} needs a two-expert checkpoint "
                             "(Wan2.2 A14B's transformer_2); this one has one transformer")
        cast_weights(pipe.transformer, weight_dtype(dtype, lora, full_finetune, master_dtype))
        return compose(family_cls, pipe, dtype=dtype, lora=lora, full_finetune=full_finetune,
                       **kw)
    trains = (experts in ("all", "high"), experts in ("all", "low"))
    for m, t in zip((pipe.transformer, pair), trains, strict=True):
        cast_weights(m, weight_dtype(dtype, lora, full_finetune and t, master_dtype))
    policy = compose(family_cls, pipe, transformer=WanExperts(pipe.transformer, pair, trains),
                     dtype=dtype, lora=lora, full_finetune=full_finetune, **kw)
    policy.transformer.freeze_untrained()
    return policy


def build(o: ModelOptions, device: torch.device) -> DiffusersPolicy:
    """The registry's builder: the checkpoint ``o.path`` as a Wan2.2 policy on ``device``."""
    kw = o.diffusers_kwargs()
    pipe = load_pipeline(Wan22Family, o.path, DTYPES[o.dtype], quantize=kw.pop("quantize"),
                         components=kw.pop("components"))
    return compose_wan22(pipe, experts=o.experts, device=device, num_frames=o.num_frames,
                         guidance_scale_2=o.guidance_2, **kw)


def tiny_wan_transformer(tr: dict[str, Any], seed: int, **extra: Any) -> nn.Module:
    """A tiny random WanTransformer3DModel (2 blocks, 2 heads of 12, text width 32) with the
    released config ``tr``'s behaviour values (patch, channels, freq_dim, norms); ``extra``:
    more constructor arguments (Wan2.1-I2V's image inputs)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=tuple(tr["patch_size"]), num_attention_heads=2, attention_head_dim=12,
        in_channels=tr["in_channels"], out_channels=tr["out_channels"], text_dim=32,
        freq_dim=tr["freq_dim"], ffn_dim=32, num_layers=2,
        cross_attn_norm=tr["cross_attn_norm"], qk_norm=tr["qk_norm"], **extra)


def tiny_wan22_parts(seed: int = 0, experts: bool = False) -> dict[str, Any]:
    """WanPipeline components of a tiny random Wan2.2: TI2V-5B's (48-channel residual VAE with
    patch 2, spatial factor 16, ``expand_timesteps``), or with ``experts`` T2V-A14B's (the Wan2.1
    VAE, two transformers, ``boundary_ratio`` 0.875). Released behaviour values; 2 blocks,
    width 24."""
    from diffusers import AutoencoderKLWan

    rel = RELEASED[T2V_A14B if experts else TI2V_5B]
    tr, index = rel["transformer"], rel["model_index"]
    torch.manual_seed(seed)
    if experts:
        vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True]).eval()
    else:
        v = TI2V_5B_VAE
        vae = AutoencoderKLWan(
            base_dim=8, decoder_base_dim=8, z_dim=v["z_dim"], dim_mult=[1, 1, 1, 1],
            num_res_blocks=1, temperal_downsample=v["temperal_downsample"],
            is_residual=v["is_residual"], in_channels=v["in_channels"],
            out_channels=v["out_channels"], patch_size=v["patch_size"],
            scale_factor_temporal=v["scale_factor_temporal"],
            scale_factor_spatial=v["scale_factor_spatial"], latents_mean=v["latents_mean"],
            latents_std=v["latents_std"]).eval()

    def transformer(s: int) -> nn.Module:
        return tiny_wan_transformer(tr, s)

    parts = dict(transformer=transformer(seed), vae=vae,
                 text_encoder=tiny_t5_encoder(32, True, seed), tokenizer=tiny_t5_tokenizer(512),
                 boundary_ratio=index["boundary_ratio"],
                 expand_timesteps=index["expand_timesteps"])
    if experts:
        parts["transformer_2"] = transformer(seed + 1)
    return parts


def tiny_wan22(height: int = 64, width: int = 64, num_frames: int = 5, *, seed: int = 0,
               a14b: bool = False, max_sequence_length: int = 8, **kw: Any,
               ) -> tuple[DiffusersPolicy, Any]:
    """A tiny random Wan2.2, TI2V-5B's or with ``a14b`` T2V-A14B's (`tiny_wan22_parts`, the
    released UniPC scheduler), as (policy, reference WanPipeline holding its own copies of the
    transformers). ``kw``: `compose_wan22`'s (experts, lora, ...) and the family's options."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    rel = RELEASED[T2V_A14B if a14b else TI2V_5B]
    sched = UniPCMultistepScheduler.from_config(
        {k: v for k, v in rel["scheduler"].items() if k != "_class_name"})
    parts = tiny_wan22_parts(seed, a14b)
    ref = WanPipeline(scheduler=sched, **{k: copy.deepcopy(v) if k.startswith("transformer")
                                          else v for k, v in parts.items()})
    pipe = WanPipeline(scheduler=sched, **parts)
    policy = compose_wan22(pipe, height=height, width=width, num_frames=num_frames,
                           max_sequence_length=max_sequence_length, **kw)
    return policy, ref

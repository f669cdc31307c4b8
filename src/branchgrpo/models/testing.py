"""Test components: offline tiny tokenizers, text encoders and VAE (no download; the tiny
families `tiny_flux`, `tiny_sd3`, `tiny_wan` and the replicas are built from them), and replica
checkpoints, in two kinds.

- `write_replica`: a diffusers-layout folder holding only the config files of a released
  checkpoint (``model_index.json``, ``scheduler/``, ``transformer/``, ``vae/``), with the values
  that decide the schedule, so `branchgrpo.spec.resolve` and ``branchgrpo plan`` see what the
  real checkpoint would make them do. No weights: building a policy from one fails.
- `write_replica_pipeline`: a complete tiny pipeline saved with ``pipeline.save_pretrained``
  (random transformer, VAE, text encoders, real tokenizer classes with a character vocab), so
  ``FluxPipeline.from_pretrained(folder)`` and our policies load it. Layers and widths are
  shrunk; every behaviour-changing value is the released one: the whole scheduler config,
  FLUX's ``guidance_embeds`` and VAE factors, SD3.5's patch size, ``qk_norm`` and dual-attention
  layers, Wan's ``qk_norm``, ``cross_attn_norm``, ``freq_dim`` and VAE latents mean/std, and
  the VAE's spatial (8) and Wan's temporal (4) factors.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

_CHARS = string.ascii_lowercase + string.digits


def tiny_clip_tokenizer(model_max_length: int = 77) -> Any:
    """A character-level CLIP BPE tokenizer built in memory (no download): bos 0, eos = pad 1,
    vocab 74. Pair it with a CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 32) -> Any:
    """A character-level T5 (SentencePiece-Unigram) tokenizer built in memory: pad 0, eos 1,
    unk 2, vocab 76. Works for T5 and UMT5 encoders with vocab_size >= 76."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -2.5) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


CHAT_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>",
                 "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]")
"""Special tokens of `tiny_chat_tokenizer` (Qwen's and Mistral's chat markers), ids 0-9."""


def tiny_chat_tokenizer(chat_template: str, model_max_length: int = 512) -> Any:
    """A character-level fast tokenizer with a chat template, built in memory (no download):
    pad 0, unk 1, bos 2, eos 3, the `CHAT_SPECIALS` as single tokens, then letters, digits,
    space, newline and punctuation (vocab 96). For the LLM text encoders (Qwen3, Mistral)
    whose pipelines call ``apply_chat_template``; saves and loads as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(CHAT_SPECIALS)}
    for c in string.ascii_letters + string.digits + " \n.,:;!?'\"-_()[]/<>|{}":
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.add_special_tokens(list(CHAT_SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", chat_template=chat_template,
                                   model_max_length=model_max_length)


def tiny_clip_encoder(hidden: int = 32, projection: int | None = None, seed: int = 0) -> Any:
    """A random 2-layer CLIP text encoder matching `tiny_clip_tokenizer`; with ``projection``
    it is a CLIPTextModelWithProjection (SD3), else a CLIPTextModel (FLUX's pooled output)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden,
                         intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=80, max_position_embeddings=77,
                         projection_dim=projection or hidden, hidden_act="gelu")
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tiny_t5_encoder(d_model: int = 32, umt5: bool = False, seed: int = 0) -> Any:
    """A random 2-layer T5 (or UMT5, Wan) encoder matching `tiny_t5_tokenizer`."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = dict(vocab_size=80, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
              relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0)
    torch.manual_seed(seed)
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kw)).eval()
    return T5EncoderModel(T5Config(**kw)).eval()


def tiny_image_vae(latent_channels: int = 4, seed: int = 0, **kw: Any) -> Any:
    """A random 2-level AutoencoderKL (spatial factor 2) with FLUX's scaling/shift factors."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False, sample_size=16,
        **{"shift_factor": 0.0609, "scaling_factor": 1.5035, **kw}).eval()


REPLICAS: dict[str, dict[str, dict[str, Any]]] = {
    "flux": {
        "model_index.json": {"_class_name": "FluxPipeline",
                             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                             "transformer": ["diffusers", "FluxTransformer2DModel"],
                             "vae": ["diffusers", "AutoencoderKL"]},
        "scheduler/scheduler_config.json": {
            "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
            "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
            "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
        "transformer/config.json": {
            "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128,
            "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
            "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
            "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768},
        "vae/config.json": {"_class_name": "AutoencoderKL", "latent_channels": 16,
                            "block_out_channels": [128, 256, 512, 512],
                            "scaling_factor": 0.3611, "shift_factor": 0.1159},
    },
    "sd3": {
        "model_index.json": {"_class_name": "StableDiffusion3Pipeline",
                             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                             "transformer": ["diffusers", "SD3Transformer2DModel"]},
        "scheduler/scheduler_config.json": {
            "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
            "shift": 3.0},
        "transformer/config.json": {
            "_class_name": "SD3Transformer2DModel", "attention_head_dim": 64,
            "caption_projection_dim": 1536, "in_channels": 16, "joint_attention_dim": 4096,
            "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2,
            "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
            "sample_size": 128, "dual_attention_layers": list(range(13))},
        "vae/config.json": {"_class_name": "AutoencoderKL", "latent_channels": 16,
                            "block_out_channels": [128, 256, 512, 512],
                            "scaling_factor": 1.5305, "shift_factor": 0.0609},
    },
    "wan": {
        "model_index.json": {"_class_name": "WanPipeline",
                             "scheduler": ["diffusers", "UniPCMultistepScheduler"],
                             "transformer": ["diffusers", "WanTransformer3DModel"]},
        "scheduler/scheduler_config.json": {
            "_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0,
            "final_sigmas_type": "zero", "num_train_timesteps": 1000,
            "prediction_type": "flow_prediction", "solver_order": 2, "use_flow_sigmas": True,
            "predict_x0": True, "solver_type": "bh2", "lower_order_final": True,
            "disable_corrector": [], "timestep_spacing": "linspace", "steps_offset": 0},
        "transformer/config.json": {
            "_class_name": "WanTransformer3DModel", "attention_head_dim": 128,
            "cross_attn_norm": True, "ffn_dim": 8960, "freq_dim": 256, "in_channels": 16,
            "num_attention_heads": 12, "num_layers": 30, "out_channels": 16,
            "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "text_dim": 4096},
    },
}
"""Config files of FLUX.1-dev, SD3.5-medium and Wan2.1-T2V-1.3B-Diffusers (behaviour values
as released; shapes as released, though nothing here builds them)."""


def _variant(base: str, **files: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A replica that differs from ``base`` in some config files' values (merged per file)."""
    return {name: {**content, **files.get(name.replace("/", "_").removesuffix(".json"), {})}
            for name, content in REPLICAS[base].items()}


# Qwen/Qwen-Image (diffusers layout, as released): model_index.json, scheduler, transformer and
# VAE configs; the transformer's unused pooled_projection_dim is in the released file too.
# `branchgrpo.models.qwenimage.RELEASED_CONFIG` reads them from here.
REPLICAS["qwenimage"] = {
    "model_index.json": {"_class_name": "QwenImagePipeline",
                         "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                         "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
                         "tokenizer": ["transformers", "Qwen2Tokenizer"],
                         "transformer": ["diffusers", "QwenImageTransformer2DModel"],
                         "vae": ["diffusers", "AutoencoderKLQwenImage"]},
    "scheduler/scheduler_config.json": {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
        "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192, "max_shift": 0.9,
        "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
        "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
        "use_dynamic_shifting": True, "use_exponential_sigmas": False,
        "use_karras_sigmas": False},
    "transformer/config.json": {
        "_class_name": "QwenImageTransformer2DModel", "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56], "guidance_embeds": False, "in_channels": 64,
        "joint_attention_dim": 3584, "num_attention_heads": 24, "num_layers": 60,
        "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 768},
    "vae/config.json": {
        "_class_name": "AutoencoderKLQwenImage", "attn_scales": [], "base_dim": 96,
        "dim_mult": [1, 2, 4, 4], "dropout": 0.0,
        "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                         0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
        "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687,
                        2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
        "num_res_blocks": 2, "temperal_downsample": [False, True, True], "z_dim": 16},
}
REPLICAS["sd3_large"] = _variant(  # SD3.5-large: same scheduler (shift 3), a wider MMDiT
    "sd3", transformer_config={"num_layers": 38, "num_attention_heads": 38,
                               "caption_projection_dim": 2432, "pos_embed_max_size": 192,
                               "dual_attention_layers": []})
REPLICAS["wan_14b"] = _variant(  # Wan2.1-T2V-14B: the 1.3B's scheduler, a larger transformer
    "wan", transformer_config={"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40,
                               "in_channels": 16, "text_dim": 4096})


REPLICAS["flux_schnell"] = _variant(  # FLUX.1-schnell: no guidance embedding, static shift 1
    "flux", transformer_config={"guidance_embeds": False},
    scheduler_scheduler_config={"use_dynamic_shifting": False, "shift": 1.0})
REPLICAS["flux2"] = {  # FLUX.2-dev (configs in branchgrpo.models.flux2.RELEASED_CONFIG)
    "model_index.json": {"_class_name": "Flux2Pipeline",
                         "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                         "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"],
                         "tokenizer": ["transformers", "PixtralProcessor"],
                         "transformer": ["diffusers", "Flux2Transformer2DModel"],
                         "vae": ["diffusers", "AutoencoderKLFlux2"]},
    "scheduler/scheduler_config.json": {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
        "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
        "num_train_timesteps": 1000, "shift": 3.0, "time_shift_type": "exponential",
        "use_dynamic_shifting": True},
    "transformer/config.json": {
        "_class_name": "Flux2Transformer2DModel", "attention_head_dim": 128,
        "axes_dims_rope": [32, 32, 32, 32], "eps": 1e-06, "guidance_embeds": True,
        "in_channels": 128, "joint_attention_dim": 15360, "mlp_ratio": 3.0,
        "num_attention_heads": 48, "num_layers": 8, "num_single_layers": 48,
        "out_channels": None, "patch_size": 1, "rope_theta": 2000,
        "timestep_guidance_channels": 256},
    "vae/config.json": {"_class_name": "AutoencoderKLFlux2", "batch_norm_eps": 0.0001,
                        "batch_norm_momentum": 0.1, "block_out_channels": [128, 256, 512, 512],
                        "latent_channels": 32, "patch_size": [2, 2]},
}
REPLICAS["zimage"] = {  # Tongyi-MAI/Z-Image (base): static shift 6 (Turbo's: 3)
    "model_index.json": {"_class_name": "ZImagePipeline",
                         "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                         "text_encoder": ["transformers", "Qwen3Model"],
                         "tokenizer": ["transformers", "Qwen2Tokenizer"],
                         "transformer": ["diffusers", "ZImageTransformer2DModel"],
                         "vae": ["diffusers", "AutoencoderKL"]},
    "scheduler/scheduler_config.json": {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
        "use_dynamic_shifting": False, "shift": 6.0},
    "transformer/config.json": {
        "_class_name": "ZImageTransformer2DModel", "all_f_patch_size": [1],
        "all_patch_size": [2], "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
        "cap_feat_dim": 2560, "dim": 3840, "in_channels": 16, "n_heads": 30, "n_kv_heads": 30,
        "n_layers": 30, "n_refiner_layers": 2, "norm_eps": 1e-05, "qk_norm": True,
        "rope_theta": 256.0, "t_scale": 1000.0},
    "vae/config.json": {"_class_name": "AutoencoderKL", "latent_channels": 16,
                        "block_out_channels": [128, 256, 512, 512],
                        "scaling_factor": 0.3611, "shift_factor": 0.1159},
}
REPLICAS["zimage_turbo"] = _variant(  # Tongyi-MAI/Z-Image-Turbo: the distilled 8-step model
    "zimage", scheduler_scheduler_config={"shift": 3.0})


def write_replica(kind: str, folder: str | Path, scheduler: dict[str, Any] | None = None,
                  ) -> Path:
    """Write the replica of ``kind`` (flux, sd3, sd3_large, wan, wan_14b; flux2, zimage,
    zimage_turbo, flux_schnell) into ``folder``;
    ``scheduler`` overrides
    scheduler config values (e.g. ``{"flow_shift": 5.0}``). Returns the folder."""
    root = Path(folder)
    for name, content in REPLICAS[kind].items():
        data = {**content, **(scheduler or {})} if name.startswith("scheduler/") else content
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(data, indent=2))
    return root


def _scheduler(kind: str, overrides: dict[str, Any] | None) -> Any:
    """The released scheduler of ``kind`` (its whole config, ``overrides`` applied)."""
    import diffusers

    cfg = {**REPLICAS[kind]["scheduler/scheduler_config.json"], **(overrides or {})}
    return getattr(diffusers, cfg.pop("_class_name")).from_config(cfg)


def _image_vae(kind: str, seed: int) -> Any:
    """A random 4-level AutoencoderKL (spatial factor 8, 16 latent channels, widths 8) with the
    released checkpoint's scaling/shift factors and no (post-)quant conv."""
    from diffusers import AutoencoderKL

    vae = REPLICAS[kind]["vae/config.json"]
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
        layers_per_block=1, latent_channels=vae["latent_channels"], norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False, sample_size=32,
        scaling_factor=vae["scaling_factor"], shift_factor=vae["shift_factor"]).eval()


def _flux_parts(seed: int) -> dict[str, Any]:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8), guidance_embeds=True)
    return dict(transformer=transformer, vae=_image_vae("flux", seed),
                text_encoder=tiny_clip_encoder(32, None, seed), tokenizer=tiny_clip_tokenizer(),
                text_encoder_2=tiny_t5_encoder(32, False, seed),
                tokenizer_2=tiny_t5_tokenizer(512))


def _sd3_parts(seed: int) -> dict[str, Any]:
    from diffusers import SD3Transformer2DModel

    tr = REPLICAS["sd3"]["transformer/config.json"]
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=tr["sample_size"], patch_size=tr["patch_size"], in_channels=16,
        out_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=tr["pos_embed_max_size"], qk_norm=tr["qk_norm"],
        dual_attention_layers=(0,))
    return dict(transformer=transformer, vae=_image_vae("sd3", seed),
                text_encoder=tiny_clip_encoder(16, 16, seed), tokenizer=tiny_clip_tokenizer(),
                text_encoder_2=tiny_clip_encoder(16, 16, seed + 1),
                tokenizer_2=tiny_clip_tokenizer(), text_encoder_3=tiny_t5_encoder(32, False, seed),
                tokenizer_3=tiny_t5_tokenizer(512))


def _wan_parts(seed: int) -> dict[str, Any]:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    tr = REPLICAS["wan"]["transformer/config.json"]
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=tuple(tr["patch_size"]), num_attention_heads=2, attention_head_dim=12,
        in_channels=16, out_channels=16, text_dim=32, freq_dim=tr["freq_dim"], ffn_dim=32,
        num_layers=2, cross_attn_norm=tr["cross_attn_norm"], qk_norm=tr["qk_norm"])
    return dict(transformer=transformer, vae=vae, text_encoder=tiny_t5_encoder(32, True, seed),
                tokenizer=tiny_t5_tokenizer(512))


def _qwenimage_parts(seed: int) -> dict[str, Any]:
    from .qwenimage import replica_parts  # the family file holds its tiny components

    return replica_parts(seed)



def _wan22_parts(seed: int, experts: bool = False) -> dict[str, Any]:
    from .wan22 import tiny_wan22_parts  # the builder lives with its family

    return tiny_wan22_parts(seed, experts)


_WAN22_TR = {**REPLICAS["wan"]["transformer/config.json"], "added_kv_proj_dim": None,
             "eps": 1e-06, "image_dim": None, "pos_embed_seq_len": None,
             "rope_max_seq_len": 1024}
_WAN22_UNIPC = dict(REPLICAS["wan"]["scheduler/scheduler_config.json"])
REPLICAS["wan22"] = {  # Wan2.2-TI2V-5B-Diffusers (branchgrpo.models.wan22.RELEASED)
    "model_index.json": {"_class_name": "WanPipeline", "boundary_ratio": None,
                         "expand_timesteps": True,
                         "scheduler": ["diffusers", "UniPCMultistepScheduler"],
                         "transformer": ["diffusers", "WanTransformer3DModel"]},
    "scheduler/scheduler_config.json": {**_WAN22_UNIPC, "flow_shift": 5.0},
    "transformer/config.json": {**_WAN22_TR, "ffn_dim": 14336, "in_channels": 48,
                                "num_attention_heads": 24, "num_layers": 30,
                                "out_channels": 48},
    # the 48 latents_mean / latents_std values: wan22.TI2V_5B_VAE (the replica VAE has them)
    "vae/config.json": {"_class_name": "AutoencoderKLWan", "base_dim": 160,
                        "decoder_base_dim": 256, "z_dim": 48, "is_residual": True,
                        "in_channels": 12, "out_channels": 12, "patch_size": 2,
                        "scale_factor_temporal": 4, "scale_factor_spatial": 16},
}
REPLICAS["wan22_a14b"] = {  # Wan2.2-T2V-A14B-Diffusers: two experts of one shape, Wan2.1 VAE
    "model_index.json": {**REPLICAS["wan22"]["model_index.json"], "boundary_ratio": 0.875,
                         "expand_timesteps": False,
                         "transformer_2": ["diffusers", "WanTransformer3DModel"]},
    "scheduler/scheduler_config.json": {**_WAN22_UNIPC, "flow_shift": 3.0},
    "transformer/config.json": {**_WAN22_TR, "ffn_dim": 13824, "num_attention_heads": 40,
                                "num_layers": 40},
    "transformer_2/config.json": {**_WAN22_TR, "ffn_dim": 13824, "num_attention_heads": 40,
                                  "num_layers": 40},
}
REPLICAS["wan_i2v"] = {  # Wan2.2-I2V-A14B-Diffusers: 36 input channels, boundary 0.9
    **REPLICAS["wan22_a14b"],
    "model_index.json": {**REPLICAS["wan22_a14b"]["model_index.json"],
                         "_class_name": "WanImageToVideoPipeline", "boundary_ratio": 0.9},
    "transformer/config.json": {**REPLICAS["wan22_a14b"]["transformer/config.json"],
                                "in_channels": 36},
    "transformer_2/config.json": {**REPLICAS["wan22_a14b"]["transformer/config.json"],
                                  "in_channels": 36},
}


REPLICAS["wan_i2v_21"] = {  # Wan2.1-I2V-14B-480P-Diffusers: one transformer, CLIP image input
    "model_index.json": {**REPLICAS["wan_i2v"]["model_index.json"], "boundary_ratio": None,
                         "transformer_2": [None, None],
                         "image_encoder": ["transformers", "CLIPVisionModel"],
                         "image_processor": ["transformers", "CLIPImageProcessor"]},
    "scheduler/scheduler_config.json": REPLICAS["wan_i2v"]["scheduler/scheduler_config.json"],
    "transformer/config.json": {**REPLICAS["wan_i2v"]["transformer/config.json"],
                                "image_dim": 1280, "added_kv_proj_dim": 5120},
}


def _wan_i2v_parts(seed: int, clip: bool = False) -> dict[str, Any]:
    from .wan_i2v import tiny_wan_i2v_parts

    return tiny_wan_i2v_parts(seed, clip)


def _flux2_parts(seed: int) -> dict[str, Any]:
    from .flux2 import tiny_flux2_parts

    return tiny_flux2_parts(seed, vae_levels=4)


def _zimage_parts(seed: int) -> dict[str, Any]:
    from .zimage import tiny_zimage_parts

    return tiny_zimage_parts(seed, vae=_image_vae("zimage", seed))


_PARTS = {"flux": _flux_parts, "sd3": _sd3_parts, "wan": _wan_parts,
          "qwenimage": _qwenimage_parts, "wan22": _wan22_parts,
          "wan22_a14b": lambda seed: _wan22_parts(seed, True), "wan_i2v": _wan_i2v_parts,
          "wan_i2v_21": lambda seed: _wan_i2v_parts(seed, True), "flux2": _flux2_parts,
          "zimage": _zimage_parts, "zimage_turbo": _zimage_parts}


def write_replica_pipeline(kind: str, folder: str | Path,
                           scheduler: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """Save a complete tiny pipeline of ``kind`` (flux, sd3, wan, flux2, zimage, zimage_turbo)
    into ``folder`` with ``save_pretrained`` (see the module docstring); ``scheduler`` overrides
    released scheduler values (e.g. ``{"flow_shift": 5.0}``). Weights are random from ``seed``;
    a few seconds on a CPU. Returns the folder."""
    import diffusers

    pipe_cls = getattr(diffusers, REPLICAS[kind]["model_index.json"]["_class_name"])
    pipe = pipe_cls(scheduler=_scheduler(kind, scheduler), **_PARTS[kind](seed))
    pipe.save_pretrained(folder)
    return Path(folder)

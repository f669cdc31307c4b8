"""Replica checkpoints for tests: diffusers-layout folders holding only the config files of a
released checkpoint (``model_index.json``, ``scheduler/``, ``transformer/``, ``vae/``), with
the values that decide the schedule, so `branchgrpo.spec.resolve` and ``branchgrpo plan`` see
what the real checkpoint would make them do. No weights: building a policy from one fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
            "prediction_type": "flow_prediction", "solver_order": 2, "use_flow_sigmas": True},
        "transformer/config.json": {
            "_class_name": "WanTransformer3DModel", "attention_head_dim": 128,
            "cross_attn_norm": True, "ffn_dim": 8960, "freq_dim": 256, "in_channels": 16,
            "num_attention_heads": 12, "num_layers": 30, "out_channels": 16,
            "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "text_dim": 4096},
    },
}
"""Config files of FLUX.1-dev, SD3.5-medium and Wan2.1-T2V-1.3B-Diffusers (behaviour values
as released; shapes as released, though nothing here builds them)."""


def write_replica(kind: str, folder: str | Path, scheduler: dict[str, Any] | None = None,
                  ) -> Path:
    """Write the replica of ``kind`` (flux, sd3, wan) into ``folder``; ``scheduler`` overrides
    scheduler config values (e.g. ``{"flow_shift": 5.0}``). Returns the folder."""
    root = Path(folder)
    for name, content in REPLICAS[kind].items():
        data = {**content, **(scheduler or {})} if name.startswith("scheduler/") else content
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(data, indent=2))
    return root

"""A tiny random VideoReward in the released layout (``KwaiVGI/VideoReward``).

``write_tiny_videoalign(root)`` writes:

- ``root/base/``: the "base model" folder (``config.json`` of a 2-layer, hidden-32 Qwen2-VL with
  a 1-block vision tower, and Qwen2-VL-2B-Instruct's ``preprocessor_config.json`` values);
- ``root/reward/model_config.json`` (the released keys, ``model_name_or_path`` = the base);
- ``root/reward/checkpoint-7/model.pth``: the PEFT-wrapped state dict with transformers 4.45
  names (``base_model.model.visual.*``, ``base_model.model.model.*``, ``lm_head``, ``rm_head``)
  and every language-model linear split into ``base_layer`` + ``lora_A/B`` so that the merge
  gives back the random model;
- ``root/reward/checkpoint-7/tokenizer/``: a byte-level BPE (trained on the prompt template)
  with Qwen2-VL's special tokens and the three reward tokens.

Returns the reward folder, the base folder and the ``Qwen2VLModel`` state dict the merge must
reproduce.
"""

from __future__ import annotations

import json
import os

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
REWARD = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
LORA_R, LORA_ALPHA = 4, 8
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_tokenizer():
    """A fast byte-level BPE tokenizer, 400 learned tokens plus the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from branchgrpo.rewards.videoalign_prompt import DETAILED_SPECIAL

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([DETAILED_SPECIAL, "a cat on a red sofa, a dog in the snow"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:] + REWARD})
    return fast


def tiny_config(tok):
    from transformers import Qwen2VLConfig

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision,
                         image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                         vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)


def to_released(sd: dict, gen: torch.Generator, head: torch.Tensor) -> dict:
    """``Qwen2VLModel`` state dict -> VideoAlign's PEFT ``model.pth`` names, LoRA split."""
    out = {}
    scale = LORA_ALPHA / LORA_R
    for k, v in sd.items():
        name = k if k.startswith("visual.") else "model." + k.removeprefix("language_model.")
        mod, _, param = name.rpartition(".")
        if name.startswith("model.layers.") and mod.endswith(_LINEARS):
            if param == "weight":
                a = torch.randn(LORA_R, v.shape[1], generator=gen) * 0.1
                b = torch.randn(v.shape[0], LORA_R, generator=gen) * 0.1
                out[f"base_model.model.{mod}.base_layer.weight"] = v - scale * b @ a
                out[f"base_model.model.{mod}.lora_A.default.weight"] = a
                out[f"base_model.model.{mod}.lora_B.default.weight"] = b
            else:
                out[f"base_model.model.{mod}.base_layer.{param}"] = v
        else:
            out["base_model.model." + name] = v
    out["base_model.model.lm_head.weight"] = sd["language_model.embed_tokens.weight"]
    out["base_model.model.rm_head.weight"] = head
    return out


def write_tiny_videoalign(root: str, seed: int = 0) -> tuple[str, str, dict]:
    from transformers import Qwen2VLModel

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tok = tiny_tokenizer()
    config = tiny_config(tok)
    base, reward = os.path.join(root, "base"), os.path.join(root, "reward")
    ckpt = os.path.join(reward, "checkpoint-7")
    config.save_pretrained(base)
    with open(os.path.join(base, "preprocessor_config.json"), "w") as f:
        json.dump({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
                   "temporal_patch_size": 2, "merge_size": 2,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711],
                   "image_processor_type": "Qwen2VLImageProcessor"}, f)
    model = Qwen2VLModel(config).eval()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    head = torch.randn(1, 32, generator=gen)
    os.makedirs(ckpt)
    torch.save(to_released(sd, gen, head), os.path.join(ckpt, "model.pth"))
    tok.save_pretrained(os.path.join(ckpt, "tokenizer"))
    os.makedirs(os.path.join(reward, "checkpoint-3"))  # an older step, not picked
    cfg = {
        "data_config": {"max_frame_pixels": 200704, "num_frames": None, "fps": 2.0,
                        "p_shuffle_frames": 0.0, "p_color_jitter": 0.0,
                        "eval_dim": ["VQ", "MQ", "TA"], "prompt_template_type": "detailed_special",
                        "add_noise": False, "sample_type": "uniform", "use_tied_data": True,
                        "meta_data_test": None},
        "model_config": {"model_name_or_path": base, "output_dim": 1, "use_special_tokens": True,
                         "reward_token": "special", "torch_dtype": "bfloat16"},
        "peft_lora_config": {"lora_enable": True, "vision_lora": False, "lora_r": LORA_R,
                             "lora_alpha": LORA_ALPHA, "lora_dropout": 0.05,
                             "lora_namespan_exclude": ["lm_head", "rm_head", "embed_tokens",
                                                       "visual"],
                             "lora_task_type": "CAUSAL_LM", "use_rslora": False,
                             "num_lora_modules": -1},
        "inference_config": {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646,
                             "MQ_std": 1.3811, "TA_mean": 2.8105, "TA_std": 2.5121},
    }
    with open(os.path.join(reward, "model_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return reward, base, sd

"""VideoAlign's VideoReward (Liu et al. 2025, "Improving Video Generation with Human Feedback",
arXiv 2501.13918; code KwaiVGI/VideoAlign, weights ``KwaiVGI/VideoReward``), scoring videos as
videos.

The checkpoint (hub repo ``KwaiVGI/VideoReward``, read by VideoAlign's ``inference.py``):

- ``model_config.json``: the training configs. ``data_config`` (``fps`` 2.0, ``num_frames``
  null, ``max_frame_pixels`` 200704 = 448*448, ``sample_type`` uniform, ``eval_dim``
  [VQ, MQ, TA], ``prompt_template_type`` detailed_special), ``model_config``
  (``model_name_or_path`` Qwen/Qwen2-VL-2B-Instruct, ``use_special_tokens``, ``reward_token``
  special, ``output_dim``), ``peft_lora_config`` (LoRA r 64, alpha 128 on every linear layer of
  the language model; ``lora_namespan_exclude`` lm_head, rm_head, embed_tokens, visual) and
  ``inference_config`` (per-head mean/std: VQ 3.6757/2.2476, MQ 1.1646/1.3811,
  TA 2.8105/2.5121).
- ``checkpoint-<step>/model.pth`` (step 11352): the **whole** PEFT-wrapped model's state dict
  (``base_model.model.`` prefix, LoRA kept separate as ``base_layer`` + ``lora_A/B``, names of
  transformers 4.45: ``visual.*``, ``model.*`` for the language model, ``lm_head``, ``rm_head``).
  Every base weight is in it, so from the base repo only ``config.json`` and
  ``preprocessor_config.json`` are read. The embeddings have ``len(tokenizer)`` rows (151660:
  the base tokenizer plus the three reward tokens).
- ``checkpoint-<step>/tokenizer/``: Qwen2-VL's tokenizer with ``<|VQ_reward|>``,
  ``<|MQ_reward|>``, ``<|TA_reward|>`` added.

Loading (:func:`load_videoalign`): LoRA is merged into the base weights
(``W + alpha/r * B @ A``; dropout is off at inference), the names are mapped to transformers
5's ``Qwen2VLModel`` (``visual.*``, ``language_model.*``) and loaded strictly; ``rm_head``
(``Linear(hidden, output_dim, bias=False)``) is kept apart.

Scoring (VideoAlign ``VideoVLMRewardInference.reward``, reproduced in torch because the
transformers video processor needs torchvision):

1. Frames: qwen-vl-utils' uniform sampling at ``fps`` 2 of a clip at ``source_fps``
   (``F / source_fps * 2`` frames, at least 4, rounded to an even count, indices
   ``linspace(0, F-1, n).round()``); rounded to uint8 (VideoAlign reads a decoded mp4,
   uint8; its codec loss is not reproduced); resized
   bicubic (antialiased) so both sides are multiples of 28 and the area lies in
   [128*28*28, ``max_frame_pixels``], rounded to uint8 again (torchvision's uint8 resize).
2. The processor's steps: rescale /255, OpenAI CLIP mean/std, temporal patches of 2 frames x
   14x14 pixels, ordered by 2x2 merge windows (Qwen2-VL's layout); ``<|video_pad|>`` repeated
   ``t*h*w/4`` times in the text.
3. Text: Qwen2-VL's chat template for one user turn (a video, then the ``detailed_special``
   instruction with the caption, :mod:`videoalign_prompt`), with the generation prompt.
4. Forward as VideoAlign's ``Qwen2VLRewardModelBT``: video features scattered into the
   ``<|video_pad|>`` embeddings, the language model run with **sequential** positions (VideoAlign
   calls the text model without ``position_ids``, so no M-RoPE indices), ``rm_head`` on the final
   hidden states at the three reward tokens -> VQ, MQ, TA (the diagonal when ``output_dim`` 3).
5. ``(head - mean) / std`` with the ``inference_config`` values (``use_norm=True``, as DanceGRPO
   trains); VideoAlign's "Overall" is ``VQ + MQ + TA`` of the normalised heads.

The score is ``sum_k weights[k] * head_k``. Default ``weights={"MQ": 1.0}``: the BranchGRPO paper
(arXiv 2509.06040 v5) trains WanX-1.3B with VideoAlign's motion quality ("higher motion quality
reward"); DanceGRPO's HunyuanVideo recipe uses the normalised VQ (``vq_coef 1, mq_coef 0``) and its
SkyReels I2V recipe MQ; ``{"VQ": 1, "MQ": 1, "TA": 1}`` is VideoAlign's Overall. Scale: the
normalised heads are z-scores of VideoAlign's training data, roughly -3..3 (0 = average).
BranchGRPO's abstract (v5) claims a higher motion-quality reward than DanceGRPO on WanX; the
parts of the paper we could reach give no Video-Align number, so none is quoted here.

Video only: a single frame cannot be sampled (at least 2 frames); the factory has
``media = ("video",)`` and preflight refuses it for image families.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from branchgrpo.rewards.base import REWARDS, RewardError
from branchgrpo.rewards.hub import (
    WeightsNotFound,
    hub_file,
    offline,
    resolve_device,
    resolve_dtype,
)
from branchgrpo.rewards.media import CLIP_MEAN, CLIP_STD
from branchgrpo.rewards.videoalign_prompt import build_prompt

HEADS = ("VQ", "MQ", "TA")
"""Visual quality, motion quality, text alignment: the order of the reward tokens."""
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
VIDEO_MIN_PIXELS = 128 * 28 * 28
"""qwen-vl-utils' smallest frame area for videos (``VIDEO_MIN_PIXELS``)."""
FRAME_FACTOR, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 2, 4, 768
"""qwen-vl-utils' frame sampling bounds (VideoAlign ``vision_process.py``)."""
SYSTEM = "You are a helpful assistant."
"""The default system turn of Qwen2-VL-Instruct's chat template."""


@dataclass
class VideoAlignConfig:
    """What ``model_config.json`` says, with the released values as defaults."""

    fps: float = 2.0
    num_frames: int | None = None
    max_frame_pixels: int = 448 * 448
    sample_type: str = "uniform"
    template: str = "detailed_special"
    base: str = "Qwen/Qwen2-VL-2B-Instruct"
    output_dim: int = 1
    reward_token: str = "special"
    lora: bool = True
    lora_scale: float = 2.0
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> VideoAlignConfig:
        data, model = d.get("data_config", {}), d.get("model_config", {})
        peft, inf = d.get("peft_lora_config", {}), d.get("inference_config") or {}
        r, alpha = float(peft.get("lora_r", 16)), float(peft.get("lora_alpha", 32))
        scale = alpha / math.sqrt(r) if peft.get("use_rslora") else alpha / r
        return cls(
            fps=float(data.get("fps") or 2.0),
            num_frames=data.get("num_frames"),
            max_frame_pixels=int(data.get("max_frame_pixels", 448 * 448)),
            sample_type=str(data.get("sample_type", "uniform")),
            template=str(data.get("prompt_template_type", "detailed_special")),
            base=str(model.get("model_name_or_path") or cls.base),
            output_dim=int(model.get("output_dim", 1)),
            reward_token=str(model.get("reward_token", "special")),
            lora=bool(peft.get("lora_enable", False)),
            lora_scale=scale,
            mean={h: float(inf[f"{h}_mean"]) for h in HEADS if f"{h}_mean" in inf},
            std={h: float(inf[f"{h}_std"]) for h in HEADS if f"{h}_std" in inf},
        )


# --- checkpoint names -------------------------------------------------------------------------

_LORA = re.compile(r"^(.*)\.(lora_A|lora_B)\.[^.]+\.weight$")


def released_to_hf(
    sd: Mapping[str, Tensor], lora_scale: float
) -> tuple[dict[str, Tensor], Tensor]:
    """VideoAlign's ``model.pth`` -> (``Qwen2VLModel`` state dict, ``rm_head`` weight).

    Strips ``base_model.model.``, merges each LoRA pair into its ``base_layer``
    (``W + lora_scale * B @ A``, in fp32), takes ``modules_to_save.default`` copies, drops
    ``lm_head`` (tied to the embeddings, unused by the reward) and renames transformers 4.45's
    ``visual.*`` / ``model.*`` to ``visual.*`` / ``language_model.*``."""
    plain: dict[str, Tensor] = {}
    lora: dict[str, dict[str, Tensor]] = {}
    for k, v in sd.items():
        k = k.removeprefix("base_model.model.")
        if ".original_module." in k:
            continue
        k = k.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
        if m := _LORA.match(k):
            lora.setdefault(m.group(1) + ".weight", {})[m.group(2)] = v
        else:
            plain[k] = v
    for k, ab in lora.items():
        if k not in plain or set(ab) != {"lora_A", "lora_B"}:
            raise RewardError(f"VideoAlign checkpoint: incomplete LoRA pair for {k!r}")
        w = plain[k]
        delta = ab["lora_B"].float() @ ab["lora_A"].float()
        plain[k] = (w.float() + lora_scale * delta).to(w.dtype)
    if "rm_head.weight" not in plain:
        raise RewardError("VideoAlign checkpoint has no rm_head.weight (is it a VideoReward?)")
    head = plain.pop("rm_head.weight")
    out: dict[str, Tensor] = {}
    for k, v in plain.items():
        if k.startswith("lm_head."):
            continue
        if k.startswith("visual."):
            out[k] = v
        elif k.startswith("model."):
            out["language_model." + k.removeprefix("model.")] = v
        else:
            raise RewardError(f"VideoAlign checkpoint: unexpected parameter {k!r}")
    return out, head


# --- video preprocessing ------------------------------------------------------------------------


def frame_indices(total: int, source_fps: float, fps: float, num_frames: int | None) -> Tensor:
    """qwen-vl-utils' ``smart_nframes`` + uniform sampling: int64 ``[n]`` frame indices of a
    clip of ``total`` frames at ``source_fps``, sampled at ``fps`` (or ``num_frames``)."""
    if num_frames is not None:
        n = round(num_frames / FRAME_FACTOR) * FRAME_FACTOR
    else:
        lo = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(min(FPS_MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        n = min(max(total / source_fps * fps, lo), hi)
        n = round(n / FRAME_FACTOR) * FRAME_FACTOR
    n = min(n, total)
    if not FRAME_FACTOR <= n <= total:
        raise RewardError(
            f"videoalign scores videos of at least {FRAME_FACTOR} frames; got {total} frame(s) "
            f"(images cannot be scored)"
        )
    return torch.linspace(0, total - 1, n).round().long()


def smart_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's frame size: sides multiples of ``factor``, area in [min, max], aspect kept."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


@dataclass
class PatchSpec:
    """The processor settings (``preprocessor_config.json`` of the base model)."""

    patch: int = 14
    temporal: int = 2
    merge: int = 2
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PatchSpec:
        size = d.get("size") or {}
        return cls(
            patch=int(d.get("patch_size", 14)),
            temporal=int(d.get("temporal_patch_size", 2)),
            merge=int(d.get("merge_size", 2)),
            mean=tuple(d.get("image_mean", CLIP_MEAN)),
            std=tuple(d.get("image_std", CLIP_STD)),
            min_pixels=int(d.get("min_pixels") or size.get("shortest_edge") or 56 * 56),
            max_pixels=int(d.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280),
        )


def resize_frames(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """frames ``[T, C, H, W]`` in [0, 1] -> uint8-valued fp32 ``[T, C, h, w]`` in [0, 255]: the
    uint8 frames of a decoded video, resized as torchvision resizes uint8 (bicubic, antialias,
    clamped and rounded)."""
    x = (frames.float().clamp(0, 1) * 255).round()
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0, 255).round()
    return x


def video_patches(frames: Tensor, spec: PatchSpec) -> tuple[Tensor, tuple[int, int, int]]:
    """The Qwen2-VL processor's video path on frames ``[T, C, h, w]`` in [0, 255] (sides
    multiples of ``patch * merge``): rescale, normalise, pad T to a multiple of the temporal
    patch (repeating the last frame), and flatten to ``[t*gh*gw, C*temporal*patch*patch]``
    ordered by merge windows. Returns the patches and ``(t, gh, gw)``."""
    x = frames / 255.0
    mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    x = (x - mean) / std
    if pad := -x.shape[0] % spec.temporal:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    t_all, c, h, w = x.shape
    p, m, tp = spec.patch, spec.merge, spec.temporal
    t, gh, gw = t_all // tp, h // p, w // p
    x = x.reshape(t, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * gh * gw, c * tp * p * p), (t, gh, gw)


def chat_text(instruction: str) -> str:
    """Qwen2-VL-Instruct's chat template rendered for one user turn holding a video and then
    ``instruction``, with the assistant generation prompt (as ``apply_chat_template(...,
    add_generation_prompt=True)`` renders VideoAlign's messages)."""
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|><|video_pad|><|vision_end|>{instruction}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


# --- loading ------------------------------------------------------------------------------------

_FILES = ["model_config.json", "checkpoint-*/model.pth", "checkpoint-*/tokenizer/*"]


def snapshot(checkpoint: str) -> str:
    """A local folder holding the VideoReward layout: ``checkpoint`` itself, or its hub snapshot
    (``model_config.json``, ``checkpoint-*/model.pth``, ``checkpoint-*/tokenizer/``; nothing is
    downloaded when offline). Raises :class:`WeightsNotFound` with the fix."""
    if os.path.isdir(checkpoint):
        return checkpoint
    if checkpoint.startswith((".", "/", "~")):
        raise WeightsNotFound(f"VideoAlign: local path {checkpoint!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return str(snapshot_download(checkpoint, allow_patterns=_FILES,
                                     local_files_only=offline()))
    except Exception as e:  # offline, 404, connection: the hub raises many types
        why = " (HF_HUB_OFFLINE is set)" if offline() else ""
        raise WeightsNotFound(
            f"cannot load VideoAlign weights {checkpoint!r}: not a local folder and not in the "
            f"Hugging Face cache{why}. Download them first (huggingface-cli download "
            f"{checkpoint}) or pass a local folder with model_config.json and "
            f"checkpoint-<step>/model.pth.\n  cause: {type(e).__name__}: {str(e)[:300]}"
        ) from None


def checkpoint_dir(root: str, step: int | None = None) -> str:
    """``root/checkpoint-<step>``, the highest step by default (VideoAlign
    ``load_model_from_checkpoint``)."""
    found = glob.glob(os.path.join(root, "checkpoint-*"))
    steps = {int(m.group(1)): p for p in found if (m := re.search(r"checkpoint-(\d+)$", p))}
    if not steps:
        raise WeightsNotFound(f"VideoAlign: no checkpoint-<step> folder in {root!r}")
    if step is not None and step >= 0:
        if step not in steps:
            raise WeightsNotFound(f"VideoAlign: no checkpoint-{step} in {root!r} "
                                  f"(have {sorted(steps)})")
        return steps[step]
    return steps[max(steps)]


def _tokenizer(ckpt: str, base: str) -> Any:
    from transformers import AutoTokenizer

    from branchgrpo.rewards.hub import load_pretrained

    path = os.path.join(ckpt, "tokenizer")
    tok = load_pretrained(AutoTokenizer.from_pretrained, path if os.path.isdir(path) else base,
                          "VideoAlign tokenizer", padding_side="right")
    missing = [t for t in REWARD_TOKENS if t not in tok.get_vocab()]
    if missing:  # VideoAlign adds them to the base tokenizer when training starts
        tok.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    return tok


def load_videoalign(
    checkpoint: str,
    base: str | None = None,
    step: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "bf16",
) -> tuple[nn.Module, Tensor, Any, VideoAlignConfig, PatchSpec]:
    """The released VideoReward: ``(Qwen2VLModel, rm_head weight [out, hidden], tokenizer,
    config, processor settings)``, in eval mode on ``device`` in ``dtype``.

    ``checkpoint``: hub id or folder (module docstring layout); ``base``: the base model (its
    ``config.json`` and ``preprocessor_config.json``), default ``model_config.json``'s
    ``model_name_or_path``; ``step``: which ``checkpoint-<step>`` (default the highest)."""
    from transformers import Qwen2VLConfig, Qwen2VLModel

    from branchgrpo.rewards.hub import load_state_dict

    root = snapshot(checkpoint)
    with open(hub_file(root, "model_config.json", "VideoAlign")) as f:
        cfg = VideoAlignConfig.from_json(json.load(f))
    base = base or cfg.base
    config_path = hub_file(base, "config.json", "VideoAlign base model")
    with open(hub_file(base, "preprocessor_config.json", "VideoAlign base processor")) as f:
        spec = PatchSpec.from_json(json.load(f))
    ckpt = checkpoint_dir(root, step)
    weights = os.path.join(ckpt, "model.pth")
    if not os.path.isfile(weights):
        raise WeightsNotFound(f"VideoAlign: {weights!r} not found (only the full model.pth "
                              "checkpoint of the release is supported)")
    sd, head = released_to_hf(load_state_dict(weights), cfg.lora_scale if cfg.lora else 0.0)
    config = Qwen2VLConfig.from_pretrained(os.path.dirname(config_path), local_files_only=True)
    config.text_config.vocab_size = int(sd["language_model.embed_tokens.weight"].shape[0])
    dt = resolve_dtype(dtype)
    model = Qwen2VLModel._from_config(config, dtype=dt, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RewardError(f"VideoAlign checkpoint {weights!r} does not match the base config "
                          f"{base!r}: missing {list(missing)[:5]}, unexpected "
                          f"{list(unexpected)[:5]}")
    dev = resolve_device(device)
    model = model.to(dev, dt).eval().requires_grad_(False)
    return model, head.to(dev, dt), _tokenizer(ckpt, base), cfg, spec


# --- the reward ---------------------------------------------------------------------------------


class VideoAlignReward:
    """Videos ``[B, F, C, H, W]`` in [0, 1], B prompts -> fp32 ``[B]``:
    ``sum_k weights[k] * head_k`` over the (normalised) VQ / MQ / TA heads. The heads of the last
    call are kept in ``last_heads`` (name -> fp32 ``[B]`` on the CPU)."""

    groupwise = False
    media = ("video",)

    def __init__(
        self,
        model: nn.Module,
        head: Tensor,
        tokenizer: Any,
        cfg: VideoAlignConfig,
        spec: PatchSpec,
        weights: Mapping[str, float] | None = None,
        normalize: bool = True,
        source_fps: float = 16.0,
        min_pixels: int = VIDEO_MIN_PIXELS,
        name: str = "videoalign",
    ) -> None:
        if cfg.reward_token != "special" or cfg.template != "detailed_special":
            raise RewardError(f"videoalign: only the released reward-token checkpoints are "
                              f"supported (reward_token={cfg.reward_token!r}, "
                              f"prompt_template_type={cfg.template!r})")
        if cfg.sample_type != "uniform" or cfg.output_dim not in (1, 3):
            raise RewardError(f"videoalign: unsupported sample_type={cfg.sample_type!r} or "
                              f"output_dim={cfg.output_dim}")
        self.weights = _head_weights(weights)
        self.model, self.head, self.tokenizer = model, head, tokenizer
        self.cfg, self.spec, self.normalize, self.name = cfg, spec, normalize, name
        self.source_fps, self.min_pixels = float(source_fps), int(min_pixels)
        ids = tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS))
        if len(set(ids)) != 3 or tokenizer.unk_token_id in ids:
            raise RewardError(f"videoalign: the tokenizer lacks the reward tokens {REWARD_TOKENS}")
        self.token_ids = torch.tensor(ids)
        self.video_token_id = int(model.config.video_token_id)
        self.last_heads: dict[str, Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.head.device

    def inputs(self, media: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The model inputs of a batch (what VideoAlign's ``prepare_batch`` gives): right-padded
        ``input_ids``/``attention_mask`` ``[B, L]``, ``pixel_values_videos``
        ``[B*t*gh*gw, C*2*14*14]`` and ``video_grid_thw`` ``[B, 3]``."""
        if media.dim() != 5:
            raise RewardError(f"videoalign scores videos [B, F, C, H, W]; got {tuple(media.shape)}"
                              " (images cannot be scored)")
        b, f, _, h, w = media.shape
        idx = frame_indices(f, self.source_fps, self.cfg.fps, self.cfg.num_frames)
        factor = self.spec.patch * self.spec.merge
        size = smart_resize(h, w, factor, self.min_pixels, self.cfg.max_frame_pixels)
        size = smart_resize(*size, factor, self.spec.min_pixels, self.spec.max_pixels)
        patches, grids = [], []
        for video in media:
            frames = resize_frames(video[idx.to(video.device)].to(self.device), size)
            p, grid = video_patches(frames, self.spec)
            patches.append(p)
            grids.append(grid)
        t, gh, gw = grids[0]
        pad = "<|video_pad|>" * (t * gh * gw // self.spec.merge**2)
        texts = [chat_text(build_prompt(p)).replace("<|video_pad|>", pad) for p in prompts]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        return {
            "input_ids": enc["input_ids"].to(self.device),
            "attention_mask": enc["attention_mask"].to(self.device),
            "pixel_values_videos": torch.cat(patches),
            "video_grid_thw": torch.tensor(grids, device=self.device),
        }

    @torch.no_grad()
    def raw_heads(self, batch: Mapping[str, Tensor]) -> Tensor:
        """VideoAlign's forward: fp32 ``[B, 3]`` (VQ, MQ, TA) before normalisation."""
        ids = batch["input_ids"]
        lm, visual = self.model.language_model, self.model.visual
        emb = lm.embed_tokens(ids)
        pix = batch["pixel_values_videos"].to(self.head.dtype)
        feats = visual(pix, grid_thw=batch["video_grid_thw"]).pooler_output
        where = ids == self.video_token_id
        if int(where.sum()) != feats.shape[0]:
            raise RewardError(f"videoalign: {int(where.sum())} video tokens for "
                              f"{feats.shape[0]} video features")
        emb = emb.masked_scatter(where.unsqueeze(-1).expand_as(emb), feats.to(emb.dtype))
        # no position_ids: sequential positions, as VideoAlign's forward gets from the text model
        hidden = lm(inputs_embeds=emb, attention_mask=batch["attention_mask"]).last_hidden_state
        logits = F.linear(hidden, self.head)  # [B, L, out]
        special = torch.isin(ids, self.token_ids.to(ids.device))
        if bool((special.sum(dim=1) != 3).any()):
            raise RewardError("videoalign: each text must hold the three reward tokens once")
        pooled = logits[special].view(ids.shape[0], 3, -1)
        pooled = pooled.diagonal(dim1=1, dim2=2) if pooled.shape[-1] == 3 else pooled[..., 0]
        return pooled.float()

    def heads(self, media: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Head name -> fp32 ``[B]`` (on the CPU), normalised when ``normalize``."""
        raw = self.raw_heads(self.inputs(media, prompts)).cpu()
        out = {}
        for i, h in enumerate(HEADS):
            v = raw[:, i]
            if self.normalize and h in self.cfg.mean and h in self.cfg.std:
                v = (v - self.cfg.mean[h]) / self.cfg.std[h]
            out[h] = v
        return out

    def __call__(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        self.last_heads = self.heads(media, prompts)
        return sum(w * self.last_heads[h] for h, w in self.weights.items())  # type: ignore[return-value]


def _head_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    """``{"MQ": 1.0}`` by default; keys VQ / MQ / TA (any case), or ``Overall`` (= all three)."""
    if weights is None:
        return {"MQ": 1.0}
    out: dict[str, float] = {}
    for k, v in dict(weights).items():
        key = str(k).upper()
        keys = HEADS if key == "OVERALL" else (key,)
        if key not in HEADS and key != "OVERALL":
            raise ValueError(f"videoalign weights: unknown head {k!r}; use VQ, MQ, TA or Overall")
        for h in keys:
            out[h] = out.get(h, 0.0) + float(v)
    if not out:
        raise ValueError("videoalign weights: name at least one head (VQ, MQ, TA)")
    return out


_LOADED: dict[tuple[str, ...], tuple[Any, ...]] = {}
"""Loaded checkpoints, so several reward entries (one per head, say) share one model."""


@REWARDS.register("videoalign")
def videoalign(
    checkpoint: str = "KwaiVGI/VideoReward",
    base: str | None = None,
    step: int | None = None,
    weights: Mapping[str, float] | None = None,
    normalize: bool = True,
    source_fps: float = 16.0,
    min_pixels: int = VIDEO_MIN_PIXELS,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "bf16",
) -> VideoAlignReward:
    """VideoAlign reward (module docstring): videos ``[B, F, C, H, W]`` -> fp32 ``[B]``.

    ``weights``: head -> weight (default ``{"MQ": 1.0}``, BranchGRPO's motion quality);
    ``normalize``: z-score the heads with ``inference_config`` (VideoAlign ``use_norm``);
    ``source_fps``: the frame rate of the media (Wan2.1: 16), from which 2 fps are sampled;
    ``base``/``step``: see :func:`load_videoalign`. The default dtype is bf16, as VideoAlign's
    inference."""
    dev = resolve_device(device)
    key = (checkpoint, str(base), str(step), str(dev), str(resolve_dtype(dtype)))
    if key not in _LOADED:
        _LOADED[key] = load_videoalign(checkpoint, base, step, dev, dtype)
    model, head, tok, cfg, spec = _LOADED[key]
    return VideoAlignReward(model, head, tok, cfg, spec, weights, normalize, source_fps,
                            min_pixels)


videoalign.media = ("video",)  # type: ignore[attr-defined]  # read by preflight

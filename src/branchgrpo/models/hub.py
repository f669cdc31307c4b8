"""Shared code of the diffusers-backed policies (FLUX, SD3, Wan): checkpoint resolution that
fails fast offline, freezing, the prompt-embedding cache, bf16 autocast, and offline tiny
tokenizers for tests and benchmarks.

`DiffusersPolicy` holds what every family shares: the trainable ``transformer``, a diffusers
``pipe`` that owns the frozen text encoders and VAE (``None`` for embedding-only benchmark
policies), the prompt cache, and the fine-tuning setup. Families add ``latent_shape``,
``velocity``, ``decode`` and ``_encode_uncached``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import string
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from .base import Cond
from .lora import LoraSpec, setup_finetune


class ModelNotAvailableError(RuntimeError):
    """A checkpoint is neither a local folder nor in the Hugging Face cache, and cannot be
    downloaded now (offline, no network, gated or unknown repository)."""


def _offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    from huggingface_hub import constants

    return env or bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the Hub endpoint (seconds, not the minutes of a stalled download)."""
    from huggingface_hub import constants

    url = urlparse(os.environ.get("HF_ENDPOINT", constants.ENDPOINT))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _advice(model_id: str, why: str) -> str:
    return (f"cannot load {model_id!r}: {why}.\nDownload it first on a machine with network "
            f"access: `hf download {model_id}` (older clients: `huggingface-cli download "
            f"{model_id}`; gated models such as FLUX.1-dev also need `hf auth login` and "
            f"accepting the licence on huggingface.co), then run again, or pass the path of a "
            f"local folder in the diffusers layout (model_index.json, transformer/, vae/, ...) "
            f"instead of the id.")


def resolve_checkpoint(
    model_id_or_path: str | os.PathLike, subfolders: Sequence[str] = (),
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """A local folder for ``model_id_or_path``: the folder itself, the cached snapshot, or a
    fresh download of the needed ``subfolders`` when the Hub is reachable.

    Raises `ModelNotAvailableError` within seconds when none of these works (the caller sees
    what to do, not a stack trace after a long network timeout)."""
    p = Path(model_id_or_path).expanduser()
    if p.is_dir():
        missing = [s for s in subfolders if not (p / s).is_dir()]
        if missing:
            raise ModelNotAvailableError(
                f"local checkpoint {str(p)!r} lacks the subfolder(s) {missing}; pass a folder "
                f"in the diffusers layout (as written by `pipeline.save_pretrained`)")
        return str(p)
    repo = str(model_id_or_path)
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise ModelNotAvailableError(_advice(repo, "no such local folder, and not a Hub id "
                                                   "of the form 'owner/name'"))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    patterns = ["model_index.json"] + [f"{s}/*" for s in subfolders] if subfolders else None
    kw: dict[str, Any] = {"cache_dir": cache_dir, "allow_patterns": patterns}
    try:
        return str(snapshot_download(repo, local_files_only=True, **kw))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        pass
    if _offline():
        raise ModelNotAvailableError(_advice(repo, "it is not in the local Hugging Face cache "
                                                   "and HF_HUB_OFFLINE is set"))
    if not _hub_reachable():
        raise ModelNotAvailableError(_advice(repo, "it is not in the local Hugging Face cache "
                                                   "and the Hub cannot be reached"))
    try:
        return str(snapshot_download(repo, **kw))
    except GatedRepoError as e:
        raise ModelNotAvailableError(_advice(repo, "the repository is gated")) from e
    except RepositoryNotFoundError as e:
        raise ModelNotAvailableError(_advice(repo, "no such repository on the Hub")) from e
    except OSError as e:
        raise ModelNotAvailableError(_advice(repo, f"the download failed ({e})")) from e


def load_pipeline(pipeline_cls: type, model_id_or_path: str | os.PathLike,
                  subfolders: Sequence[str], dtype: torch.dtype,
                  cache_dir: str | os.PathLike | None = None, **components: Any) -> Any:
    """``pipeline_cls.from_pretrained`` on the resolved local folder (never the network)."""
    path = resolve_checkpoint(model_id_or_path, subfolders, cache_dir)
    try:
        return pipeline_cls.from_pretrained(path, local_files_only=True,
                                            **{dtype_kwarg(): dtype}, **components)
    except OSError as e:
        raise ModelNotAvailableError(_advice(str(model_id_or_path),
                                             f"files are missing in {path} ({e})")) from e


def dtype_kwarg() -> str:
    """``dtype`` for diffusers versions that deprecate ``torch_dtype``, else ``torch_dtype``."""
    try:
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else (
            "torch_dtype")
    except ImportError:
        return "torch_dtype"


def freeze(*modules: nn.Module | None) -> None:
    """requires_grad False and eval mode (text encoders, VAE)."""
    for m in modules:
        if m is not None:
            m.requires_grad_(False).eval()


def prompt_seed(prompt: str) -> int:
    """A stable per-prompt seed (for embedding-free benchmark policies)."""
    import hashlib

    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)


class DiffusersPolicy:
    """Base of the diffusers-backed policies (see the module docstring).

    ``dtype`` is the compute dtype: bf16 runs the transformer under ``torch.autocast``; the
    step math stays fp32 because ``velocity`` returns fp32. ``pipe`` may be ``None``
    (embedding-only benchmark policy)."""

    pipeline_class: type | None = None
    default_lora_targets: tuple[str, ...] = ()
    latent_shape: tuple[int, ...]

    def __init__(
        self, transformer: nn.Module, pipe: Any | None, *, device: torch.device | str | None,
        dtype: torch.dtype, lora: LoraSpec | None, full_finetune: bool,
        gradient_checkpointing: bool, offload_encoders: bool,
    ) -> None:
        self.transformer = transformer
        self.pipe = pipe
        self.device = torch.device(device) if device is not None else _device_of(transformer)
        self.dtype = dtype
        self.offload_encoders = offload_encoders
        self._cache: dict[str, dict[str, Tensor]] = {}
        if pipe is not None:
            freeze(*self.frozen_modules())
            for m in self.frozen_modules():
                if m is not None and m not in self.text_encoders():
                    m.to(self.device)
            for m in self.text_encoders():
                m.to("cpu" if offload_encoders else self.device)
        self.transformer.to(self.device)
        setup_finetune(self.transformer, lora=lora, full_finetune=full_finetune,
                       gradient_checkpointing=gradient_checkpointing,
                       default_targets=self.default_lora_targets)
        self._model_dtype = next(p.dtype for n, p in self.transformer.named_parameters()
                                 if (not p.requires_grad or lora is None)
                                 and not keeps_fp32(self.transformer, n))

    # ---- family hooks -------------------------------------------------------------------
    def text_encoders(self) -> list[nn.Module]:
        """The pipeline's text encoders (offloaded to CPU between encodes if asked)."""
        if self.pipe is None:
            return []
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for n in names if (m := getattr(self.pipe, n, None)) is not None]

    def frozen_modules(self) -> list[nn.Module]:
        """Text encoders and VAE."""
        vae = getattr(self.pipe, "vae", None) if self.pipe is not None else None
        return self.text_encoders() + ([vae] if vae is not None else [])

    def _encode_uncached(self, prompts: list[str]) -> dict[str, Tensor]:
        """Embeddings {name: [b, ...]} of ``prompts``; overridden per family."""
        raise NotImplementedError

    # ---- Policy protocol ----------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> Cond:
        """Conditioning {name: [B, ...]} on ``device``; each distinct prompt is encoded once
        and cached (on the device it was computed on)."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing and getattr(self, "_encoders_dropped", False):
            raise ValueError(f"prompts {missing[:3]} are not cached and the text encoders were "
                             "dropped (drop_encoders); encode every prompt before dropping")
        if missing:
            with torch.no_grad(), self._encoders_on_device():
                enc = self._encode_uncached(missing)
            for i, p in enumerate(missing):
                self._cache[p] = {k: v[i].detach() for k, v in enc.items()}
        rows = [self._cache[p] for p in prompts]
        return {k: torch.stack([r[k] for r in rows]).to(self.device) for k in rows[0]}

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """Transformer parameters with requires_grad (LoRA only, all, or none)."""
        return [p for p in self.transformer.parameters() if p.requires_grad]

    # ---- helpers ------------------------------------------------------------------------
    def clear_cache(self) -> None:
        self._cache.clear()

    def drop_encoders(self) -> None:
        """Free the text encoders once every training prompt is cached (``encode`` of a new
        prompt then raises); saves ~10 GB for FLUX/SD3's T5-XXL."""
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if self.pipe is not None and getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)
        self._encoders_dropped = True

    @contextlib.contextmanager
    def _encoders_on_device(self) -> Iterator[None]:
        if self.offload_encoders:
            for m in self.text_encoders():
                m.to(self.device)
        try:
            yield
        finally:
            if self.offload_encoders:
                for m in self.text_encoders():
                    m.to("cpu")

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast around the transformer forward when ``dtype`` asks for it."""
        if self.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast(self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    def model_input(self, t: Tensor) -> Tensor:
        """Cast a floating input to the transformer's (base) weight dtype."""
        return t.to(self.device, self._model_dtype)


def _device_of(m: nn.Module) -> torch.device:
    p = next(m.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def keeps_fp32(module: nn.Module, name: str) -> bool:
    """Whether diffusers keeps tensor ``name`` of ``module`` in fp32 whatever ``torch_dtype``:
    a component of the dotted name is in the class's ``_keep_in_fp32_modules`` (diffusers'
    own test in ``load_model_dict_into_meta``; e.g. Wan's time_embedder, scale_shift_table,
    norm1-3)."""
    keep = getattr(type(module), "_keep_in_fp32_modules", None) or ()
    return bool(keep) and any(k in name.split(".") for k in keep)


def cast_weights(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating parameters and persistent buffers of a diffusers model to ``dtype``
    as ``from_pretrained(torch_dtype=dtype)`` leaves them: tensors under the class's
    ``_keep_in_fp32_modules`` (`keeps_fp32`) stay fp32. ``module.to(dtype)`` would cast those
    too. Non-persistent buffers are left as they are (from_pretrained does not cast them)."""
    persistent = set(module.state_dict(keep_vars=True))
    with torch.no_grad():
        tensors = list(module.named_parameters()) + list(module.named_buffers())
        for name, t in tensors:
            if name not in persistent or not t.is_floating_point():
                continue
            target = torch.float32 if keeps_fp32(module, name) else dtype
            if t.dtype != target:
                t.data = t.data.to(target)
    return module


def weight_dtype(dtype: torch.dtype, lora: LoraSpec | None, full_finetune: bool,
                 master_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """Storage dtype of the transformer weights: ``master_dtype`` (fp32) when they are trained
    in full (docs/algorithms.md §1.7: fp32 master weights, bf16 autocast), else ``dtype``."""
    return master_dtype if full_finetune and lora is None else dtype


# ---- offline tiny tokenizers (tests, benchmarks) ---------------------------------------
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


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ShiftedCFGPolicy(DiffusersPolicy):
    """Members shared by the classifier-free-guided families on a shifted schedule (SD3, Wan).

    ``guidance_scale`` <= 1 turns CFG off (one forward per row); ``negative_prompt`` is encoded
    once and stored per row beside the prompt embeddings; ``shift`` is the family's resolved
    schedule shift; ``quantize_timestep`` floors the transformer's timestep 1000 sigma;
    ``detach_uncond`` stops gradients through the unconditional half (Flow-GRPO's
    Jul-2025 code). ``base`` goes to `DiffusersPolicy` (device, dtype, LoRA, ...)."""

    def __init__(self, pipe: Any, *, guidance_scale: float, negative_prompt: str,
                 max_sequence_length: int, shift: float, detach_uncond: bool,
                 decode_batch: int, quantize_timestep: bool = False, **base: Any) -> None:
        self.guidance_scale = guidance_scale
        self.negative_prompt = negative_prompt
        self.max_sequence_length = max_sequence_length
        self.shift = float(shift)
        self.detach_uncond = detach_uncond
        self.decode_batch = decode_batch
        self.quantize_timestep = quantize_timestep
        super().__init__(pipe.transformer, pipe, **base)

    def timestep(self, sigma: Tensor) -> Tensor:
        """The transformer's timestep [N] fp32: 1000 sigma, floored with ``quantize_timestep``
        (the FastVideo repos' int(1000 sigma))."""
        from ..engine.schedule import transformer_timesteps

        return transformer_timesteps(sigma.to(self.device), 1000.0, self.quantize_timestep)

    @property
    def do_cfg(self) -> bool:
        """CFG is on above scale 1 (one forward per row otherwise)."""
        return self.guidance_scale > 1.0

    def default_schedule(self) -> dict[str, Any]:
        """kwargs of `branchgrpo.engine.schedule.make_sigmas`: the shifted schedule at ``shift``."""
        return {"kind": "shifted", "shift": self.shift}

    def plan_kwargs(self) -> dict[str, Any]:
        """The same schedule as keyword arguments of `branchgrpo.engine.plans.build_plan`."""
        return {"schedule": "shifted", "shift": self.shift}

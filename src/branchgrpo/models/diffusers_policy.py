"""`DiffusersPolicy`: the one `Policy` class of the diffusers families, composing a `Family`
(the family's hooks: `branchgrpo.models.family`) with what every family shares: the trainable
``transformer``, the diffusers ``pipe`` owning the frozen text encoders and VAE, the per-prompt
embedding cache, encoder offload, bf16 autocast. Fine-tuning (LoRA / full / frozen) is set by
`branchgrpo.models.lora.setup_finetune`; `compose` does both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ConfigError
from .base import Cond
from .embeddings import PromptEmbeddings, text_options
from .family import Family, family_timestep, plan_kwargs
from .loading import keeps_fp32
from .lora import LoraSpec, setup_finetune

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
"""Pipeline attribute names of the text encoders (offloaded, frozen)."""


class DiffusersPolicy:
    """A diffusers-backed policy: ``family`` hooks over ``transformer`` and ``pipe``.

    ``dtype`` is the compute dtype: bf16 runs the transformer under ``torch.autocast``; the
    step math stays fp32 because ``velocity`` returns fp32. ``pipe`` may be ``None`` with a
    ``transformer`` (embedding-only benchmark policy). ``offload_encoders`` keeps the text
    encoders on the CPU between encodes. ``prompt_embeddings`` (a `PromptEmbeddings` file, the
    pipeline loaded without text encoders): `encode` reads each prompt's rows from it.
    Modules on the meta device (``branchgrpo encode``'s encoders-only pipeline) stay there."""

    def __init__(
        self, family: Family, pipe: Any | None, *, transformer: nn.Module | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
        offload_encoders: bool = False, prompt_embeddings: PromptEmbeddings | None = None,
    ) -> None:
        self.family = family
        self.transformer = transformer if transformer is not None else pipe.transformer
        self.pipe = pipe
        self.device = torch.device(device) if device is not None else _device_of(self.transformer)
        self.dtype = dtype
        self.offload_encoders = offload_encoders
        self._cache: dict[str, dict[str, Tensor]] = {}
        self.encoders_freed = False
        self.prompt_embeddings = prompt_embeddings
        freeze(*self.frozen_modules())
        for m in self.frozen_modules():
            if m not in self.text_encoders() and not on_meta(m):
                m.to(self.device)
        for m in self.text_encoders():
            m.to("cpu" if offload_encoders else self.device)
        if not on_meta(self.transformer):
            self.transformer.to(self.device)
        self.model_dtype = base_dtype(self.transformer)

    # ---- family facts -------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.family.latent_shape

    @property
    def token_period(self) -> int:
        return self.family.token_period

    @property
    def pipeline_class(self) -> type:
        """The family's diffusers pipeline class (LoRA export and import)."""
        import diffusers

        return getattr(diffusers, self.family.pipeline_name)

    def timestep(self, sigma: Tensor) -> Tensor:
        """The transformer's timestep [N] fp32 from sigma [N] (`family_timestep`)."""
        return family_timestep(self.family, sigma.to(self.device))

    def default_schedule(self) -> dict[str, Any]:
        """kwargs of `branchgrpo.engine.schedule.make_sigmas` (add num_steps)."""
        return self.family.default_schedule()

    def plan_kwargs(self) -> dict[str, Any]:
        """The same schedule as keyword arguments of `branchgrpo.engine.plans.build_plan`."""
        return plan_kwargs(self.family.default_schedule())

    # ---- Policy protocol ----------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> Cond:
        """Conditioning {name: [B, ...]} on ``device``; each distinct prompt is encoded once
        and cached (on the device it was computed on; read from ``prompt_embeddings`` into a
        CPU cache when the policy has that file, KeyError for a prompt it lacks)."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing and self.prompt_embeddings is not None:
            self._cache |= self.prompt_embeddings.rows(missing)
            missing = []
        if missing and self.encoders_freed:
            raise KeyError(f"prompt {missing[0]!r} was not encoded before the text encoders were "
                           f"freed (model.free_encoders): {len(missing)} new prompt(s); list "
                           "them in data.prompts or data.eval_prompts, or set "
                           "model.free_encoders=false")
        if missing:
            with torch.no_grad(), self._encoders_on_device():
                enc = self.family.encode(self, missing)
            for i, p in enumerate(missing):
                self._cache[p] = {k: v[i].detach() for k, v in enc.items()}
        rows = [self._cache[p] for p in prompts]
        return {k: torch.stack([r[k] for r in rows]).to(self.device) for k in rows[0]}

    def clear_cache(self) -> None:
        """Forget every cached prompt embedding (``branchgrpo encode`` keeps none)."""
        self._cache.clear()

    def free_encoders(self, prompts: Sequence[str], chunk: int = 8) -> None:
        """Encode every distinct prompt of ``prompts`` (``chunk`` at a time) into the cache,
        move the cache to the CPU (`encode` brings rows back to ``device``), then drop the text
        encoders: the pipeline no longer references them, so their memory is freed on every
        device. `encode` of a prompt not encoded here then raises KeyError."""
        todo = list(dict.fromkeys(prompts))
        for i in range(0, len(todo), chunk):
            self.encode(todo[i:i + chunk])
        self._cache = {p: {k: v.cpu() for k, v in r.items()} for p, r in self._cache.items()}
        for n in TEXT_ENCODERS:
            if getattr(self.pipe, n, None) is not None:
                setattr(self.pipe, n, None)
        self.encoders_freed = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """Guided v [N, *latent_shape] fp32 at x [N, *latent_shape], sigma [N]."""
        return self.family.velocity(self, x, sigma, cond)

    @torch.no_grad()
    def decode(self, x0: Tensor) -> Tensor:
        """Media in [0, 1]: images [N, 3, H, W] or videos [N, F, 3, H, W]."""
        return self.family.decode(self, x0)

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """Transformer parameters with requires_grad (LoRA only, all, or none)."""
        return [p for p in self.transformer.parameters() if p.requires_grad]

    # ---- shared machinery ---------------------------------------------------------------
    def text_encoders(self) -> list[nn.Module]:
        """The pipeline's text encoders (offloaded to CPU between encodes if asked)."""
        if self.pipe is None:
            return []
        return [m for n in TEXT_ENCODERS if (m := getattr(self.pipe, n, None)) is not None]

    def frozen_modules(self) -> list[nn.Module]:
        """Text encoders and VAE."""
        vae = getattr(self.pipe, "vae", None) if self.pipe is not None else None
        return self.text_encoders() + ([vae] if vae is not None else [])

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
        """Cast a floating input to the transformer's (base) weight dtype, on ``device``."""
        return t.to(self.device, self.model_dtype)


def compose(
    family_cls: Any, pipe: Any | None, *, transformer: nn.Module | None = None,
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    lora: LoraSpec | None = None, full_finetune: bool = False,
    gradient_checkpointing: bool = False, offload_encoders: bool = False,
    prompt_embeddings: str = "", **options: Any,
) -> DiffusersPolicy:
    """The policy of family class ``family_cls`` over ``pipe`` (or a bare ``transformer``):
    ``family_cls.of(pipe, transformer, **options)``, then fine-tuning set up (LoRA when
    ``lora`` is given, else full or frozen; `branchgrpo.models.lora.setup_finetune`).
    ``prompt_embeddings``: the path of a prompt-embedding file `encode` reads (`open_for`
    checks it was written for this family's options)."""
    family = family_cls.of(pipe, transformer, **options)
    embeddings = open_for(family, prompt_embeddings) if prompt_embeddings else None
    policy = DiffusersPolicy(family, pipe, transformer=transformer, device=device, dtype=dtype,
                             offload_encoders=offload_encoders, prompt_embeddings=embeddings)
    setup_finetune(policy, lora=lora, full_finetune=full_finetune,
                   gradient_checkpointing=gradient_checkpointing)
    return policy


def open_for(family: Family, path: str) -> PromptEmbeddings:
    """The prompt-embedding file ``path`` opened, after checking that its ``text`` options
    (`text_options`: token length, negative prompt, CFG rows) are the configured family's;
    `ConfigError` naming the command that rewrites it otherwise. (Preflight checks the config
    values before any model loads; this checks what only the built family knows.)"""
    emb = PromptEmbeddings(path)
    ours = text_options(family)
    if emb.meta.get("text") != ours:
        raise ConfigError(f"the prompt-embedding file {path} was encoded with "
                          f"{emb.meta.get('text')}, this run's {type(family).__name__} encodes "
                          f"with {ours}: write it again with: branchgrpo encode CONFIG --out "
                          f"{path}")
    return emb


def on_meta(m: nn.Module) -> bool:
    """Whether ``m``'s first parameter is on the meta device (built from a config only)."""
    return _device_of(m).type == "meta"


def freeze(*modules: nn.Module) -> None:
    """requires_grad False and eval mode (text encoders, VAE)."""
    for m in modules:
        m.requires_grad_(False).eval()


def base_dtype(transformer: nn.Module) -> torch.dtype:
    """The dtype of the transformer's base weights: its first parameter that is neither a LoRA
    matrix (fp32) nor under the class's ``_keep_in_fp32_modules``."""
    return next(p.dtype for n, p in transformer.named_parameters()
                if "lora_" not in n and not keeps_fp32(transformer, n))


def _device_of(m: nn.Module) -> torch.device:
    p = next(m.parameters(), None)
    return p.device if p is not None else torch.device("cpu")

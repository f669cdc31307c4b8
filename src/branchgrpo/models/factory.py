"""Build a policy from plain values (`ModelOptions`: the recipe fills them from its config),
and read the prompt sets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from .base import Policy

SOURCES = Path(__file__).resolve().parents[3] / "data" / "sources.json"


@dataclass(frozen=True)
class ModelOptions:
    """What a family builder reads; defaults are the config's. ``kind``: a key of
    `branchgrpo.models.families.FAMILIES`. ``path``: Hub id or local folder (diffusers
    families). ``dtype``: compute dtype name (fp32, bf16, fp16). ``finetune``: full or lora
    (``lora_rank``, ``lora_alpha``). ``guidance``: FLUX's guidance embedding or the CFG scale
    (None: the family's default); ``guidance_2``, ``experts``: Wan2.2 A14B's low-noise CFG
    scale and trained experts; ``images``: the image-to-video family's prompt -> first-frame
    file.
    ``quantize_timestep``: the resolved rule (`branchgrpo.spec.RunSpec`). ``pretrain_steps``,
    ``clutter``, ``cache_dir``: the tiny family's pretraining and cache. ``progress``: show the
    tiny pretraining bar. ``compile``, ``attention_backend``: see `speed_up`. ``quantize``:
    the frozen base's storage (`branchgrpo.models.loading.quantization_config`);
    ``offload_encoders``: text encoders on the CPU between encodes (`DiffusersPolicy`);
    ``free_encoders``: read by the trainer (`DiffusersPolicy.free_encoders`);
    ``prompt_embeddings``: a prompt-embedding file (`branchgrpo.models.embeddings`) read
    instead of loading the text encoders; ``encoders_only``: load only the text encoders and
    tokenizers (``branchgrpo encode``; every other component on the meta device)."""

    kind: str = "tiny"
    path: str = ""
    dtype: str = "fp32"
    finetune: str = "full"
    lora_rank: int = 32
    lora_alpha: float = 64.0
    gradient_checkpointing: bool = False
    quantize: str = "none"
    offload_encoders: bool = False
    free_encoders: bool = False
    prompt_embeddings: str = ""
    encoders_only: bool = False
    compile: bool = False
    attention_backend: str = "native"
    height: int = 512
    width: int = 512
    num_frames: int = 33
    guidance: float | None = None
    guidance_2: float | None = None
    experts: str = "all"
    images: str = ""
    quantize_timestep: bool = False
    pretrain_steps: int = 8000
    clutter: float = 0.8
    cache_dir: str = "~/.cache/branchgrpo"
    progress: bool = True

    def diffusers_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `branchgrpo.models.loading.load` shared by the diffusers
        families (dtype, fine-tuning, size, guidance, timestep rule)."""
        from .loading import DTYPES
        from .lora import LoraSpec

        lora = (LoraSpec(rank=self.lora_rank, alpha=self.lora_alpha)
                if self.finetune == "lora" else None)
        guidance = {} if self.guidance is None else {"guidance_scale": self.guidance}
        return {"dtype": DTYPES[self.dtype], "lora": lora,
                "full_finetune": self.finetune == "full", "height": self.height,
                "width": self.width, "gradient_checkpointing": self.gradient_checkpointing,
                "quantize_timestep": self.quantize_timestep, "quantize": self.quantize,
                "offload_encoders": self.offload_encoders,
                "prompt_embeddings": self.prompt_embeddings, "components": self.components(),
                **guidance}

    def components(self) -> str:
        """`branchgrpo.models.loading.load_pipeline`'s ``components``: "encoders" (only the
        text encoders), "no_encoders" (a prompt-embedding file instead) or "all"."""
        if self.encoders_only:
            return "encoders"
        return "no_encoders" if self.prompt_embeddings else "all"


def build_policy(options: ModelOptions, device: torch.device,
                 prompts: Sequence[str] = ()) -> Policy:
    """The policy of family ``options.kind`` on ``device`` (registry:
    `branchgrpo.models.families.FAMILIES`); a diffusers family fails fast with
    `ModelNotAvailableError` when its weights are not on this machine. With
    ``options.free_encoders``: ``prompts`` (every prompt the run will encode) are encoded, then
    the text encoders dropped (`DiffusersPolicy.free_encoders`); without ``prompts``
    (inference) they are kept."""
    from .families import family_module

    policy = speed_up(family_module(options.kind).build(options, device), options)
    if options.free_encoders and prompts:
        policy.free_encoders(prompts)  # type: ignore[attr-defined]
    return policy


def speed_up(policy: Policy, options: ModelOptions) -> Policy:
    """The exact speed-ups of ``options`` on ``policy.transformer`` (every family but the
    analytic one has a diffusers transformer there): the diffusers attention backend
    (``set_attention_backend``; "native" is PyTorch SDPA, left as loaded), then regional
    compilation (``compile_repeated_blocks``: each repeated block class is compiled once and
    reused by every block, so compiling takes seconds, not minutes). Applied after LoRA is
    injected, so the adapters are compiled too; in place, so parameter names (checkpoints,
    LoRA export) do not change."""
    tr = getattr(policy, "transformer", None)
    if tr is None:
        if options.compile or options.attention_backend != "native":
            raise ConfigError(f"model.kind={options.kind} has no transformer to compile or to "
                              "give another attention backend")
        return policy
    if options.attention_backend != "native":
        tr.set_attention_backend(options.attention_backend)
    if options.compile:
        tr.compile_repeated_blocks(fullgraph=True)
    return policy


def fetch_hint(spec: str) -> str:
    """How to get the prompt file ``spec``: its command from ``data/sources.json``, else the
    general rule."""
    import json

    try:
        sources = json.loads(SOURCES.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        sources = {}
    key = Path(spec).as_posix().removeprefix("./")
    if key in sources:
        return f"fetch it with: {sources[key]} (data/README.md)"
    return "give a text file with one prompt per line, or 'shapes'"


def load_prompts(train: str, held_out: str) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts) of the specs ``train`` and ``held_out``: the
    built-in shapes split (``"shapes"``) or text files with one prompt per line;
    `ConfigError` (naming the fetch command) when a file is missing or empty."""
    from ..tasks.shapes import split_prompts

    def read(spec: str, which: int) -> list[str]:
        if spec == "shapes":
            return split_prompts()[which]
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompt file {spec!r} not found; {fetch_hint(spec)}")
        lines = [x.strip() for x in path.read_text().splitlines() if x.strip()]
        if not lines:
            raise ConfigError(f"prompt file {spec!r} is empty")
        return lines

    return read(train, 0), read(held_out, 1)

"""``branchgrpo encode``: every prompt of a run encoded once into a prompt-embedding file
(`branchgrpo.models.embeddings`), and the checks a run with ``model.prompt_embeddings`` gets
before any model loads (`check_prompt_embeddings`, from `branchgrpo.preflight.check_run` and
``sample`` / ``eval``).

The command loads only the family's text encoders and tokenizers (the transformer and VAE are
built on the meta device from their configs: no weights read) and encodes each prompt alone
with the policy's own ``encode``, the method a training run calls: the rows are the ones that
run would compute for a prompt encoded alone, bit for bit (a batch of several prompts can
differ in the last bits: the encoders' matmuls round by batch size). A training run encodes
each prompt when it first meets it, one iteration's prompts at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError

FIX = "branchgrpo encode CONFIG --out {path}"
"""How to (re)write the file: the one-off command, with the run's config."""


def fix(cfg: Config) -> str:
    return "write it with: " + FIX.format(path=cfg.model.prompt_embeddings or "FILE")


def refusal(cfg: Config) -> str | None:
    """Why ``model.prompt_embeddings`` cannot be used with ``cfg`` (None: it can): a kind
    without a diffusers pipeline, a conditioning beyond text (wan_i2v's first frames), or
    ``offload_encoders`` / ``free_encoders`` (there are no encoders to move or drop)."""
    m = cfg.model
    if not m.prompt_embeddings:
        return None
    from .spec import family_class, pipeline_refusal

    if why := pipeline_refusal(cfg, "prompt_embeddings"):
        return why
    if hasattr(family_class(m.kind), "prompt_check"):
        return (f"model.prompt_embeddings stores text conditioning only; model.kind={m.kind} "
                "conditions each prompt on an image too (VAE latents of its first frame): "
                "unset it (model.offload_encoders or model.free_encoders keep the encoders "
                "off the GPU instead)")
    both = [k for k in ("offload_encoders", "free_encoders") if getattr(m, k)]
    if both:
        return (f"model.prompt_embeddings loads no text encoders, so model.{both[0]}=true has "
                f"nothing to act on: set model.{both[0]}=false (or unset "
                "model.prompt_embeddings to encode with the encoders)")
    return None


def uncond_rows(cfg: Config) -> bool:
    """Whether the run's conditioning holds unconditional (negative prompt) rows: classifier-
    free guidance on (`branchgrpo.spec.guidance` above the family's ``cfg_above``; Qwen-Image's
    true CFG above 1, with its model-card negative prompt); never with a guidance embedding."""
    from .spec import family_class, guidance

    fam = family_class(cfg.model.kind)
    scale = guidance(cfg)
    if fam is None or scale is None or fam.guidance_kind == "embedding":
        return False
    return scale > (1.0 if fam.guidance_kind == "true_cfg" else getattr(fam, "cfg_above", 1.0))


def description(cfg: Config) -> dict[str, Any]:
    """The config values a file's description must match: kind, path, dtype (the encoders'),
    ``uncond`` (`uncond_rows`)."""
    m = cfg.model
    return {"kind": m.kind, "path": m.path, "dtype": m.dtype, "uncond": uncond_rows(cfg)}


def check_prompt_embeddings(cfg: Config, prompts: Sequence[str], where: str) -> None:
    """With ``model.prompt_embeddings``: the file opens as a prompt-embedding file
    (`branchgrpo.models.embeddings.PromptEmbeddings`: intact, this format), was written for
    this model (`description`) and holds every prompt of ``prompts`` (``where``: their source,
    for the message). `ConfigError` naming the fix otherwise; reads no tensor."""
    from .models.embeddings import EmbeddingFileError, PromptEmbeddings

    path = cfg.model.prompt_embeddings
    if not path:
        return
    if why := refusal(cfg):
        raise ConfigError(why)
    try:
        emb = PromptEmbeddings(path)
    except EmbeddingFileError as e:
        raise ConfigError(f"model.prompt_embeddings: {e}; {fix(cfg)}") from None
    want = description(cfg)
    if diff := {k: (emb.meta.get(k), v) for k, v in want.items() if emb.meta.get(k) != v}:
        what = ", ".join(f"{k} {a!r} (this run: {b!r})" for k, (a, b) in diff.items())
        raise ConfigError(f"model.prompt_embeddings={path} was encoded for another model or "
                          f"options: {what}; {fix(cfg)}")
    if absent := emb.missing(prompts):
        raise ConfigError(f"model.prompt_embeddings={path} lacks {len(absent)} prompt(s) of "
                          f"{where}, e.g. {absent[0]!r}; {fix(cfg)} (it encodes data.prompts "
                          "and data.eval_prompts; --prompt adds others)")


def encoder_options(cfg: Config) -> Any:
    """The `ModelOptions` of ``cfg`` for the encoders alone: the run's dtype, size and guidance
    (what the family's ``encode`` sees), frozen, unquantized, nothing offloaded."""
    from .spec import model_options

    return dataclasses.replace(
        model_options(cfg, progress=False), encoders_only=True, finetune="frozen",
        quantize="none", gradient_checkpointing=False, compile=False, offload_encoders=False,
        free_encoders=False, prompt_embeddings="", attention_backend="native")


def encode_command(cfg: Config, out: str | Path, device: str = "cpu",
                   extra: Sequence[str] = (), progress: bool = True) -> Path:
    """Encode every distinct prompt of ``data.prompts``, ``data.eval_prompts`` and ``extra``
    (in that order) with only the family's text encoders on ``device``, each prompt alone
    (the module docstring), and write the file ``out`` (atomically). Returns its path."""
    from tqdm import tqdm

    from .models.embeddings import text_options, write
    from .models.factory import build_policy, load_prompts

    if why := refusal(dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, prompt_embeddings=str(out), offload_encoders=False,
            free_encoders=False))):
        raise ConfigError(why)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but this machine has no CUDA device: use --device cpu")
    train, held = load_prompts(cfg.data.prompts, cfg.data.eval_prompts)
    prompts = list(dict.fromkeys([*train, *held, *extra]))
    policy: Any = build_policy(encoder_options(cfg), torch.device(device))
    rows = []
    for p in tqdm(prompts, desc="encode", unit="prompt", disable=not progress):
        cond = policy.encode([p])
        rows.append({k: v[0].cpu() for k, v in cond.items()})
        policy.clear_cache()
    meta = description(cfg) | {"text": text_options(policy.family)}
    return write(Path(out).expanduser(), prompts, rows, meta)

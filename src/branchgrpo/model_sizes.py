"""The sizes of a model from its config files alone, for `branchgrpo.memory`: the transformer
built on the meta device (`Arch`: parameters, blocks, hidden width, MLP ratio, LoRA and per-token
Linear weights), its experts, the text encoders' and VAE's parameters, tokens and latent
elements per row (`Model`, `model_of`). No weights load; a family is read through its
`branchgrpo.models.family.Family` class and ``released_config`` (docs/memory.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config


@dataclass(frozen=True)
class Arch:
    """The transformer as the estimate sees it, from a meta-device instance: parameters (all,
    under ``_keep_in_fp32_modules``, of the largest block), LoRA parameters per unit rank on
    the targets (sum of in + out features of the matched Linears), hidden width h (the most
    common Linear input width in the blocks), blocks L, MLP ratio m, the blocks' Linear
    weights an image token and a text token go through (`stream_weights`), the norms of a
    block kept in fp32, and the Linear weights and rows ``model.quantize`` stores quantized."""

    params: int
    fp32_params: int
    block_params: int
    lora_per_rank: int
    hidden: int
    layers: int
    mlp_ratio: float
    image_weights: int = 0
    text_weights: int = 0
    fp32_norms: int = 0
    linear_params: int = 0
    linear_rows: int = 0


def arch_of(model: nn.Module, lora_targets: tuple[str, ...]) -> Arch:
    """`Arch` of a (meta or real) transformer ``model``; its blocks are the items of its
    ModuleLists (`branchgrpo.dist.transformer_blocks`)."""
    from collections import Counter

    from .dist import transformer_blocks
    from .models.loading import keeps_fp32

    blocks = transformer_blocks(model)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    widths = Counter(m.in_features for b in blocks for m in b.modules()
                     if isinstance(m, nn.Linear))
    hidden = widths.most_common(1)[0][0] if widths else max(
        (m.in_features for _, m in linears), default=1)
    lora = sum(m.in_features + m.out_features for n, m in linears
               if any(n == t or n.endswith("." + t) for t in lora_targets))
    return Arch(
        params=sum(p.numel() for p in model.parameters()),
        fp32_params=sum(p.numel() for n, p in model.named_parameters() if keeps_fp32(model, n)),
        block_params=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
        lora_per_rank=lora, hidden=hidden, layers=len(blocks),
        mlp_ratio=_mlp_ratio(blocks, hidden), **stream_weights(blocks),
        fp32_norms=_fp32_norms(model, blocks), **_quantizable(model, linears))


def _quantizable(model: nn.Module, linears: list[tuple[str, nn.Linear]]) -> dict[str, int]:
    """``linear_params`` and ``linear_rows``: the weights and output rows of the Linears a
    ``model.quantize`` load quantizes (diffusers' torchao quantizer: every ``nn.Linear``
    weight outside ``_keep_in_fp32_modules``)."""
    from .models.loading import keeps_fp32

    q = [m for n, m in linears if not keeps_fp32(model, n + ".weight")]
    return {"linear_params": sum(m.weight.numel() for m in q),
            "linear_rows": sum(m.out_features for m in q)}


def _fp32_norms(model: nn.Module, blocks: list[nn.Module]) -> int:
    """Norm modules of the largest block that the class keeps in fp32 (``_keep_in_fp32_modules``:
    Wan's norm1-3), whose outputs a bf16 forward saves in fp32."""
    keep = set(getattr(type(model), "_keep_in_fp32_modules", None) or ())
    if not blocks or not keep:
        return 0
    block = max(blocks, key=lambda b: sum(p.numel() for p in b.parameters()))
    return sum(1 for n, m in block.named_modules() if n and "Norm" in type(m).__name__
               and keep & set(n.split(".")))


TEXT_MARKS = ("add_", "context", "txt")
"""Name parts of a dual-stream block's text-stream Linears (diffusers' joint attention
``add_q_proj`` / ``to_add_out``, ``ff_context``; ``txt_mlp``)."""


def stream_weights(blocks: list[nn.Module]) -> dict[str, int]:
    """Linear weights per image token and per text token summed over ``blocks``:
    modulation Linears (inside a ``*Norm*`` module or named ``*_mod`` / ``*modulation*``: per
    row, not per token) are left out; in a block with text-stream Linears (`TEXT_MARKS`) the
    others see image tokens only, in a single-stream block every token sees them all."""
    image = text = 0
    for block in blocks:
        mods = dict(block.named_modules())
        img = txt = 0
        for name, m in mods.items():
            if not isinstance(m, nn.Linear):
                continue
            parts = name.split(".")
            above = [mods[".".join(parts[:i])] for i in range(1, len(parts))]
            if any("Norm" in type(a).__name__ for a in above) or any(
                    p.endswith("_mod") or "modulation" in p.lower() for p in parts):
                continue
            if any(k in p for p in parts for k in TEXT_MARKS):
                txt += m.weight.numel()
            else:
                img += m.weight.numel()
        image += img
        text += txt if txt else img
    return {"image_weights": image, "text_weights": text}


def _mlp_ratio(blocks: list[nn.Module], hidden: int) -> float:
    """The widest MLP up-projection over h: Linears inside a module whose class or name says
    feed-forward / MLP (diffusers' ``FeedForward``, FLUX's ``proj_mlp``); 4 when none does."""
    widths = [m.out_features for b in blocks for n, m in b.named_modules()
              if isinstance(m, nn.Linear) and m.in_features == hidden
              and any(k in part.lower() for part in n.split(".") for k in ("ff", "mlp"))]
    return max(widths) / hidden if widths else 4.0


@functools.lru_cache(maxsize=32)
def _meta_arch(library: str, cls_name: str, config_json: str,
               lora_targets: tuple[str, ...]) -> Arch:
    return arch_of(_meta_model(library, cls_name, config_json), lora_targets)


@functools.lru_cache(maxsize=32)
def _meta_params(library: str, cls_name: str, config_json: str) -> int:
    return sum(p.numel() for p in _meta_model(library, cls_name, config_json).parameters())


def _meta_model(library: str, cls_name: str, config_json: str) -> nn.Module:
    """The module ``library.cls_name`` built from its config on the meta device (no memory)."""
    import importlib

    from diffusers.utils import logging as dlog

    cls = getattr(importlib.import_module(library), cls_name)
    config = json.loads(config_json)
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # "config attributes ... will be ignored": not the user's file
    try:
        with torch.device("meta"):
            if library == "diffusers":
                return cls.from_config(config)
            return cls(cls.config_class.from_dict(config))
    finally:
        dlog.set_verbosity(level)


def transformer_arch(transformer_class: str, config: dict[str, Any],
                     lora_targets: tuple[str, ...]) -> Arch:
    """`Arch` of the diffusers class ``transformer_class`` built from ``config`` on meta."""
    clean = {k: v for k, v in config.items() if not k.startswith("_")}
    return _meta_arch("diffusers", transformer_class, json.dumps(clean, sort_keys=True),
                      tuple(lora_targets))


# ------------------------------------------------------------------- the model's components
@dataclass(frozen=True)
class Model:
    """What the estimate needs of the model: the transformer `Arch` and its expert count (2 for
    a two-expert checkpoint, Wan2.2 A14B's ``transformer_2``), frozen component parameters by
    pipeline name (text encoders, ``vae``) and the components it could not count, tokens per
    row, latent elements per row, CFG rows per sample, the VAE's decoder width and output
    pixels, the family's decode batch, and where the counts came from."""

    arch: Arch
    frozen: dict[str, int]
    fp32_frozen: tuple[str, ...]
    image_tokens: int
    text_tokens: int
    latent_numel: int
    cfg_rows: int
    vae_width: int
    pixels: int
    decode_batch: int
    sources: tuple[str, ...]
    experts: int = 1
    uncounted: tuple[str, ...] = ()


def released(fam: Any, path: str) -> dict[str, Any]:
    """The family's released config values for the checkpoint ``path``: its
    ``released_configs[path]`` (one family, several checkpoints: Wan2.2, Z-Image), else its
    ``released_config`` (as `branchgrpo.spec.read_model_files` picks them)."""
    return getattr(fam, "released_configs", {}).get(path, fam.released_config)


def model_of(cfg: Config) -> Model:
    """The `Model` of ``cfg.model`` (the tiny policy, or a diffusers family from its config
    files: `branchgrpo.spec.read_model_files` and the component configs beside it)."""
    from .spec import family_class, read_model_files

    fam = family_class(cfg.model.kind)
    if fam is None:
        return _tiny_model()
    files = read_model_files(cfg)
    m, rel = cfg.model, released(fam, cfg.model.path)
    config = files.transformer if files.transformer.get("_class_name") else {
        **rel["transformer"], **files.transformer}
    arch = transformer_arch(fam.transformer_class, config, fam.lora_targets)
    comps, uncounted, sources = _components(cfg, fam, rel)
    vae = _component_config(m.path, "vae") or {}
    patch = _token_patch(rel, config, vae)
    side = files.vae_scale_factor * patch
    frames = _latent_frames(fam, rel, vae, m.num_frames)
    channels = int(vae.get("latent_channels") or vae.get("z_dim") or rel.get("latent_channels")
                   or config.get("out_channels") or config.get("in_channels") or 16)
    if not (vae.get("latent_channels") or vae.get("z_dim")) and patch == 2 and config.get(
            "patch_size", 1) == 1:
        channels //= 4  # packed 2x2: the transformer's channels are 4 latent channels
    defaults = {f.name: f.default for f in dataclasses.fields(fam)}
    pixels = m.height * m.width * (min(m.num_frames, _frame_period(rel, vae)) if fam.video
                                   else 1)
    return Model(
        arch, comps, tuple(fam.fp32_modules), (m.height // side) * (m.width // side) * frames,
        int(rel.get("text_tokens") or defaults.get("max_sequence_length") or 0),
        channels * frames * (m.height // files.vae_scale_factor) * (
            m.width // files.vae_scale_factor),
        _cfg_rows(cfg, fam), _decoder_width(vae), pixels,
        int(defaults.get("decode_batch") or 1), (files.source, *sources),
        experts=1 + len(_extra_experts(fam, rel, m.path)), uncounted=uncounted)


def _cfg_rows(cfg: Config, fam: Any) -> int:
    """Transformer rows per sample: 2 when classifier-free guidance is on (the run's guidance,
    `branchgrpo.spec.guidance`, above the family's ``cfg_above``, default 1), else 1."""
    from .spec import guidance

    g = guidance(cfg)
    on = fam.guidance_kind in ("cfg", "true_cfg") and g is not None and g > getattr(
        fam, "cfg_above", 1.0)
    return 2 if on else 1


def _extra_experts(fam: Any, rel: dict[str, Any], path: str) -> list[str]:
    """The checkpoint's transformers beyond ``transformer`` (Wan2.2 A14B's ``transformer_2``):
    family subfolders named ``transformer_*`` that the folder or cache holds a config of, that
    its ``model_index.json`` lists, or, offline, that the released ``model_index`` switches to
    (WanPipeline's ``boundary_ratio``)."""
    names = [n for n in (*fam.subfolders, *getattr(fam, "optional_subfolders", ()))
             if n.startswith("transformer_")]
    index = _component_config(path, "") or {}
    switch = bool((rel.get("model_index") or {}).get("boundary_ratio"))
    return [n for n in names if _listed(index, n) or _component_config(path, n) is not None
            or (not index and switch)]


def _listed(index: dict[str, Any], name: str) -> bool:
    """``model_index.json`` lists component ``name`` with a class (not ``[null, null]``)."""
    entry = index.get(name)
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def _decoder_width(vae: dict[str, Any]) -> int:
    """Channels of the decoder's widest full-resolution tensor: the second level's width
    (upsampled into the last level), from ``block_out_channels`` or Wan's ``base_dim`` x
    ``dim_mult``; 256 without a VAE config (FLUX / SD3's AutoencoderKL)."""
    widths = list(vae.get("block_out_channels") or [])
    if not widths and vae.get("base_dim") and vae.get("dim_mult"):
        widths = [vae["base_dim"] * k for k in vae["dim_mult"]]
    return int(widths[1] if len(widths) > 1 else (widths[0] if widths else 256))


def _tiny_model() -> Model:
    """The embedded tiny policy: its FluxTransformer2DModel and word encoder, fp32."""
    from .models.tiny import TinyFluxPolicy
    from .tasks import shapes

    with torch.device("meta"):
        pol = TinyFluxPolicy()
    arch = arch_of(pol.transformer, ())
    s, c = pol.latent_shape
    return Model(arch, {"text_encoder": sum(p.numel() for p in pol.text.parameters())}, (),
                 s, shapes.MAX_WORDS, s * c, 1, 0, 0, 1, ("tiny (embedded)",))


def _token_patch(rel: dict[str, Any], config: dict[str, Any], vae: dict[str, Any]) -> int:
    """Latent pixels per token side: the transformer's (spatial) patch (``patch_size``, or
    Z-Image's ``all_patch_size``), or the family's ``released_config["token_patch"]`` (FLUX's
    2x2 packing: patch_size 1 on 4 C channels). A patch-1 transformer on 4x the VAE's latent
    channels (without a VAE config: on 64 or more channels, a multiple of 4) is read as 2x2
    packing too."""
    patch = config.get("patch_size", config.get("all_patch_size", 1))
    patch = int(patch[-1] if isinstance(patch, (list, tuple)) else patch or 1)
    packed = rel.get("token_patch")
    channels = int(config.get("in_channels") or 0)
    latent = int(vae.get("latent_channels") or vae.get("z_dim") or 0)
    if packed:
        return int(packed)
    if patch == 1 and (channels == 4 * latent if latent else
                       channels >= 64 and channels % 4 == 0):
        return 2
    return patch


def _frame_period(rel: dict[str, Any], vae: dict[str, Any]) -> int:
    """A video VAE's temporal factor: 2^(temporal downsamplings) of its config, else the
    family's ``released_config["frame_period"]`` (4)."""
    down = vae.get("temperal_downsample") or vae.get("temporal_downsample")
    return 2 ** sum(bool(x) for x in down) if down else int(rel.get("frame_period", 4))


def _latent_frames(fam: Any, rel: dict[str, Any], vae: dict[str, Any], num_frames: int) -> int:
    """Latent frames of a video family ((F - 1) / temporal factor + 1), 1 for images."""
    return (num_frames - 1) // _frame_period(rel, vae) + 1 if fam.video else 1


def _components(cfg: Config, fam: Any, rel: dict[str, Any],
                ) -> tuple[dict[str, int], tuple[str, ...], tuple[str, ...]]:
    """(parameters of the frozen pipeline components, the components left uncounted, notes):
    text encoders, ``image_encoder`` and ``vae`` of the family's subfolders, counted on meta
    instances of their config files (``model_index.json`` names the classes), else from the family's
    ``released_config["params"]``."""
    from .models.diffusers_policy import TEXT_ENCODERS

    index = _component_config(cfg.model.path, "") or {}
    fallback = rel.get("params", {})
    names = [n for n in (*TEXT_ENCODERS, "image_encoder", "vae")
             if _listed(index, n) or n in fallback or (not index and n in fam.subfolders)]
    out: dict[str, int] = {}
    used_files = used_fallback = False
    for name in names:
        conf = _component_config(cfg.model.path, name)
        lib_cls = index.get(name)
        n = _count(lib_cls, conf) if conf and isinstance(lib_cls, list) else None
        if n is not None:
            out[name] = n
            used_files = True
        elif name in fallback:
            out[name] = int(fallback[name])
            used_fallback = True
    notes = (("text encoders / VAE: their config files",) if used_files else ()) + (
        (f"text encoders / VAE: {cfg.model.kind} released_config['params']",)
        if used_fallback else ())
    return out, tuple(n for n in names if n not in out), notes


def _count(lib_cls: list[str], conf: dict[str, Any]) -> int | None:
    """Parameters of ``model_index.json``'s (library, class) built on meta from ``conf``; None
    when it is not a transformers / diffusers class or the config does not build."""
    if len(lib_cls) != 2 or lib_cls[0] not in ("transformers", "diffusers"):
        return None
    clean = {k: v for k, v in conf.items() if not k.startswith("_")}
    try:
        return _meta_params(lib_cls[0], lib_cls[1], json.dumps(clean, sort_keys=True))
    except (AttributeError, ImportError, KeyError, TypeError, ValueError, RuntimeError):
        return None


def _component_config(path: str, name: str) -> dict[str, Any] | None:
    """``name/config.json`` (``model_index.json`` for name "") of the local folder ``path`` or
    the Hugging Face cache of the id ``path``; None when neither holds it (no download)."""
    from .spec import _cached

    rel = f"{name}/config.json" if name else "model_index.json"
    p = Path(path).expanduser()
    f = (p / rel) if p.is_dir() else (Path(c) if (c := _cached(path, rel)) else None)
    if f is None or not f.is_file():
        return None
    try:
        out = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None

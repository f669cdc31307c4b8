"""The one config schema: nested dataclasses (OmegaConf structured configs).

Every field has a default and a one-line doc (``metadata["doc"]``, shown by ``branchgrpo train
--help-config``). YAML files hold only overrides; ``key.sub=value`` arguments override them.
Unknown keys and wrong types are rejected with the key's name and the nearest valid key;
each value is checked on its own in `validate`, with errors that say what to change.

A pure schema: it imports nothing of the engine. What the values mean together, with the
method's preset and the model's schedule, is resolved in `branchgrpo.spec` and checked in
`branchgrpo.preflight`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config problem, with what to change."""


def f(default: Any, doc: str) -> Any:
    """A dataclass field with a default and a one-line doc."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    kind: str = f("tiny", "policy family: tiny (embedded default) or a diffusers family of "
                  "branchgrpo.models.families (flux, sd3, wan, ...)")
    path: str = f("", "Hugging Face id or local folder of the real model (diffusers families)")
    dtype: str = f("fp32", "transformer compute dtype: fp32, bf16 or fp16 (step math is fp32)")
    storage_dtype: str = f("fp32", "dtype rollout latents are stored (and round-tripped) in")
    finetune: str = f("full", "full fine-tuning or lora")
    lora_rank: int = f(32, "LoRA rank (finetune=lora)")
    lora_alpha: float = f(64.0, "LoRA alpha (finetune=lora)")
    gradient_checkpointing: bool = f(False, "recompute transformer activations in backward")
    quantize: str = f("none", "frozen transformer base stored quantized under LoRA "
                              "(finetune=lora, diffusers families): none, int8 or fp8 (torchao "
                              "weight-only); docs/small_gpu.md")
    offload_encoders: bool = f(False, "keep the text encoders on the CPU between encodes "
                                      "(diffusers families)")
    free_encoders: bool = f(False, "encode every training and held-out prompt at start-up, "
                                   "then drop the text encoders (diffusers families)")
    prompt_embeddings: str = f("", "a prompt-embedding file (branchgrpo encode CONFIG --out "
                                   "FILE): every prompt's conditioning read from it, the text "
                                   "encoders never loaded; '' off (diffusers families; "
                                   "refused with offload_encoders / free_encoders)")
    compile: bool = f(False, "torch.compile the transformer's repeated blocks (regional "
                             "compilation, one compile per block type); exact up to rounding")
    attention_backend: str = f("native", "diffusers attention kernel of the transformer: native "
                                         "(PyTorch SDPA) or an exact one (flash, _native_flash, "
                                         "_native_cudnn, _flash_3, xformers, flex, ...; CUDA)")
    height: int = f(512, "image height in pixels (real models)")
    width: int = f(512, "image width in pixels (real models)")
    num_frames: int = f(33, "video frames (wan)")
    guidance: float | None = f(None, "FLUX guidance embedding, or the CFG scale (null: the "
                                     "family pipeline's default: FLUX.1-dev 3.5, SD3.5 7.0, "
                                     "Wan 5.0, Qwen-Image off)")
    guidance_2: float | None = f(None, "wan22 A14B: CFG scale of the low-noise expert "
                                       "(transformer_2; null: model.guidance, as WanPipeline)")
    experts: str = f("all", "wan22 A14B: experts that train, all, high (transformer) or low "
                            "(transformer_2); the others stay frozen")
    images: str = f("", "wan_i2v: a file of 'prompt<TAB>image path' lines, each prompt's "
                        "first frame (paths relative to the file)")
    pretrain_steps: int = f(8000, "tiny: flow-matching pretraining steps of the base model "
                            "(8000: the shipped base, no pretraining; any other value "
                            "pretrains once into model.cache_dir)")
    clutter: float = f(0.8, "tiny: share of pretraining images holding an object their "
                            "prompt does not mention (the base model's flaw RL removes)")
    cache_dir: str = f("~/.cache/branchgrpo", "where pretrained tiny models and judges are cached")


@dataclass
class RolloutConfig:
    method: str = f("branch", "dance, flow_grpo, mix, mix_flash, g2rpo, branch, branch_width, "
                              "branch_depth, branch_mix, branch_mix_flash or "
                              "branch_sibling")
    num_steps: int | None = f(None, "denoising steps T (null: the method's default)")
    group_size: int | None = f(None, "samples per prompt G (dance, flow_grpo, mix*, g2rpo)")
    split_steps: list[int] | None = f(None, "branch steps S (branch*) or SDE steps M (g2rpo)")
    branch_factor: int | None = f(None, "children per split K (branch*)")
    split_noise_scale: float | None = f(None, "lambda on the std at splits (branch*; 1 keeps "
                                              "leaf marginals)")
    granularities: list[int] | None = f(None, "ODE tail strides (g2rpo)")
    kernel: str | None = f(None, "SDE kernel: dance, flow or cps")
    level: float | None = f(None, "noise level: eta (dance) or a (flow, cps); null: the "
                                  "method's published value on real models (eta 0.3, a 0.7), "
                                  "1.0 on the tiny family")
    shift: float | None = f(None, "sigma schedule shift (null: 3 for shifted, the "
                                  "checkpoint's shift / flow_shift for diffusers)")
    schedule: str | None = f(None, "sigma schedule: shifted, flux_dynamic or diffusers (null: "
                                   "the method and family's rule, see `branchgrpo plan`)")
    quantize_timestep: bool | None = f(None, "give the transformer int(1000 sigma) (FastVideo) "
                                             "instead of 1000 sigma (null: the method and "
                                             "family's rule)")
    window: int | None = f(None, "SDE window size (mix, mix_flash)")
    iters_per_shift: int | None = f(None, "iterations per window move (mix, mix_flash)")
    stride: int | None = f(None, "window move per shift, 0 freezes it (mix, mix_flash)")
    compression: float | None = f(None, "post-window schedule compression r (mix_flash, "
                                          "branch_flash)")
    mix_window: int | None = f(None, "SDE steps per stride (branch_mix; branch_flash: "
                                       "0 = SDE at the splits only)")
    mix_stride: int | None = f(None, "stride q of the SDE windows (branch_mix)")
    shared_noise: bool | None = f(None, "every tree of a batch starts from one x_T")
    max_batch: int = f(256, "max rows per model forward (frontier chunking)")


@dataclass
class AdvantageConfig:
    rule: str | None = f(None, "group, prompt_global_std, depth, g2rpo or sibling "
                                  "(null: method's)")
    fusion: str = f("mean", "leaf-to-node fusion for depth: mean, child_softmax or path")
    alpha: float = f(1.0, "temperature of child_softmax / path fusion")
    combine: str = f("reward_sum", "several rewards: reward_sum or advantage_sum")
    clip: float = f(5.0, "advantages are clamped to +-clip")


@dataclass
class SelectionConfig:
    name: str | None = f(None, "all, timestep_fraction, width, depth or depth_slide")
    fraction: float | None = f(None, "timestep_fraction: share of steps 0..T-2 trained")
    random: bool | None = f(None, "timestep_fraction: random steps per sample (else first)")
    ratio: float | None = f(None, "width: share of leaves whose chains are kept")
    depths: list[int] | None = f(None, "depth/depth_slide: child depths pruned")
    interval: int | None = f(None, "depth_slide: iterations per one-depth move")
    stop_depth: int | None = f(None, "depth_slide: shallowest depth the set may reach")
    until: float = f(1.0, "prune only during this fraction of iterations (then train all)")


@dataclass
class RewardConfig:
    weights: dict[str, float] = f({"shapes": 1.0}, "training rewards and their weights (a file "
                                  "or override that sets it replaces the whole mapping)")
    options: dict[str, Any] = f({}, "per-reward keyword arguments: {name: {key: value}}")
    judge: str = f("judge", "held-out judge reward (different from training), '' for none")
    batch_size: int = f(64, "images per reward call")


@dataclass
class TrainConfig:
    iterations: int = f(80, "rollout/update iterations")
    prompts_per_iteration: int = f(8, "prompts (trees) per rollout batch on each rank")
    updates_per_rollout: int = f(1, "optimizer steps per rollout batch (edges split evenly)")
    edge_chunk: int = f(512, "max edges per forward/backward (gradient accumulation)")
    lr: float = f(2e-4, "AdamW learning rate")
    lr_schedule: str = f("constant", "constant, linear or cosine decay over iterations")
    warmup_iterations: int = f(0, "linear warmup iterations")
    weight_decay: float = f(1e-4, "AdamW weight decay")
    max_grad_norm: float = f(1.0, "gradient clipping norm (0: off)")
    clip_eps: float | None = f(None, "PPO clip range (null: the method's, 1e-3 or 1e-4)")
    ratio: str = f("standard", "importance ratio: standard or guard (GRPO-Guard)")
    kl_coef: float | None = f(None, "KL penalty to the base policy (null: 0.1 on the tiny "
                              "family, where it holds the token grid, docs/algorithms.md §14; 0, "
                              "as published, elsewhere; 0: off, no reference copy)")
    kl_kind: str = f("x", "KL estimator: x, v, or x_flow_grpo (x / (2 s_i^2), Flow-GRPO's)")
    ema_decay: float = f(0.0, "EMA of trainable weights (0: off); eval uses the EMA")
    amp: str = f("none", "autocast dtype for forwards: none, bf16 or fp16")
    device: str = f("auto", "auto, cpu or cuda")
    seed: int = f(0, "seed of every generator (rollout noise, data, shuffles)")
    time_budget: float = f(0.0, "stop after this many seconds of training, evaluation "
                                "excluded (0: off; the iteration that crosses it finishes)")


@dataclass
class DataConfig:
    prompts: str = f("shapes", "training prompts: 'shapes' (built-in) or a text file")
    eval_prompts: str = f("shapes", "held-out prompts: 'shapes' (built-in) or a text file")
    eval_samples: int = f(64, "held-out images per evaluation")


@dataclass
class LogConfig:
    run_dir: str = f("", "run directory ('' makes runs/<method>-<time>)")
    eval_every: int = f(10, "iterations between held-out evaluations (0: start/end only)")
    eval_every_seconds: float = f(0.0, "also evaluate when this many training seconds have "
                                       "passed since the last evaluation (0: off)")
    checkpoint_every: int = f(10, "iterations between checkpoints")
    keep_last: int = f(2, "checkpoints kept")
    tensorboard: bool = f(True, "write TensorBoard event files")
    wandb: bool = f(False, "also log to Weights & Biases: scalars, sample grids, the report's "
                           "plots (the wandb extra; WANDB_MODE=offline needs no network)")
    wandb_project: str = f("branchgrpo", "wandb project of the run (log.wandb=true)")
    progress: bool = f(True, "progress bars")


@dataclass
class DistConfig:
    strategy: str = f("auto", "multi-rank training under torchrun: ddp (replicated weights), "
                              "fsdp (FSDP2 sharding) or auto (fsdp for full fine-tuning of "
                              "flux/sd3/wan, ddp otherwise)")
    backend: str = f("auto", "process-group backend: auto (nccl on cuda, gloo on cpu), nccl "
                             "or gloo")
    global_prompts: int = f(0, "prompts per iteration over all ranks, split evenly (0: "
                               "train.prompts_per_iteration on each rank)")
    noise: str = f("rank", "rollout noise: rank (one generator per rank, batched) or prompt "
                           "(one per global prompt: results independent of the rank count)")
    cpu_offload: bool = f(False, "fsdp: keep sharded parameters and optimizer states on the CPU")
    find_unused_parameters: bool = f(False, "ddp: allow trained parameters that get no "
                                             "gradient")
    verify_sync: int = f(0, "ddp: every N iterations check that weights agree across ranks "
                            "(0: off)")
    timeout_minutes: int = f(30, "collective timeout (raise for long rewards or evaluations)")
    sequence_parallel: int = f(1, "ranks per sequence-parallel group (1: off): each holds 1/R "
                                  "of a video's tokens, Ulysses attention (wan kinds)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "the policy"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"doc": "plan"})
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig,
                                       metadata={"doc": "advantage rule"})
    selection: SelectionConfig = field(default_factory=SelectionConfig,
                                       metadata={"doc": "edge selection (pruning)"})
    reward: RewardConfig = field(default_factory=RewardConfig, metadata={"doc": "rewards"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "optimisation"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "prompts"})
    log: LogConfig = field(default_factory=LogConfig, metadata={"doc": "outputs"})
    dist: DistConfig = field(default_factory=DistConfig,
                             metadata={"doc": "multi-GPU / multi-node (torchrun)"})


def all_keys(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """Every dotted key of the schema and its doc."""
    out: dict[str, str] = {}
    for fl in fields(cls):
        key = prefix + fl.name
        if is_dataclass(fl.type) or (isinstance(fl.default_factory, type)
                                     and is_dataclass(fl.default_factory)):
            out.update(all_keys(fl.default_factory, key + "."))  # type: ignore[arg-type]
        else:
            out[key] = fl.metadata.get("doc", "")
    return out


def _flat(d: Any, prefix: str = "") -> list[str]:
    if isinstance(d, dict):
        keys = []
        for k, v in d.items():
            full = f"{prefix}{k}"
            if isinstance(v, dict) and not full.startswith(("reward.weights", "reward.options")):
                keys += _flat(v, full + ".")
            else:
                keys.append(full)
        return keys
    return [prefix.rstrip(".")]


def _check_keys(d: dict, source: str) -> None:
    valid = all_keys()
    for key in _flat(d):
        if key not in valid:
            near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Schema defaults <- YAML file <- ``key=value`` overrides, type-checked."""
    cfg = OmegaConf.structured(Config)
    layers = []
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found; give an existing YAML file")
        try:
            layer = OmegaConf.load(p)
        except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: "
                              f"{' '.join(str(e).split())}") from None
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections "
                              "(model:, rollout:, train:, ...), not a list or a value")
        layers.append((layer, str(p)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key.sub=value, got {bad}")
        try:
            layers.append((OmegaConf.from_dotlist(overrides), "the command line"))
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            msg = " ".join(str(e).split())
            raise ConfigError(f"cannot parse the overrides {overrides}: {msg}") from None
    for layer, source in layers:
        _check_keys(OmegaConf.to_container(layer), source)
        try:
            cfg = OmegaConf.merge(cfg, layer)
            weights = OmegaConf.select(layer, "reward.weights")
            if weights is not None:  # a layer naming rewards replaces the set, not adds to it
                OmegaConf.update(cfg, "reward.weights", weights, merge=False)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            msg = str(e.msg).strip().splitlines()[0]
            hint = ("; write a mapping with a space after each colon, e.g. "
                    "reward.weights='{shapes: 1.0}'" if ":" in key else "")  # no schema key has one
            raise ConfigError(f"bad value for {key!r} in {source}: {msg}{hint}") from None
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(obj)
    return obj


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def near(name: str, valid: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the nearest valid name, or ``""``."""
    close = difflib.get_close_matches(name, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


# key: the interval its value must lie in ("[1,)": >= 1, "(0,1]": > 0 and <= 1); None (a
# method preset's value) is not checked. Every float is also checked for NaN and inf.
RANGES: dict[str, str] = {
    "model.lora_rank": "[1,)", "model.lora_alpha": "(0,)",
    "model.height": "[16,)", "model.width": "[16,)",
    "model.num_frames": "[1,)", "model.guidance": "[0,)", "model.guidance_2": "[0,)",
    "model.pretrain_steps": "[1,)", "model.clutter": "[0,1]",
    "rollout.num_steps": "[2,)", "rollout.group_size": "[2,)",
    "rollout.branch_factor": "[2,)", "rollout.split_noise_scale": "(0,)",
    "rollout.level": "[0,)", "rollout.shift": "(0,)",
    "rollout.window": "[1,)", "rollout.iters_per_shift": "[1,)",
    "rollout.stride": "[0,)", "rollout.compression": "(0,1]",
    "rollout.mix_window": "[1,)", "rollout.mix_stride": "[1,)",
    "rollout.max_batch": "[1,)",
    "advantage.clip": "(0,)",
    "selection.fraction": "(0,1]", "selection.ratio": "(0,1]",
    "selection.interval": "[1,)", "selection.stop_depth": "[0,)",
    "selection.until": "[0,1]",
    "reward.batch_size": "[1,)",
    "train.iterations": "[1,)", "train.prompts_per_iteration": "[1,)",
    "train.updates_per_rollout": "[1,)", "train.edge_chunk": "[1,)",
    "train.lr": "(0,)", "train.warmup_iterations": "[0,)",
    "train.weight_decay": "[0,)", "train.max_grad_norm": "[0,)",
    "train.clip_eps": "(0,)", "train.kl_coef": "[0,)",
    "train.ema_decay": "[0,1)", "train.time_budget": "[0,)",
    "data.eval_samples": "[1,)",
    "log.eval_every": "[0,)", "log.eval_every_seconds": "[0,)",
    "log.checkpoint_every": "[1,)", "log.keep_last": "[1,)",
    "dist.global_prompts": "[0,)", "dist.verify_sync": "[0,)",
    "dist.timeout_minutes": "[1,)", "dist.sequence_parallel": "[1,)",
}
EXACT_ATTENTION = ("native", "_native_math", "_native_efficient", "_native_flash",
                   "_native_cudnn", "flash", "flash_varlen", "_flash_3", "_flash_varlen_3",
                   "xformers", "flex")
"""Attention kernels that compute softmax(QK^T / sqrt(d)) V exactly (up to float rounding)."""
LOSSY_ATTENTION_WHY = (
    "quantises Q, K (int8) and P, V (fp8/fp16) inside attention, so every velocity the policy "
    "computes moves, the rollout samples from a different distribution than the model's and "
    "the stored log-probs belong to neither; GRPO's importance ratio and KL then measure the "
    "kernel's error as well as the update. Use an exact kernel")
"""Why lossy attention kernels (SageAttention) are refused."""
QUANTIZE = ("none", "int8", "fp8")
"""``model.quantize`` values: torchao weight-only configs diffusers can train LoRA on."""
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("fp32", "bf16", "fp16"), "model.attention_backend": EXACT_ATTENTION,
    "model.storage_dtype": ("fp32", "bf16", "fp16"), "model.finetune": ("full", "lora"),
    "model.experts": ("all", "high", "low"), "model.quantize": QUANTIZE,
    "rollout.kernel": ("dance", "flow", "cps"),
    "rollout.schedule": ("shifted", "flux_dynamic", "diffusers"),
    "advantage.fusion": ("mean", "child_softmax", "path"),
    "advantage.combine": ("reward_sum", "advantage_sum"),
    "train.lr_schedule": ("constant", "linear", "cosine"), "train.ratio": ("standard", "guard"),
    "train.kl_kind": ("x", "v", "x_flow_grpo"), "train.amp": ("none", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"), "dist.strategy": ("auto", "ddp", "fsdp"),
    "dist.backend": ("auto", "nccl", "gloo"), "dist.noise": ("rank", "prompt"),
}


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _check_range(key: str, v: Any) -> None:
    interval = RANGES[key]
    lo_s, hi_s = interval[1:-1].split(",")
    lo, hi = float(lo_s), float(hi_s) if hi_s else math.inf
    above = v >= lo if interval[0] == "[" else v > lo
    below = v <= hi if interval[-1] == "]" else v < hi
    if not (above and below):
        bound = (f"be {'>=' if interval[0] == '[' else '>'} {lo_s}" if not hi_s
                 else f"lie in {interval.replace(',', ', ')}")
        raise ConfigError(f"{key} must {bound}, got {v}")


def validate(cfg: Config) -> None:
    """Check every value on its own: choices, ranges, no NaN or inf; raise ConfigError saying
    what to change. What values mean together (the method's plan, rewards, prompt files) and
    ``model.kind`` (against the family registry, with ``model.path``: `branchgrpo.spec`) are
    checked by `branchgrpo.preflight.check_run`."""
    if "sage" in cfg.model.attention_backend:
        raise ConfigError(f"model.attention_backend={cfg.model.attention_backend} "
                          f"{LOSSY_ATTENTION_WHY} ({', '.join(EXACT_ATTENTION[:6])}, ...)")
    for key in all_keys():
        v = _get(cfg, key) if key.count(".") == 1 else None
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key} must be a finite number, got {v}")
        if v is not None and key in CHOICES and v not in CHOICES[key]:
            raise ConfigError(f"{key}={v!r} is not one of {list(CHOICES[key])}"
                              + near(str(v), list(CHOICES[key])))
        if v is not None and key in RANGES:
            _check_range(key, v)
    for k, v in cfg.reward.weights.items():
        if not math.isfinite(v):
            raise ConfigError(f"reward.weights.{k} must be a finite number, got {v}")
    if cfg.log.wandb and not cfg.log.wandb_project.strip():
        raise ConfigError("log.wandb_project is empty: name the wandb project (or set "
                          "log.wandb=false)")
    if not cfg.reward.weights:
        raise ConfigError("reward.weights is empty: name at least one training reward")
    if not any(cfg.reward.weights.values()):
        raise ConfigError("every reward.weights value is 0: nothing would be rewarded")
    for k in ("split_steps", "granularities"):
        v = getattr(cfg.rollout, k)
        if v is not None and not v:
            raise ConfigError(f"rollout.{k} is empty: give at least one value, or null for the "
                              "method's")


def prompts_per_rank(cfg: Config, world: int) -> int:
    """P, the trees each of ``world`` ranks rolls out per iteration: ``dist.global_prompts /
    world`` when that is set (it must divide evenly), else ``train.prompts_per_iteration``."""
    gp = cfg.dist.global_prompts
    if not gp:
        return cfg.train.prompts_per_iteration
    if gp % world:
        lo, hi = gp // world * world, -(-gp // world) * world
        fits = [w for w in range(1, gp + 1) if gp % w == 0]
        raise ConfigError(
            f"dist.global_prompts={gp} does not divide over {world} ranks: set it to a multiple "
            f"of {world} (e.g. {hi}" + (f" or {lo}" if lo else "") + ") or run on "
            f"{', '.join(map(str, fits))} ranks")
    return gp // world


def describe() -> str:
    """Every key, its default and its doc, for ``--help-config``."""
    defaults = OmegaConf.to_container(OmegaConf.structured(Config))
    lines = []
    for key, doc in all_keys().items():
        node: Any = defaults
        for part in key.split("."):
            node = node[part]
        lines.append(f"  {key} = {node!r}\n      {doc}")
    return "\n".join(lines)


"""The resolved run: a method's plan parameters with the model's schedule, without weights.

`resolve` reads the config and, for a real model, the checkpoint's config files
(``model_index.json``, ``scheduler/scheduler_config.json``, ``transformer/config.json``,
``vae/config.json``) from the local folder ``model.path``, or the Hugging Face cache for a Hub
id; with neither it uses the family's released config (``released_config`` of its
`branchgrpo.models.family.Family` class) and says so in `RunSpec.notes`. Training, preflight,
``branchgrpo plan`` and the benchmarks build their plans from the one `RunSpec` it returns.

The schedule rule (``rollout.schedule`` / ``rollout.quantize_timestep`` null), by plan and
model family (each family's ``schedule_rule``; `schedule_rule`):

================  ==========================================  =====================  ==========
family            plan                                        sigma grid             timestep
================  ==========================================  =====================  ==========
flux              dance, branch, branch_mix, mix, mix_flash,  shifted (FastVideo,    quantised
                  g2rpo                                       shift 3)
flux              flow_grpo                                   diffusers (FluxPipe-   1000 sigma
                                                              line: dynamic mu)
sd3               every plan (Flow-GRPO: its grid)            diffusers              1000 sigma
                                                              (set_timesteps(T))
wan               every plan                                  diffusers (UniPC flow  UniPC's
                                                              sigmas, flow_shift)    int64
qwenimage         dance, branch, branch_mix, mix, mix_flash,  shifted (DanceGRPO's   quantised
                  g2rpo                                       Qwen-Image, shift 3)
qwenimage         flow_grpo                                   diffusers (QwenImage-  sigma
                                                              Pipeline: dynamic mu,
                                                              shift_terminal 0.02)
wan22, wan_i2v    every plan (A14B: the expert of each        diffusers (UniPC flow  UniPC's
                  step's timestep, boundary_ratio x 1000)     sigmas, flow_shift)    int64
flux2             every plan                                  diffusers (Flux2Pipe-  sigma
                                                              line: empirical mu)
zimage            every plan                                  diffusers (static      1000 sigma
                                                              shift: base 6,         (the model
                                                              Turbo 3)               gets 1 - sigma)
tiny              every plan                                  shifted (shift 3)      sigma
================  ==========================================  =====================  ==========

"shifted" is linspace(1, 0, T + 1) shifted by ``rollout.shift`` (3); "diffusers" is what the
family's diffusers pipeline runs for T steps with the checkpoint's scheduler config (FLUX:
``sigmas = linspace(1, 1/T, T)`` with mu from the image token count (H/16)(W/16), or its static
shift without ``use_dynamic_shifting``; SD3: ``set_timesteps(T)`` with the config ``shift``; Wan:
UniPC's ``use_flow_sigmas`` grid with ``flow_shift``); ``rollout.shift`` overrides the
checkpoint's static shift. "flux_dynamic" is FLUX's dynamic-mu grid even where the rule says
otherwise. "Quantised" is the FastVideo repos' int(1000 sigma) (FLUX: int(1000 sigma) / 1000);
"UniPC's int64" is int64(1000 sigma) of UniPC's grid, whose first sigma is 1 - 1e-6 (999).
``rollout.level`` null: the plan's published level (eta 0.3 Dance-SDE, a 0.7 Flow-SDE), 1.0
on the tiny family (the embedded default). A distilled few-step checkpoint (`distilled`:
FLUX.1-schnell, Z-Image-Turbo) takes its pipeline's grid and timestep under every plan, and
``rollout.num_steps`` null means its distilled step count (docs/algorithms.md §1.10).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import Config, ConfigError, RolloutConfig
from .engine import schedule as sch
from .engine.tree import RolloutPlan

if TYPE_CHECKING:
    from .models.factory import ModelOptions
    from .models.family import Distilled, Family

TINY_LEVEL = 1.0
"""The tiny family's noise level (the embedded default's, which its benches are measured at)."""
TINY_KL = 0.1
"""The tiny family's KL coefficient: it holds the token grid at the base model's level and
learns as fast as no anchor (docs/algorithms.md §14)."""


def family_class(kind: str) -> type[Family] | None:
    """The `branchgrpo.models.family.Family` class of ``model.kind`` ``kind`` (None for the
    embedded tiny policy); `ConfigError` naming the kinds a config may select otherwise."""
    from .models.families import FAMILIES
    from .models.families import family_class as registered

    if kind == "tiny":
        return None
    cls = registered(kind) if kind in FAMILIES else None
    if cls is None:
        from .config import near

        kinds = model_kinds()
        raise ConfigError(f"model.kind={kind!r} is not one of {kinds}" + near(kind, kinds))
    return cls


def pipeline_refusal(cfg: Config, key: str) -> str | None:
    """Why ``model.<key>``, a setting of the diffusers families, cannot act on ``cfg``'s kind
    (the embedded tiny policy has no pipeline); None where the kind has one."""
    if family_class(cfg.model.kind) is not None:
        return None
    return (f"model.{key} is for the diffusers families; model.kind={cfg.model.kind} has no "
            "pipeline: unset it or pick a diffusers kind")


def model_kinds() -> list[str]:
    """The kinds a config may select: the embedded default (tiny) and every registered diffusers
    family (`branchgrpo.models.families.FAMILIES`, in its order)."""
    from .models.families import FAMILIES
    from .models.families import family_class as registered

    return [k for k in FAMILIES if k == "tiny" or registered(k) is not None]


def _diffusers_kinds() -> str:
    """The diffusers kinds as prose: "flux, sd3 or wan"."""
    kinds = [k for k in model_kinds() if k != "tiny"]
    return " or ".join(filter(None, [", ".join(kinds[:-1]), kinds[-1]]))


@dataclass(frozen=True)
class ModelFiles:
    """The checkpoint's config values a schedule needs: where they came from (``source``),
    the pipeline class, the scheduler and transformer configs, and the VAE's spatial factor."""

    source: str
    pipeline: str | None
    scheduler: dict[str, Any]
    transformer: dict[str, Any]
    vae_scale_factor: int


@dataclass(frozen=True)
class RunSpec:
    """A run's resolved schedule and method parameters.

    ``sigmas`` [T + 1] is the grid the plan steps on; ``timesteps`` [T] what the transformer
    gets at steps 0..T-1 (``timestep=`` of its forward: sigma-scaled for FLUX, 1000 sigma for
    SD3/Wan); ``plan_kwargs`` the keyword arguments of `branchgrpo.engine.plans.build_plan` (with
    ``sigmas``); ``rule`` why this schedule was chosen; ``notes`` what else to know."""

    method: str
    plan: str
    family: str
    model_source: str
    schedule: str
    rule: str
    shift: float | None
    mu: float | None
    image_seq_len: int | None
    sigmas: tuple[float, ...]
    timesteps: tuple[float, ...]
    quantize_timestep: bool
    kernel: str
    level: float
    plan_kwargs: dict[str, Any]
    notes: tuple[str, ...] = field(default=())

    def build_plan(self, iteration: int = 0) -> RolloutPlan:
        """The plan at ``iteration`` (MixGRPO's window moves with it)."""
        from .engine.plans import build_plan

        return build_plan(self.plan, iteration=iteration, **self.plan_kwargs)


def resolve(cfg: Config) -> RunSpec:
    """The `RunSpec` of ``cfg`` (see the module docstring); `ConfigError` on a problem."""
    from .engine.methods import METHODS
    from .engine.plans import build_plan

    method = cfg.rollout.method
    if method not in METHODS:
        from .config import near

        raise ConfigError(f"rollout.method={method!r} is unknown; valid: {METHODS.names()}"
                          + near(method, METHODS.names()))
    plan_name, family, r = METHODS.get(method).plan, cfg.model.kind, cfg.rollout
    fam = family_class(family)
    files = read_model_files(cfg)
    dist = distilled(cfg, files)
    rule_kind, rule_q = ("diffusers", False) if dist else schedule_rule(plan_name, family)
    kind = r.schedule or rule_kind
    why = (f"rollout.schedule={kind}" if r.schedule else
           f"distilled {dist.name}: its own sampler's grid and timestep" if dist else
           f"rule for {family} x {plan_name}: {_RULE_WHY[(rule_kind, rule_q)]}")
    params = plan_params(cfg)
    if dist is not None and r.num_steps is None:  # the distilled sampler's step count
        params["num_steps"] = dist.steps
    steps = int(params.get("num_steps") or _plan_default(plan_name, "num_steps"))
    sig, shift, mu, seq = _grid(cfg, files, kind, steps)
    quant = r.quantize_timestep if r.quantize_timestep is not None else rule_q
    if quant and fam is None:
        raise ConfigError("rollout.quantize_timestep=true needs a diffusers model (model.kind "
                          f"{_diffusers_kinds()}); the tiny policy takes sigma itself")
    params |= {"sigmas": tuple(float(x) for x in sig)}
    if kind == "shifted":
        params |= {"schedule": "shifted", "shift": shift}
    if r.level is None and family == "tiny":
        params["level"] = TINY_LEVEL
    try:
        plan = build_plan(plan_name, **params)
    except (ValueError, KeyError, ZeroDivisionError) as e:
        raise ConfigError(f"method {method!r}: {e}") from None
    scale, top = (fam.timestep_scale, fam.timestep_sigma_max) if fam else (1.0, 1.0)
    ts = sch.transformer_timesteps(torch.tensor(plan.sigmas[:-1]), scale, bool(quant), top)
    notes = [f"model config: {files.source}"] if files else []
    if files and files.scheduler.get("use_flow_sigmas") and kind == "diffusers":
        notes.append("UniPC lowers sigma_0 by 1e-6 for its own solver; SDE steps use 1 exactly")
    return RunSpec(method, plan_name, family, files.source if files else "tiny (embedded)",
                   kind, why, shift, mu, seq, tuple(plan.sigmas), tuple(ts.tolist()), bool(quant),
                   plan.kernel, float(plan.level), params, tuple(notes))


_RULE_WHY = {("shifted", True): "FastVideo's shifted linspace and int(1000 sigma) timestep",
             ("diffusers", False): "the diffusers pipeline's schedule for this checkpoint",
             ("diffusers", True): "the diffusers pipeline's schedule and its integer timesteps",
             ("shifted", False): "the shifted linspace of the embedded default"}


def distilled(cfg: Config, files: ModelFiles | None = None) -> Distilled | None:
    """The `branchgrpo.models.family.Distilled` verdict of the family on the checkpoint's
    config values (``files``, read if not given): a distilled few-step model (FLUX.1-schnell,
    Z-Image-Turbo), whose own step count and guidance-free sampling the schedule keeps."""
    from .models.family import distilled_of

    fam = family_class(cfg.model.kind)
    files = files if files is not None else read_model_files(cfg)
    return distilled_of(fam, files.scheduler, files.transformer) if fam and files else None


def guidance(cfg: Config) -> float | None:
    """The guidance a run gets: ``model.guidance``, or when it is null the family's default:
    0 on a guidance-free distilled checkpoint (`distilled`: Z-Image-Turbo, FLUX.1-schnell),
    off (1) on Qwen-Image (its pipeline runs CFG only with a negative prompt), else the family
    dataclass's ``guidance_scale`` (the pipeline's default). None for the tiny family."""
    from .models.family import default_guidance

    fam = family_class(cfg.model.kind)
    if cfg.model.guidance is not None or fam is None:
        return cfg.model.guidance
    dist = distilled(cfg)
    if dist is not None and dist.guidance_free:
        return 0.0
    return 1.0 if fam.guidance_kind == "true_cfg" else default_guidance(fam)


def schedule_rule(plan: str, family: str) -> tuple[str, bool]:
    """(schedule, quantize_timestep) of ``plan`` on ``family`` when the config leaves them null
    (the module docstring's table): the family class's ``schedule_rule``; the tiny policy's
    shifted linspace on its own sigma."""
    fam = family_class(family)
    return fam.schedule_rule(plan) if fam else ("shifted", False)


def _plan_default(plan: str, name: str) -> Any:
    import inspect

    from .engine.plans import PLANS, branch

    fn = branch if plan == "branch_mix" else PLANS.get(plan)
    return inspect.signature(fn).parameters[name].default


def _grid(cfg: Config, files: ModelFiles | None, kind: str, steps: int,
          ) -> tuple[torch.Tensor, float | None, float | None, int | None]:
    """(sigmas [T + 1], static shift or None, mu or None, image tokens or None)."""
    r, fam = cfg.rollout, cfg.model.kind
    if steps < 1:
        raise ConfigError(f"rollout.num_steps must be >= 1, got {steps}")
    if kind == "shifted":
        shift = r.shift if r.shift is not None else 3.0
        return sch.shifted(steps, shift), shift, None, None
    if files is None:
        if kind == "flux_dynamic":  # the tiny policy: FLUX.1-dev's mu at 256 tokens
            return sch.flux_dynamic(steps, 256), None, sch.flux_mu(256), 256
        raise ConfigError(f"rollout.schedule={kind} needs a diffusers checkpoint (model.kind "
                          f"{_diffusers_kinds()}); use shifted or flux_dynamic on the tiny "
                          "family")
    try:
        g = family_class(fam).pipeline_grid(
            files.scheduler, steps, cfg.model.height, cfg.model.width, files.vae_scale_factor,
            r.shift, kind == "flux_dynamic")
    except ValueError as e:
        raise ConfigError(f"{files.source}: {e}") from None
    return g.sigmas, g.shift, g.mu, g.image_seq_len


def read_model_files(cfg: Config) -> ModelFiles | None:
    """The checkpoint's config values (None for the tiny family): the local folder
    ``model.path``, else the Hugging Face cache, else the family's ``released_config``
    (offline: no download)."""
    kind, path = cfg.model.kind, cfg.model.path
    fam = family_class(kind)
    if fam is None:
        return None
    if not path:
        raise ConfigError(f"model.kind={kind} needs model.path (a Hugging Face id or a local "
                          "folder)")
    p = Path(path).expanduser()
    if p.is_dir():
        files = {n: _read_json(p / n, required=n != "vae/config.json")
                 for n in ("model_index.json", "scheduler/scheduler_config.json",
                           "transformer/config.json", "vae/config.json")}
        return _model_files(kind, f"local folder {str(p)!r}", files)
    cached = {n: _cached(path, n) for n in ("model_index.json", "scheduler/scheduler_config.json",
                                             "transformer/config.json", "vae/config.json")}
    if cached["scheduler/scheduler_config.json"] and cached["transformer/config.json"]:
        files = {n: _read_json(Path(f), required=False) if f else None for n, f in cached.items()}
        return _model_files(kind, f"Hugging Face cache of {path!r}", files)
    d = getattr(fam, "released_configs", {}).get(path, fam.released_config)
    return ModelFiles(f"{kind} defaults (no local config files for {path!r}; the released "
                      "checkpoint's values)", fam.pipeline_name, dict(d["scheduler"]),
                      dict(d["transformer"]), d["vae_scale_factor"])


def _model_files(kind: str, source: str, files: dict[str, dict | None]) -> ModelFiles:
    fam = family_class(kind)
    index = files["model_index.json"] or {}
    pipe = index.get("_class_name")
    if pipe and pipe != fam.pipeline_name:
        other = next((k for k in model_kinds() if k != "tiny"
                      and family_class(k).pipeline_name == pipe), None)
        hint = f"set model.kind={other}" if other else f"use a {fam.pipeline_name} checkpoint"
        raise ConfigError(f"model.path {source} holds a {pipe}, not model.kind={kind}'s "
                          f"{fam.pipeline_name}; {hint}")
    vae = files["vae/config.json"]
    factor = (2 ** (len(vae["block_out_channels"]) - 1) if vae and "block_out_channels" in vae
              else vae["scale_factor_spatial"] if vae and "scale_factor_spatial" in vae
              else fam.released_config["vae_scale_factor"])
    return ModelFiles(source, pipe, files["scheduler/scheduler_config.json"] or {},
                      files["transformer/config.json"] or {}, factor)


def _read_json(path: Path, required: bool) -> dict | None:
    if not path.is_file():
        if required:
            raise ConfigError(f"model.path: {str(path)!r} is missing; pass a folder in the "
                              "diffusers layout (model_index.json, scheduler/, transformer/)")
        return None
    try:
        out = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"model.path: {str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ConfigError(f"model.path: {str(path)!r} must hold a JSON object")
    return out


def _cached(repo: str, filename: str) -> str | None:
    """The cached file of a Hub repository, or None (never a download)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        got = try_to_load_from_cache(repo, filename)
    except (ValueError, OSError):  # not a valid repository id
        return None
    return got if isinstance(got, str) else None


# ------------------------------------------------ the method's preset, overridden by the config
def plan_params(cfg: Config) -> dict[str, Any]:
    """The plan keyword arguments of the method: its preset, then every rollout field set (the
    config alone; `branchgrpo.spec.resolve` adds the model's schedule and the family's level)."""
    from .engine.methods import METHODS

    m = METHODS.get(cfg.rollout.method)
    params = dict(m.plan_kw)
    skip = {"method", "max_batch", "quantize_timestep"}
    for fl in fields(RolloutConfig):
        v = getattr(cfg.rollout, fl.name)
        if fl.name not in skip and v is not None:
            params[fl.name] = tuple(v) if isinstance(v, list) else v
    return params


def resolved_rules(cfg: Config) -> tuple[str, str, dict[str, Any]]:
    """(advantage rule, selector, selector kwargs): the method's, overridden by the config."""
    from .engine.methods import METHODS

    m = METHODS.get(cfg.rollout.method)
    rule = cfg.advantage.rule or m.advantage
    sel = cfg.selection.name or m.selection
    kw = dict(m.selection_kw) if sel == m.selection else {}
    for k in ("fraction", "random", "ratio", "depths", "interval", "stop_depth"):
        v = getattr(cfg.selection, k)
        if v is not None:
            kw[k] = tuple(v) if isinstance(v, list) else v
    return rule, sel, kw


def advantage_kw(cfg: Config, rule: str) -> dict[str, Any]:
    kw: dict[str, Any] = {"clip": cfg.advantage.clip, "combine": cfg.advantage.combine}
    if rule == "depth":
        kw |= {"fusion": cfg.advantage.fusion, "alpha": cfg.advantage.alpha}
    return kw


def clip_eps(cfg: Config) -> float:
    """``train.clip_eps``, or the method's published clip range when it is null."""
    from .engine.methods import METHODS

    if cfg.train.clip_eps is not None:
        return cfg.train.clip_eps
    return METHODS.get(cfg.rollout.method).clip_eps


def kl_coef(cfg: Config) -> float:
    """``train.kl_coef``, or when null the family's: `TINY_KL` on the tiny family, else 0 (the
    published recipes of DanceGRPO and BranchGRPO have no KL; Flow-GRPO's config sets it)."""
    if cfg.train.kl_coef is not None:
        return cfg.train.kl_coef
    return TINY_KL if cfg.model.kind == "tiny" else 0.0


def model_options(cfg: Config, progress: bool = True) -> ModelOptions:
    """The `branchgrpo.models.factory.ModelOptions` of ``cfg.model`` with the resolved timestep
    rule (`resolve`), for `branchgrpo.models.factory.build_policy`."""
    from dataclasses import asdict

    from .models.factory import ModelOptions

    names = {f.name for f in fields(ModelOptions)} - {"quantize_timestep", "progress"}
    values = {k: v for k, v in asdict(cfg.model).items() if k in names}
    values["guidance"] = guidance(cfg)
    return ModelOptions(**values, quantize_timestep=resolve(cfg).quantize_timestep,
                        progress=progress)


__all__ = ["strategy_of", "RunSpec", "ModelFiles", "resolve", "schedule_rule", "read_model_files",
           "distilled",
           "family_class", "model_kinds",
           "plan_params", "resolved_rules", "advantage_kw", "clip_eps", "kl_coef", "model_options",
           "guidance"]


def strategy_of(cfg: Config) -> str:
    """ddp or fsdp for ``dist.strategy``; auto shards (fsdp) only the full fine-tuning of a
    real (non-tiny) model, whose replicated weights and Adam states do not fit one device."""
    if cfg.dist.strategy != "auto":
        return cfg.dist.strategy
    return "fsdp" if cfg.model.finetune == "full" and cfg.model.kind != "tiny" else "ddp"

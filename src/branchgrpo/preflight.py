"""Everything about a run that can be checked before any model loads.

`branchgrpo.config.validate` checks each value on its own (choices, ranges, NaN); this module
checks the run they make together, against the registries and the files on disk: the method's
plan and how big its trees get (arithmetically first, so an absurd branch factor fails in
microseconds instead of allocating until the machine runs out of memory), the advantage rule
and the selector and the keyword arguments they accept, a one-tree dry run on the analytic
policy, the training rewards and the judge, the device, and every line of the prompt files
against the task. Each problem is a `ConfigError` that names the key and what to change.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, near, prompts_per_rank
from .models.families import FAMILIES
from .spec import (
    RunSpec,
    advantage_kw,
    pipeline_refusal,
    plan_params,
    resolve,
    resolved_rules,
    strategy_of,
)

MAX_LEAVES = 4096
"""Leaves (decoded images, reward calls) per tree: 14x the largest published tree (G2RPO's
289 leaves: an anchor and 12 members x 8 SDE steps x 3 granularities)."""
MAX_NODES = 200_000
"""Nodes per tree: each stores a latent, so this bounds rollout memory per prompt."""
_SELECTOR_ARGS = {"tree", "adv", "iteration", "generator"}


def check_run(cfg: Config) -> None:
    """Raise `ConfigError` for the first problem of the run ``cfg`` describes."""
    check_plan(cfg)
    check_rewards(cfg)
    _check_device(cfg)
    check_sequence_parallel(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    _check_prompts(cfg)
    _check_wandb(cfg)


def check_plan(cfg: Config) -> RunSpec:
    """The checks of the run's plan alone (no rewards, devices or prompt files): its
    `RunSpec`, or `ConfigError` for the first problem."""
    _check_distilled(cfg)
    _check_small_gpu(cfg)
    spec, plan = _check_plan(cfg)
    _check_rules(cfg, plan)
    _check_dry_run(cfg, spec)
    return spec


def _check_small_gpu(cfg: Config) -> None:
    """A quantized base or encoder offload that cannot work (docs/small_gpu.md): a quantized
    base without LoRA (its weights cannot train), compiled (torch.compile refuses its tensor
    subclass) or under FSDP (torchao's tensors do not shard), any of them on an embedded kind
    (no pipeline); ``model.prompt_embeddings`` where it cannot serve the run
    (`branchgrpo.encode.refusal`: the file itself is checked by `check_run`)."""
    from .encode import refusal

    if why := refusal(cfg):
        raise ConfigError(why)
    m = cfg.model
    asked = [k for k, on in (("quantize", m.quantize != "none"),
                             ("offload_encoders", m.offload_encoders),
                             ("free_encoders", m.free_encoders)) if on]
    if asked and m.kind in FAMILIES and (why := pipeline_refusal(cfg, asked[0])):
        raise ConfigError(why)
    if m.quantize == "none":
        return
    if m.finetune != "lora":
        raise ConfigError(f"model.quantize={m.quantize} freezes the base weights: set "
                          "model.finetune=lora (or model.quantize=none for full fine-tuning)")
    if m.compile:  # measured: AOTAutograd refuses torchao's subclass weights under LoRA
        raise ConfigError(f"model.quantize={m.quantize} does not compile (torch.compile "
                          "refuses the quantized weights' tensor subclass in a training "
                          "graph): set model.compile=false or model.quantize=none")
    if strategy_of(cfg) == "fsdp":
        raise ConfigError(f"model.quantize={m.quantize} does not shard under FSDP: set "
                          "dist.strategy=ddp (LoRA replicates its few weights) or "
                          "model.quantize=none")


def _check_plan(cfg: Config) -> tuple[RunSpec, Any]:
    """The method's plan builds with the model's schedule, takes every rollout key set, and
    its trees stay bounded."""
    from .engine.methods import METHODS
    from .engine.plans import plan_parameters

    method = cfg.rollout.method
    if method not in METHODS:
        raise ConfigError(f"rollout.method={method!r} is unknown; valid: {METHODS.names()}"
                          + near(method, METHODS.names()))
    valid = plan_parameters(METHODS.get(method).plan)
    for k in plan_params(cfg):
        if k not in valid:
            raise ConfigError(f"rollout.{k} is not used by method {method!r}; remove it (it "
                              "applies to other methods)")
    spec = resolve(cfg)
    plan = spec.build_plan()
    nodes, leaves = plan.size()
    if leaves > MAX_LEAVES or nodes > MAX_NODES:
        raise ConfigError(
            f"method {method!r} makes {leaves:,} leaves and {nodes:,} nodes per tree (at most "
            f"{MAX_LEAVES:,} leaves and {MAX_NODES:,} nodes): lower rollout.branch_factor, "
            "rollout.group_size or the number of rollout.split_steps")
    if leaves < 2:
        raise ConfigError(
            f"method {method!r} makes one leaf per tree: a group-relative advantage is then 0 "
            "and nothing trains; raise rollout.branch_factor or rollout.group_size to >= 2")
    return spec, plan


def _check_distilled(cfg: Config) -> None:
    """A distilled few-step checkpoint (`branchgrpo.spec.distilled`: FLUX.1-schnell,
    Z-Image-Turbo) keeps the sampler it was distilled for (docs/algorithms.md §1.10): no CFG
    on a guidance-free model, no more steps than its schedule has, no other grid than its
    pipeline's."""
    from .spec import distilled, family_class

    dist = distilled(cfg)
    if dist is None:
        return
    r, m = cfg.rollout, cfg.model
    what = f"model.path={m.path!r} is {dist.name}, a distilled few-step model ({dist.evidence})"
    if dist.guidance_free and family_class(m.kind).guidance_kind == "cfg" and (m.guidance or 0) > 0:
        raise ConfigError(f"{what}, distilled to sample without classifier-free guidance; "
                          f"model.guidance={m.guidance} turns CFG on, a velocity it was never "
                          "trained to give: set model.guidance=0")
    if r.num_steps is not None and r.num_steps > dist.steps:
        raise ConfigError(f"{what}, trained on its {dist.steps}-step trajectory only; "
                          f"rollout.num_steps={r.num_steps} puts steps at sigmas between "
                          f"those it was distilled on: set rollout.num_steps<={dist.steps} "
                          f"(null: {dist.steps})")
    if (r.schedule not in (None, "diffusers")) or r.shift is not None:
        key = "rollout.shift" if r.schedule in (None, "diffusers") else "rollout.schedule"
        raise ConfigError(f"{what}; {key} moves its grid off the sigmas of its distilled "
                          "sampler: remove rollout.schedule and rollout.shift (its pipeline's "
                          "own grid is used)")


def _check_rules(cfg: Config, plan: Any) -> None:
    """The advantage rule and selector exist and take the keyword arguments configured."""
    from .engine.advantages import ADVANTAGES
    from .engine.pruning import SELECTORS

    rule, sel, sel_kw = resolved_rules(cfg)
    if rule not in ADVANTAGES:
        raise ConfigError(f"advantage.rule={rule!r} is unknown; valid: {ADVANTAGES.names()}"
                          + near(rule, ADVANTAGES.names()))
    if sel not in SELECTORS:
        raise ConfigError(f"selection.name={sel!r} is unknown; valid: {SELECTORS.names()}"
                          + near(sel, SELECTORS.names()))
    takes = _keywords(SELECTORS.get(sel)) - _SELECTOR_ARGS
    for k in sel_kw:
        if k not in takes:
            where = f"selection {sel!r}" + (" (the method's)" if not cfg.selection.name else "")
            raise ConfigError(f"selection.{k} is not used by {where}; remove it, or set "
                              "selection.name to a selector that takes it: "
                              f"{_selectors_taking(k)}")
    if cfg.train.ratio == "guard" and plan.kernel == "cps":
        raise ConfigError("train.ratio=guard with the cps kernel: GRPO-Guard's ratio "
                          "correction needs a Gaussian log-prob, and CPS scores a substitute "
                          "without the 1/(2 std^2) factor; use rollout.kernel=flow or "
                          "train.ratio=standard")


def dry_run_counts(cfg: Config, spec: RunSpec) -> dict[str, int]:
    """One tree of ``spec``'s plan on the analytic policy, scored and selected as ``cfg``
    says: its forwards, nodes, edges, trained edges and leaves."""
    from .engine.advantages import compute_advantages
    from .engine.pruning import select_edges
    from .engine.tree import rollout
    from .models.analytic import GaussianPolicy

    rule, sel, sel_kw = resolved_rules(cfg)
    gen = torch.Generator().manual_seed(0)  # never the global generator: a resumed run calls
    try:                                    # this after restoring its RNG state
        pol = GaussianPolicy(2)
        tree = rollout(pol, pol.encode(["x"]), spec.build_plan(), generator=gen)
        reward = torch.randn(int(tree.leaf.sum()), generator=gen)
        adv = compute_advantages(tree, {"r": reward}, rule, **advantage_kw(cfg, rule))
        n = int(select_edges(tree, adv, sel, generator=gen, **sel_kw).sum())
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        raise ConfigError(f"method {cfg.rollout.method!r}: {_msg(e)}") from None
    return {"forwards": int(tree.forwards), "nodes": int(tree.num_nodes),
            "edges": int(tree.edge_mask.sum()), "trained_edges": n,
            "leaves": int(tree.leaf.sum())}


def _check_dry_run(cfg: Config, spec: RunSpec) -> None:
    """One tree on the analytic policy: plan, rule and selection fit, and there are enough
    trained edges for the update cadence."""
    _, sel, _ = resolved_rules(cfg)
    n = dry_run_counts(cfg, spec)["trained_edges"]
    if n == 0:
        raise ConfigError(f"method {cfg.rollout.method!r} with selection {sel!r} trains no edge "
                          "of a tree; select more (e.g. fewer selection.depths)")
    world = int(os.environ.get("WORLD_SIZE", "1")) // cfg.dist.sequence_parallel or 1
    per_rank = prompts_per_rank(cfg, world)
    total = n * per_rank
    if total < cfg.train.updates_per_rollout:
        where = f" on each of {world} ranks" if world > 1 else ""
        key = "dist.global_prompts" if cfg.dist.global_prompts else "train.prompts_per_iteration"
        raise ConfigError(
            f"{total} trained edges per rollout batch{where} ({per_rank} trees x {n}) cannot "
            f"feed train.updates_per_rollout={cfg.train.updates_per_rollout}: lower it to at "
            f"most {total} or raise {key}")


def check_rewards(cfg: Config) -> None:
    """Every training reward and the judge name something that can be built."""
    options = cfg.reward.options
    for name in cfg.reward.weights:
        opts = options.get(name) or {}
        if not isinstance(opts, dict):
            raise ConfigError(f"reward.options.{name} must be a mapping of keyword arguments, "
                              f"got {opts!r}")
        _check_source(str(opts.get("source", name)), f"reward.weights.{name}", opts)
        _check_media(cfg, str(opts.get("source", name)), f"reward.weights.{name}")
    for name in options:
        if name not in cfg.reward.weights:
            raise ConfigError(f"reward.options.{name} configures a reward that is not in "
                              f"reward.weights {sorted(cfg.reward.weights)}; add it there or "
                              "remove the options")
    if cfg.reward.judge and cfg.reward.judge != "judge":
        _check_source(cfg.reward.judge, "reward.judge", {})


def _check_source(source: str, key: str, opts: dict) -> None:
    """A registered reward name, ``remote`` with a url, or an importable ``pkg.mod:attr``."""
    from .scoring import REWARDS

    if ":" in source:
        from .rewards.base import _import_path

        try:
            _import_path(source)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from None
        return
    if source not in REWARDS:
        raise ConfigError(f"{key}: unknown reward {source!r}; valid: {REWARDS.names()}, or a "
                          "dotted path 'package.module:function'" + near(source, REWARDS.names()))
    if source == "remote" and not opts.get("url"):
        raise ConfigError(f"{key} is a remote reward: set its url in reward.options "
                          "(e.g. {url: http://127.0.0.1:8900})")


def _check_media(cfg: Config, source: str, key: str) -> None:
    """A registered reward whose factory declares ``media = ("video",)`` (VideoAlign) is refused
    for a family that decodes images (``Family.video`` false, or an embedded family)."""
    from .scoring import REWARDS

    if ":" in source or source not in REWARDS:
        return
    media = getattr(REWARDS.get(source), "media", None)
    if not media or "image" in media:
        return
    from .models.families import family_class

    try:
        family = family_class(cfg.model.kind)
    except ValueError:
        return  # an unknown kind is reported by the plan checks
    if not getattr(family, "video", False):
        raise ConfigError(f"{key}: reward {source!r} scores videos only and model.kind="
                          f"{cfg.model.kind!r} makes images; use it with a video family "
                          "(model.kind=wan) or choose an image reward")


def _check_device(cfg: Config) -> None:
    d = cfg.train.device
    if d == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda, but this machine has no CUDA device (or torch is "
                          f"a CPU build, {torch.__version__}); use train.device=cpu or auto")
    backend = cfg.model.attention_backend
    on_cuda = d == "cuda" or (d == "auto" and torch.cuda.is_available())
    if backend not in ("native", "_native_math") and not on_cuda:
        raise ConfigError(f"model.attention_backend={backend} is a CUDA kernel and this run is "
                          "on the CPU; use model.attention_backend=native")


def check_sequence_parallel(cfg: Config, world: int) -> None:
    """``dist.sequence_parallel`` R: a video family (wan), R dividing the ``world`` ranks.
    The head and token counts are checked once the transformer is built
    (`branchgrpo.sequence_parallel.check`)."""
    sp = cfg.dist.sequence_parallel
    if sp <= 1:
        return
    from .spec import family_class

    cls = family_class(cfg.model.kind)
    if cls is None or not getattr(cls, "video", False):
        raise ConfigError(f"dist.sequence_parallel={sp} splits video token sequences; "
                          f"model.kind={cfg.model.kind} is not a video family: use a wan "
                          "kind or set dist.sequence_parallel=1")
    if world % sp:
        fits = [r for r in range(1, world + 1) if world % r == 0]
        raise ConfigError(f"dist.sequence_parallel={sp} does not divide the {world} ranks "
                          f"(WORLD_SIZE): use one of {fits}, or run on a multiple of {sp} ranks")


def _check_wandb(cfg: Config) -> None:
    """``log.wandb=true`` has the package, and an online run has credentials (wandb would
    otherwise ask for a key on stdin, or fail, after the models have loaded)."""
    if not cfg.log.wandb:
        return
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb=true needs the wandb package: pip install "
                          "'branchgrpo[wandb]' (or set log.wandb=false)")
    mode = os.environ.get("WANDB_MODE", "online")
    if mode in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")):
        raise ConfigError("log.wandb=true online needs a wandb login: run `wandb login`, set "
                          "WANDB_API_KEY, or log without a network with WANDB_MODE=offline "
                          "(`wandb sync RUN/wandb/offline-run-*` uploads it later)")


def _check_prompts(cfg: Config) -> None:
    """The prompt files exist, every line fits the task, and a ``model.prompt_embeddings``
    file holds every prompt (`branchgrpo.encode.check_prompt_embeddings`)."""
    from .models.factory import load_prompts

    train, held = load_prompts(cfg.data.prompts, cfg.data.eval_prompts)
    check_prompts(cfg, train, f"data.prompts: {_where(cfg.data.prompts)}")
    check_prompts(cfg, held, f"data.eval_prompts: {_where(cfg.data.eval_prompts)}")
    _check_conditions(cfg, train, f"data.prompts: {_where(cfg.data.prompts)}")
    _check_conditions(cfg, held, f"data.eval_prompts: {_where(cfg.data.eval_prompts)}")
    from .encode import check_prompt_embeddings

    check_prompt_embeddings(cfg, train + held, "data.prompts and data.eval_prompts")


def _check_conditions(cfg: Config, prompts: list[str], where: str) -> None:
    """A family conditioning on more than text (``prompt_check``: wan_i2v's first frames) has
    what every prompt needs."""
    from .spec import family_class

    fam = family_class(cfg.model.kind)
    if fam is None or not hasattr(fam, "prompt_check"):
        return
    try:
        check = fam.prompt_check(cfg.model.images)
    except ValueError as e:
        raise ConfigError(_msg(e)) from None
    for i, p in enumerate(prompts):
        try:
            check(p)
        except ValueError as e:
            raise ConfigError(f"{where.format(line=i + 1)}: {_msg(e)}") from None


def check_prompts(cfg: Config, prompts: list[str], where: str, scored: bool = True) -> None:
    """Every prompt fits the task: the tiny policy's word encoder knows only the shapes
    vocabulary, and (when the prompts will be ``scored``) the shapes reward and judge parse
    each prompt. ``where`` names the source in the error (``{line}``: the 1-based line)."""
    from .tasks import shapes

    checks: list[tuple[str, Callable[[str], Any]]] = []
    if cfg.model.kind == "tiny":
        checks.append(("the tiny policy", lambda p: shapes.tokenize([p])))
    if scored and ("shapes" in cfg.reward.weights or cfg.reward.judge == "judge"):
        checks.append(("the shapes reward and judge", shapes.parse))
    for what, fn in checks:
        for i, p in enumerate(prompts):
            try:
                fn(p)
            except ValueError as e:
                raise ConfigError(f"{where.format(line=i + 1)} cannot be used by {what}: "
                                  f"{_msg(e)}; use prompts of the task's grammar, e.g. 'two red "
                                  "circles on the left'") from None


def _where(spec: str) -> str:
    return "the built-in shapes prompts" if spec == "shapes" else f"line {{line}} of {spec}"


def _keywords(fn: Callable[..., Any]) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _selectors_taking(key: str) -> list[str]:
    from .engine.pruning import SELECTORS

    return [n for n in SELECTORS.names() if key in _keywords(SELECTORS.get(n))]


def _msg(e: BaseException) -> str:
    """An exception's message without KeyError's quotes."""
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def check_geometry(cfg: Config, world: int, num_prompts: int) -> int:
    """Validate the batch over ``world`` ranks and return prompts per rank P; raise
    ConfigError saying what to change. Trees never straddle ranks, so a group always divides;
    the global batch (world x P) must divide evenly and fit the prompt set."""
    gp = cfg.dist.global_prompts
    p = prompts_per_rank(cfg, world)
    if p < 1:
        raise ConfigError(f"{world} ranks leave {p} prompts per rank: every rank needs at least "
                          "one tree; raise train.prompts_per_iteration (or dist.global_prompts) "
                          "or use fewer ranks")
    if world > 1 and world > num_prompts:
        raise ConfigError(f"{world} ranks > {num_prompts} training prompts: each rank needs its "
                          f"own prompt; use at most {num_prompts} ranks or give more prompts in "
                          "data.prompts")
    if world > 1 and world * p > num_prompts:
        best = max(1, num_prompts // world)
        key = "dist.global_prompts" if gp else "train.prompts_per_iteration"
        to = best * world if gp else best
        raise ConfigError(f"{world} ranks x {p} prompts = {world * p} > {num_prompts} training "
                          f"prompts: lower {key} to {to} or give more prompts in data.prompts")
    if world > 1 and cfg.advantage.combine == "advantage_sum" and len(cfg.reward.weights) > 1:
        if resolved_rules(cfg)[0] == "prompt_global_std":
            raise ConfigError("prompt_global_std over ranks gathers one std of the combined "
                              "reward: set advantage.combine=reward_sum (or run on one rank)")
    return p

"""THE recipe: rollout -> decode -> reward -> advantages -> edge selection -> update -> log.

Readable top to bottom. Every phase is timed (``time/<phase>``). Every source of randomness
is a generator seeded from (seed, iteration, purpose), so a resumed run draws exactly the
noise, prompts and shuffles the uninterrupted run would have drawn.

How this differs from the published scripts (docs/algorithms.md §13): one batched tree engine for
every method; the optimizer cadence is ``train.updates_per_rollout`` (not a by-product of
gradient accumulation over edges); split noise lambda defaults to 1 and is scored with the
std actually sampled with; rollout latents are round-tripped through their storage dtype
before scoring, so ``ratio/first`` is exactly 1; and resume works.

Under torchrun (docs/distributed.md) every rank runs this same loop on its own slice of the
global prompt batch (whole trees per rank), DDP or FSDP2 average the gradients, rewards and
metrics are averaged over ranks for logging, and rank 0 alone writes the run directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import checkpoint as ckpt
from . import dist, scoring
from .config import Config, to_yaml
from .engine.advantages import RewardValueError, compute_advantages, zero_std_fraction
from .engine.losses import guard_log_ratio, kl_penalty, policy_loss
from .engine.policy import select_cond
from .engine.pruning import select_edges
from .engine.tree import EdgeBatch, RolloutPlan, Tree, decode_leaves, edge_log_prob, rollout
from .evaluate import evaluate, grid_warning, group_diversity, image_stats, save_grid, token_period
from .log import RunLogger, Timer
from .models.factory import build_policy, load_prompts
from .models.families import module_of
from .models.loading import DTYPES
from .plan_report import plan_report
from .preflight import check_geometry, check_run
from .rewards import RewardError, RewardSet
from .spec import (
    RunSpec,
    advantage_kw,
    clip_eps,
    kl_coef,
    model_options,
    resolve,
    resolved_rules,
    strategy_of,
)


class TrainingStopped(RuntimeError):
    """The run stopped on bad data (NaN reward or loss); the last checkpoint is intact."""


def seeded(seed: int, iteration: int, purpose: str, device: Any = "cpu") -> torch.Generator:
    """A generator for one purpose of one iteration, independent of everything else."""
    h = hashlib.sha256(f"{seed}/{iteration}/{purpose}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(h[:8], "little") >> 1)


@dataclass
class State:
    """What the loop carries between iterations (and what a checkpoint restores)."""

    cfg: Config
    run_dir: Path
    device: torch.device
    policy: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rewards: RewardSet
    judge: Any
    train_prompts: list[str]
    eval_prompts: list[str]
    logger: RunLogger
    ema: list[torch.Tensor] | None = None
    reference: Any = None
    iteration: int = 0
    elapsed: float = 0.0
    extra: dict = field(default_factory=dict)
    dist: dist.Dist = field(default_factory=dist.Dist)
    prompts_per_rank: int = 1
    param_names: list[str] = field(default_factory=list)  # names of ``params`` (unwrapped)
    spec: RunSpec | None = None  # the resolved schedule and plan parameters (`resolve`)

    def purpose(self, name: str) -> str:
        """A generator purpose, with the data-parallel rank folded in on ranks > 0 (rank 0
        keeps the single-process stream; the ranks of a sequence-parallel group share one)."""
        return name if self.dist.dp_rank == 0 else f"{name}/rank{self.dist.dp_rank}"


# ----------------------------------------------------------------------------- the loop
def train(cfg: Config, resume: Path | None = None) -> Path:
    """Run (or resume) a training run; returns the run directory.

    The training clock (``time/elapsed``, ``train.time_budget``, ``log.eval_every_seconds``)
    counts the loop's seconds with evaluation left out; a checkpoint carries it, so a resumed
    run continues it. Under torchrun rank 0's clock decides for every rank."""
    check_run(cfg)
    s = setup(cfg, resume)
    main = s.dist.main
    if s.iteration == 0:
        run_eval(s, "before")
    clock = _Clock(s.elapsed)
    bar = _progress(s)
    try:
        while s.iteration < cfg.train.iterations and not _budget_spent(s):
            metrics = iteration(s)
            s.iteration += 1
            s.elapsed = dist.broadcast(s.dist, clock.read())
            metrics["time/elapsed"] = s.elapsed
            s.logger.log(s.iteration, metrics)
            if cfg.dist.verify_sync and s.iteration % cfg.dist.verify_sync == 0:
                dist.check_sync(s.dist, s.params, s.iteration)
            _warn_no_signal(s, metrics, bar)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/total']:.3f}",
                            sec=f"{metrics['time/iteration']:.1f}")
            done = s.iteration == cfg.train.iterations or _budget_spent(s)
            if not done and _eval_due(s):
                with clock.paused():
                    run_eval(s, f"iter_{s.iteration:04d}")
            if done or s.iteration % cfg.log.checkpoint_every == 0:
                _save(s)
            if done:
                break
    finally:
        bar.close()
    run_eval(s, "after")
    export_lora(s)
    if main:
        from .report import write_report

        write_report(s.run_dir)
        s.logger.images(s.iteration, {f"plots/{p.stem}": p
                                      for p in sorted((s.run_dir / "plots").glob("*.png"))})
    s.logger.close()
    dist.barrier(s.dist)
    dist.close(s.dist)
    return s.run_dir


def export_lora(s: State) -> Path | None:
    """A run trained with LoRA (``model.finetune=lora`` on a diffusers family) leaves its
    adapter under ``RUN/lora/`` in the diffusers format, EMA weights when kept (as ``branchgrpo
    sample`` uses), so ``pipeline.load_lora_weights("RUN/lora")`` loads it. Full fine-tuning
    (the embedded tiny default included) writes nothing here: its trained weights are the
    checkpoint's ``model.safetensors``. Under FSDP the sharded adapter stays in the checkpoint."""
    from .models.lora import save_lora

    with dist.unwrapped(s.policy) as policy, _ema_weights(s):
        if not getattr(getattr(policy, "transformer", None), "peft_config", None):
            return None
        if s.dist.strategy == "fsdp":
            dist.print0(s.dist, "note: LoRA export under FSDP is not supported; the adapter is "
                        "in the checkpoint")
            return None
        out = s.run_dir / "lora"
        if s.dist.main:
            save_lora(policy, out)
        dist.barrier(s.dist)
        return out


class _Clock:
    """Training seconds: ``elapsed`` carried in plus wall time since, less ``paused()`` time."""

    def __init__(self, elapsed: float) -> None:
        self.t0 = time.perf_counter() - elapsed

    def read(self) -> float:
        return time.perf_counter() - self.t0

    @contextmanager
    def paused(self) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - t


def _warn_no_signal(s: State, metrics: dict[str, float], bar: Any) -> None:
    """Say loudly when an iteration had no learning signal: every tree's leaves scored alike
    (a constant reward, one leaf per group), so every advantage was 0 and nothing was learnt."""
    if s.dist.main and metrics["reward/zero_std_frac"] >= 1.0:
        bar.write(f"warning: iteration {s.iteration}: every tree's rewards are equal "
                  "(reward/zero_std_frac=1), so all advantages are 0 and this update learnt "
                  "nothing; check that the reward varies with the image", file=sys.stderr)


def _budget_spent(s: State) -> bool:
    """``train.time_budget`` is set and the training clock has reached it."""
    return 0 < s.cfg.train.time_budget <= s.elapsed


def _eval_due(s: State) -> bool:
    """A held-out evaluation is due: every ``log.eval_every`` iterations, or when
    ``log.eval_every_seconds`` training seconds have passed since the last one."""
    log = s.cfg.log
    every_it = bool(log.eval_every) and s.iteration % log.eval_every == 0
    since = s.elapsed - s.extra.get("last_eval_elapsed", 0.0)
    return every_it or 0 < log.eval_every_seconds <= since


def iteration(s: State) -> dict[str, float]:
    """One rollout batch and its updates."""
    cfg, it, timer = s.cfg, s.iteration, Timer()
    t0 = time.perf_counter()
    plan = s.spec.build_plan(it)
    prompts, first = _prompt_batch(s)
    rule, sel, sel_kw = resolved_rules(cfg)
    with timer("rollout"):
        cond = s.policy.encode(prompts)
        with _autocast(s):
            tree = _rollout(s, cond, plan, first)
    with timer("decode"):
        media = decode_leaves(s.policy, tree, cfg.reward.batch_size)
    group = tree.group[tree.leaf_ids].cpu()
    leaf_prompts = [prompts[g] for g in group.tolist()]
    with timer("reward"):
        try:
            scores = s.rewards.score(media, leaf_prompts, group)
        except RewardError as e:
            raise TrainingStopped(f"iteration {it + 1}: {e}") from None
    with timer("advantage"):
        try:
            adv = compute_advantages(tree, scores, rule, cfg.reward.weights,
                                     **advantage_kw(cfg, rule), **_global_kw(s, rule, scores))
        except RewardValueError as e:
            raise TrainingStopped(f"iteration {it + 1}: {e}") from None
    with timer("select"):
        pruning = it < cfg.selection.until * cfg.train.iterations
        name, kw = (sel, sel_kw) if pruning else ("all", {})
        mask = select_edges(tree, adv, name, iteration=it,
                            generator=seeded(cfg.train.seed, it, s.purpose("select")), **kw)
        edges = tree.edges(mask.to(tree.parent.device), adv.to(tree.parent.device))
    with timer("update"):
        stats = update(s, edges, cond, plan)
    total = sum(cfg.reward.weights[k] * v.float() for k, v in scores.items())
    out = {f"reward/{k}": float(v.float().mean()) for k, v in scores.items()}
    out |= {"reward/total": float(total.mean()), "reward/zero_std_frac":
            zero_std_fraction(tree, total), "monitor/diversity": group_diversity(media, group),
            **image_stats(media, token_period(s.policy)), "tree/forwards": tree.forwards,
            "tree/nodes": tree.num_nodes,
            "tree/edges": int(tree.edge_mask.sum()), "tree/trained_edges": len(edges),
            "lr": s.scheduler.get_last_lr()[0], **stats, **timer.times}
    out["time/iteration"] = time.perf_counter() - t0
    return dist.mean_metrics(s.dist, out)


def update(s: State, edges: EdgeBatch, cond: dict, plan: RolloutPlan) -> dict[str, float]:
    """``updates_per_rollout`` optimizer steps over a shuffled split of the edges."""
    cfg = s.cfg
    n = len(edges)
    counts = dist.gather_int(s.dist, n)
    if min(counts) < cfg.train.updates_per_rollout:
        raise TrainingStopped(f"{min(counts)} trained edges < train.updates_per_rollout="
                              f"{cfg.train.updates_per_rollout}")
    if not dist.same_work(s.dist, counts):
        raise TrainingStopped(f"ranks selected different edge counts {counts}; FSDP needs the "
                              "same forwards on every rank: use a selection with a fixed count")
    perm = torch.randperm(n, generator=seeded(cfg.train.seed, s.iteration, s.purpose("shuffle")))
    agg: dict[str, list[float]] = {}
    for u, mb in enumerate(perm.tensor_split(cfg.train.updates_per_rollout)):
        s.optimizer.zero_grad(set_to_none=True)
        chunks = mb.split(cfg.train.edge_chunk)
        for c, chunk in enumerate(chunks):
            with dist.no_sync(s.policy, s.dist, last=c == len(chunks) - 1):
                st = _loss_backward(s, edges.index(chunk.to(edges.child.device)), cond, plan,
                                    weight=len(chunk) / len(mb))
            if u == 0 and c == 0:
                st["ratio/first"] = st["ratio/mean"]
            for k, v in st.items():
                agg.setdefault(k, []).append(v)
        grad = _clip_and_step(s)
        agg.setdefault("grad_norm", []).append(grad)
    s.scheduler.step()
    return {k: (v[0] if k == "ratio/first" else sum(v) / len(v)) for k, v in agg.items()}


def _loss_backward(s: State, e: EdgeBatch, cond: dict, plan: RolloutPlan,
                   weight: float) -> dict[str, float]:
    cfg = s.cfg
    with _autocast(s):
        lp, mean, std, v = edge_log_prob(s.policy, e, cond, plan, max_batch=cfg.rollout.max_batch,
                                         storage_dtype=DTYPES[cfg.model.storage_dtype])
    log_ratio = None
    if cfg.train.ratio == "guard":
        log_ratio = guard_log_ratio(lp, e.old_log_prob, mean, e.old_mean, std)
    kl = None
    if kl_coef(cfg) > 0:
        with torch.no_grad(), _autocast(s):
            _, ref_mean, _, ref_v = edge_log_prob(s.reference, e, cond, plan,
                                                  max_batch=cfg.rollout.max_batch)
        kl = kl_penalty(cfg.train.kl_kind, mean=mean, ref_mean=ref_mean, v=v, ref_v=ref_v,
                        sigma=e.sigma, sigma_next=e.sigma_next, kernel=plan.kernel,
                        level=plan.level)
    loss, st = policy_loss(lp, e.old_log_prob, e.adv, clip_eps(cfg), step=e.step,
                           log_ratio=log_ratio, kl=kl, kl_coef=kl_coef(cfg))
    if not torch.isfinite(loss):
        raise TrainingStopped(f"iteration {s.iteration + 1}: non-finite loss "
                              f"{loss.item()}; lower train.lr or train.max_grad_norm")
    (loss * weight).backward()
    return st


def _clip_and_step(s: State) -> float:
    cfg = s.cfg
    norm = torch.nn.utils.clip_grad_norm_(s.params, cfg.train.max_grad_norm or math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor
        norm = norm.full_tensor()
    s.optimizer.step()
    if s.ema is not None:
        with torch.no_grad():
            for e, p in zip(s.ema, s.params, strict=True):
                e.lerp_(p.detach(), 1 - cfg.train.ema_decay)
    return float(norm)


# ----------------------------------------------------------------------------- set-up
def setup(cfg: Config, resume: Path | None) -> State:
    """Build everything; restore the newest checkpoint when resuming. Under torchrun: join
    the process group, check the batch geometry, wrap the policy (DDP / FSDP2)."""
    d, device = dist.init(_device(cfg), strategy=strategy_of(cfg), backend=cfg.dist.backend,
                          timeout_minutes=cfg.dist.timeout_minutes,
                          sequence_parallel=cfg.dist.sequence_parallel)
    run_dir = Path(dist.broadcast(d, str(Path(resume) if resume else _new_run_dir(cfg))))
    train_prompts, eval_prompts = load_prompts(cfg.data.prompts, cfg.data.eval_prompts)
    per_rank = check_geometry(cfg, d.dp_world, len(train_prompts))
    path = ckpt.pick_checkpoint(run_dir, d, cfg.log.checkpoint_every) if resume else None
    torch.manual_seed(cfg.train.seed)
    with dist.main_first(d):  # rank 0 fills the model caches first
        policy = build_policy(model_options(cfg, progress=cfg.log.progress and d.main), device,
                              train_prompts + eval_prompts)  # model.free_encoders encodes them
        judge = scoring.judge(cfg, d.main)
    # reseed: building drew from the global generators or not (tiny: pretrained, or cached)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)  # nothing draws from these today; a future draw stays seeded
    np.random.seed(cfg.train.seed)
    s = assemble(cfg, policy, device, (train_prompts, eval_prompts), run_dir, d=d, judge=judge,
                 prompts_per_rank=per_rank)
    _open_run_dir(s, _restore(s, path) if path else None)
    dist.print0(d, f"run directory: {run_dir}\n{to_yaml(cfg)}")
    if d.enabled:
        dist.print0(d, f"distributed: {d.layout}, {per_rank} prompts per rank "
                    f"({d.dp_world * per_rank} per iteration)")
    return s


def assemble(cfg: Config, policy: Any, device: torch.device, prompts: tuple[list[str], list[str]],
             run_dir: Path, *, d: dist.Dist | None = None, judge: Any = None,
             prompts_per_rank: int | None = None) -> State:
    """The loop's `State` around a built ``policy``: trainable parameters by name, the KL
    reference, DDP / FSDP2 wrapping (under torchrun), AdamW, the LR schedule, the rewards of
    ``cfg.reward``, EMA. ``prompts``: (training, held-out). Writes nothing (`setup` opens the
    run directory); `branchgrpo.bench` times `iteration` on states built here."""
    d = d or dist.Dist()
    if prompts_per_rank is None:
        prompts_per_rank = check_geometry(cfg, d.dp_world, len(prompts[0]))
    names = {id(p): n for n, p in module_of(policy).named_parameters()}
    param_names = [names[id(p)] for p in policy.trainable_parameters()]
    keep = {id(p) for p in policy.trainable_parameters()}
    for p in module_of(policy).parameters():
        p.requires_grad_(id(p) in keep)
    reference = copy.deepcopy(policy) if kl_coef(cfg) > 0 else None
    if reference is not None:  # a diffusers family's policy is no module: freeze its weights
        module_of(reference).requires_grad_(False)
    wrap = {"bf16": cfg.model.dtype == "bf16", "cpu_offload": cfg.dist.cpu_offload,
            "find_unused_parameters": cfg.dist.find_unused_parameters}
    dist.wrap(reference, d, trainable=False, **wrap)  # before the optimizer: FSDP2 replaces
    dist.wrap(policy, d, **wrap)  # parameters by DTensors
    params = list(policy.trainable_parameters())
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    s = State(cfg, run_dir, device, policy, params, opt, sched, scoring.reward_set(cfg), judge,
              *prompts,  # a logger that writes nothing until _open_run_dir
              RunLogger(run_dir, tensorboard=False, enabled=False), dist=d,
              prompts_per_rank=prompts_per_rank, param_names=param_names, spec=resolve(cfg),
              reference=reference)
    if cfg.train.ema_decay > 0:
        s.ema = [p.detach().clone() for p in params]
    return s


def _trained(s: State) -> ckpt.Trained:
    """The parts of ``s`` a checkpoint holds."""
    return ckpt.Trained(module_of(s.policy), s.optimizer, s.scheduler, s.params, s.param_names,
                        s.ema, s.device)


def _save(s: State) -> None:
    """Checkpoint the finished iteration ``s.iteration`` (format: `branchgrpo.checkpoint`)."""
    meta = {"elapsed": s.elapsed, "metrics_lines": s.logger.lines(), "config": to_yaml(s.cfg),
            "extra": s.extra, "world": s.dist.world}
    ckpt.save(s.run_dir, s.iteration, _trained(s), meta, s.cfg.log.keep_last, s.dist)


def _restore(s: State, path: Path) -> dict:
    """Resume ``s`` from the checkpoint at ``path``: weights, optimizer, EMA, LR schedule, RNG,
    iteration, training clock and ``extra``. Returns the checkpoint's metadata."""
    st = ckpt.restore(path, _trained(s), s.dist)
    s.iteration, s.elapsed, s.extra = st["iteration"], st["elapsed"], st["extra"]
    return st


def _open_run_dir(s: State, restored: dict | None) -> None:
    """Write the run directory (rank 0), only now that the policy is built and a resumed
    checkpoint has loaded: ``config.yaml``, ``plan.json`` (`plan_report`), ``metrics.jsonl``
    cut back to the checkpoint."""
    if s.dist.main:
        s.run_dir.mkdir(parents=True, exist_ok=True)
        (s.run_dir / "config.yaml").write_text(to_yaml(s.cfg))
        (s.run_dir / "plan.json").write_text(json.dumps(plan_report(s.cfg), indent=1) + "\n")
    wandb = s.cfg.log.wandb_project if s.cfg.log.wandb else None
    s.logger = RunLogger(s.run_dir, s.cfg.log.tensorboard, enabled=s.dist.main,
                         wandb_project=wandb, config=asdict(s.cfg))
    if restored is not None:
        s.logger.truncate(restored["metrics_lines"])


def run_eval(s: State, tag: str) -> dict[str, float]:
    """Held-out evaluation (with EMA weights when enabled), logged and gridded."""
    cfg = s.cfg
    plan = s.spec.build_plan()
    n = cfg.data.eval_samples
    prompts = [s.eval_prompts[i % len(s.eval_prompts)] for i in range(n)]
    scorers = {"judge": s.judge} if s.judge is not None else {}
    scorers |= {k: s.rewards.rewards[k] for k in s.rewards.rewards}
    with _ema_weights(s), _autocast(s):
        try:
            metrics, media = evaluate(s.policy, prompts, torch.tensor(plan.sigmas), scorers,
                                      seed=cfg.train.seed + 10_000,
                                      max_batch=cfg.rollout.max_batch, device=s.device)
        except RewardError as e:
            raise TrainingStopped(f"held-out evaluation {tag!r}: {e}") from None
    if s.dist.main:  # every rank evaluates (FSDP forwards are collective), rank 0 writes
        save_grid(media, prompts, s.run_dir / "samples" / f"{tag}.png", title=tag)
        s.logger.images(s.iteration, {f"samples/{tag}": s.run_dir / "samples" / f"{tag}.png"})
    s.extra["last_eval_elapsed"] = s.elapsed
    s.logger.log(s.iteration, {"eval/tag": tag, "time/elapsed": s.elapsed, **metrics})
    _warn_grid(s, metrics.get("eval/grid"), tag)
    return metrics


def _warn_grid(s: State, grid: float | None, tag: str) -> None:
    """Print `grid_warning` for this evaluation; the first evaluation sets the base value."""
    if grid is None:
        return
    message = grid_warning(grid, s.extra.setdefault("grid_before", grid), tag)
    if s.dist.main and message:
        print(message, file=sys.stderr)


# ----------------------------------------------------------------------------- helpers
def _prompt_batch(s: State) -> tuple[list[str], int]:
    """This rank's prompts and the global index of its first: data-parallel rank r of D (a
    sequence-parallel group is one) takes [r P, (r + 1) P) of one draw of D x P prompts."""
    g = seeded(s.cfg.train.seed, s.iteration, "prompts")
    p = s.prompts_per_rank
    idx = torch.randint(0, len(s.train_prompts), (s.dist.dp_world * p,), generator=g)
    first = s.dist.dp_rank * p
    return [s.train_prompts[i] for i in idx[first:first + p].tolist()], first


def _rollout(s: State, cond: dict, plan: RolloutPlan, first: int) -> Tree:
    """The trees of this rank. ``dist.noise=rank``: one batched rollout from a generator
    seeded by (seed, iteration, rank). ``dist.noise=prompt``: one rollout per tree, seeded by
    its global prompt index, so a tree does not depend on how prompts are spread over ranks
    (at the cost of batching across trees)."""
    cfg, it = s.cfg, s.iteration
    kw = {"max_batch": cfg.rollout.max_batch, "device": s.device,
          "storage_dtype": DTYPES[cfg.model.storage_dtype], "keep_mean": cfg.train.ratio == "guard"}
    if cfg.dist.noise == "rank":
        return rollout(s.policy, cond, plan,
                       generator=seeded(cfg.train.seed, it, s.purpose("rollout"), s.device), **kw)
    trees = []
    for j in range(s.prompts_per_rank):
        one = select_cond(cond, torch.tensor([j]))
        gen = seeded(cfg.train.seed, it, f"rollout/prompt{first + j}", s.device)
        trees.append(rollout(s.policy, one, plan, generator=gen, **kw))
    return _cat_trees(trees)


def _cat_trees(trees: list[Tree]) -> Tree:
    """One `Tree` of several (tree k becomes group k; parents shifted by the nodes before)."""
    if len(trees) == 1:
        return trees[0]
    cols: dict[str, list[Tensor]] = {}
    offset = 0
    for k, t in enumerate(trees):
        for f in fields(Tree):
            v = getattr(t, f.name)
            if isinstance(v, Tensor) and f.name != "sigmas":
                if f.name == "parent":
                    v = torch.where(v >= 0, v + offset, v)
                elif f.name == "group":
                    v = v + k
                cols.setdefault(f.name, []).append(v)
        offset += t.num_nodes
    return replace(trees[0], forwards=sum(t.forwards for t in trees),
                   **{k: torch.cat(v) for k, v in cols.items()})


def _global_kw(s: State, rule: str, scores: dict[str, Tensor]) -> dict[str, float]:
    """Statistics an advantage rule needs from every rank: Flow-GRPO's batch std of the
    (combined) leaf reward over all ranks. Empty for one process and for per-tree rules."""
    if not s.dist.enabled or rule != "prompt_global_std":
        return {}
    w = s.cfg.reward.weights
    r = (sum(w[k] * v.double() for k, v in scores.items())
         if s.cfg.advantage.combine == "reward_sum" else next(iter(scores.values())))
    return {"global_std": dist.global_std(s.dist, r)}


def _lr_lambda(cfg: Config):
    total, warm = cfg.train.iterations, cfg.train.warmup_iterations

    def f(step: int) -> float:
        w = min(1.0, (step + 1) / warm) if warm else 1.0
        frac = step / max(total, 1)
        decay = {"constant": 1.0, "linear": 1 - frac,
                 "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[cfg.train.lr_schedule]
        return w * decay

    return f


def _device(cfg: Config) -> torch.device:
    """The device of this process (cuda: the local rank's GPU, set in `setup`)."""
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def _new_run_dir(cfg: Config) -> Path:
    if cfg.log.run_dir:
        return Path(cfg.log.run_dir)
    return Path("runs") / f"{cfg.rollout.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def _autocast(s: State):
    if s.cfg.train.amp == "none":
        return nullcontext()
    return torch.autocast(s.device.type, dtype=DTYPES[s.cfg.train.amp])


class _ema_weights:
    """Swap EMA weights in for evaluation (no-op without EMA)."""

    def __init__(self, s: State) -> None:
        self.s = s
        self.saved: list[torch.Tensor] = []

    def __enter__(self) -> None:
        if self.s.ema is not None:
            self.saved = [p.detach().clone() for p in self.s.params]
            with torch.no_grad():
                for p, e in zip(self.s.params, self.s.ema, strict=True):
                    p.copy_(e)

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for p, v in zip(self.s.params, self.saved, strict=False):
                p.copy_(v)


def _progress(s: State):
    from tqdm import tqdm

    return tqdm(total=s.cfg.train.iterations, initial=s.iteration, desc="training",
                disable=not (s.cfg.log.progress and s.dist.main), dynamic_ncols=True)


__all__ = ["train", "TrainingStopped"]

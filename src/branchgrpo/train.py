"""THE recipe: rollout -> decode -> reward -> advantages -> edge selection -> update -> log.

Readable top to bottom. Every phase is timed (``time/<phase>``). Every source of randomness
is a generator seeded from (seed, iteration, purpose), so a resumed run draws exactly the
noise, prompts and shuffles the uninterrupted run would have drawn.

How this differs from the published scripts (ALGORITHMS.md 13): one batched tree engine for
every method; the optimizer cadence is ``train.updates_per_rollout`` (not a by-product of
gradient accumulation over edges); split noise lambda defaults to 1 and is scored with the
std actually sampled with; rollout latents are round-tripped through their storage dtype
before scoring, so ``ratio/first`` is exactly 1; and resume works.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .advantages import RewardValueError, compute_advantages, zero_std_fraction
from .config import Config, advantage_kw, clip_eps, plan_params, resolved_rules, to_yaml
from .evaluate import evaluate, group_diversity, image_stats, save_grid
from .log import RunLogger, Timer
from .losses import guard_log_ratio, kl_v, kl_x, policy_loss
from .methods import METHODS
from .models.factory import build_policy, load_prompts
from .models.families import module_of
from .plans import build_plan
from .pruning import select_edges
from .rewards import RewardError, RewardSet
from .tree import EdgeBatch, RolloutPlan, Tree, edge_log_prob, rollout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


# ----------------------------------------------------------------------------- the loop
def train(cfg: Config, resume: Path | None = None) -> Path:
    """Run (or resume) a training run; returns the run directory."""
    s = setup(cfg, resume)
    t_start = time.perf_counter() - s.elapsed
    if s.iteration == 0:
        run_eval(s, "before")
    bar = _progress(s)
    try:
        while s.iteration < cfg.train.iterations:
            metrics = iteration(s)
            s.iteration += 1
            s.elapsed = time.perf_counter() - t_start
            metrics["time/elapsed"] = s.elapsed
            s.logger.log(s.iteration, metrics)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/total']:.3f}",
                            sec=f"{metrics['time/iteration']:.1f}")
            if cfg.log.eval_every and s.iteration % cfg.log.eval_every == 0 \
                    and s.iteration < cfg.train.iterations:
                run_eval(s, f"iter_{s.iteration:04d}")
            if s.iteration % cfg.log.checkpoint_every == 0 or s.iteration == cfg.train.iterations:
                save(s)
    finally:
        bar.close()
    run_eval(s, "after")
    s.logger.close()
    from .report import write_report

    write_report(s.run_dir)
    return s.run_dir


def iteration(s: State) -> dict[str, float]:
    """One rollout batch and its updates."""
    cfg, it, timer = s.cfg, s.iteration, Timer()
    t0 = time.perf_counter()
    method = METHODS.get(cfg.rollout.method)
    plan = build_plan(method.plan, iteration=it, **plan_params(cfg))
    prompts = _prompt_batch(s)
    rule, sel, sel_kw = resolved_rules(cfg)
    with timer("rollout"):
        cond = s.policy.encode(prompts)
        with _autocast(s):
            tree = rollout(s.policy, cond, plan, generator=seeded(cfg.train.seed, it, "rollout",
                                                                  s.device),
                           max_batch=cfg.rollout.max_batch, device=s.device,
                           storage_dtype=DTYPES[cfg.model.storage_dtype],
                           keep_mean=cfg.train.ratio == "guard")
    with timer("decode"), torch.no_grad():
        media = torch.cat([s.policy.decode(c) for c in tree.leaf_x0.split(cfg.reward.batch_size)])
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
                                     **advantage_kw(cfg, rule))
        except RewardValueError as e:
            raise TrainingStopped(f"iteration {it + 1}: {e}") from None
    with timer("select"):
        pruning = it < cfg.selection.until * cfg.train.iterations
        name, kw = (sel, sel_kw) if pruning else ("all", {})
        mask = select_edges(tree, adv, name, iteration=it,
                            generator=seeded(cfg.train.seed, it, "select"), **kw)
        edges = tree.edges(mask.to(tree.parent.device), adv.to(tree.parent.device))
    with timer("update"):
        stats = update(s, edges, cond, plan)
    total = sum(cfg.reward.weights[k] * v.float() for k, v in scores.items())
    out = {f"reward/{k}": float(v.float().mean()) for k, v in scores.items()}
    out |= {"reward/total": float(total.mean()), "reward/zero_std_frac":
            zero_std_fraction(tree, total), "monitor/diversity": group_diversity(media, group),
            **image_stats(media), "tree/forwards": tree.forwards, "tree/nodes": tree.num_nodes,
            "tree/edges": int(tree.edge_mask.sum()), "tree/trained_edges": len(edges),
            "lr": s.scheduler.get_last_lr()[0], **stats, **timer.times}
    out["time/iteration"] = time.perf_counter() - t0
    return out


def update(s: State, edges: EdgeBatch, cond: dict, plan: RolloutPlan) -> dict[str, float]:
    """``updates_per_rollout`` optimizer steps over a shuffled split of the edges."""
    cfg = s.cfg
    n = len(edges)
    if n < cfg.train.updates_per_rollout:
        raise TrainingStopped(f"{n} trained edges < train.updates_per_rollout="
                              f"{cfg.train.updates_per_rollout}")
    perm = torch.randperm(n, generator=seeded(cfg.train.seed, s.iteration, "shuffle"))
    agg: dict[str, list[float]] = {}
    for u, mb in enumerate(perm.tensor_split(cfg.train.updates_per_rollout)):
        s.optimizer.zero_grad(set_to_none=True)
        for c, chunk in enumerate(mb.split(cfg.train.edge_chunk)):
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
    if cfg.train.kl_coef > 0:
        with torch.no_grad(), _autocast(s):
            _, ref_mean, _, ref_v = edge_log_prob(s.reference, e, cond, plan,
                                                  max_batch=cfg.rollout.max_batch)
        kl = kl_x(mean, ref_mean) if cfg.train.kl_kind == "x" else kl_v(v, ref_v)
    loss, st = policy_loss(lp, e.old_log_prob, e.adv, clip_eps(cfg), step=e.step,
                           log_ratio=log_ratio, kl=kl, kl_coef=cfg.train.kl_coef)
    if not torch.isfinite(loss):
        raise TrainingStopped(f"iteration {s.iteration + 1}: non-finite loss "
                              f"{loss.item()}; lower train.lr or train.max_grad_norm")
    (loss * weight).backward()
    return st


def _clip_and_step(s: State) -> float:
    cfg = s.cfg
    norm = torch.nn.utils.clip_grad_norm_(s.params, cfg.train.max_grad_norm or math.inf)
    s.optimizer.step()
    if s.ema is not None:
        with torch.no_grad():
            for e, p in zip(s.ema, s.params, strict=True):
                e.lerp_(p.detach(), 1 - cfg.train.ema_decay)
    return float(norm)


# ----------------------------------------------------------------------------- set-up
def setup(cfg: Config, resume: Path | None) -> State:
    """Build everything; restore the newest checkpoint when resuming."""
    device = _device(cfg)
    run_dir = Path(resume) if resume else _new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(cfg.train.seed)
    policy = build_policy(cfg, device, progress=cfg.log.progress)
    params = [p for p in policy.trainable_parameters()]
    keep = {id(p) for p in params}
    for p in module_of(policy).parameters():
        p.requires_grad_(id(p) in keep)
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    train_prompts, eval_prompts = load_prompts(cfg)
    scorers = RewardSet(dict(cfg.reward.weights), dict(cfg.reward.options),
                        batch_size=cfg.reward.batch_size)
    s = State(cfg, run_dir, device, policy, params, opt, sched, scorers, _judge(cfg),
              train_prompts, eval_prompts, RunLogger(run_dir, cfg.log.tensorboard))
    if cfg.train.ema_decay > 0:
        s.ema = [p.detach().clone() for p in params]
    if cfg.train.kl_coef > 0:
        s.reference = copy.deepcopy(policy).requires_grad_(False)
    if resume:
        _restore(s)
    print(f"run directory: {run_dir}\n{to_yaml(cfg)}", flush=True)
    return s


def save(s: State) -> Path:
    state = {"iteration": s.iteration, "elapsed": s.elapsed,
             "policy": ckpt.trainable_state(module_of(s.policy)),
             "optimizer": s.optimizer.state_dict(),
             "scheduler": s.scheduler.state_dict(), "rng": ckpt.rng_state(),
             "ema": None if s.ema is None else [e.cpu() for e in s.ema],
             "metrics_lines": s.logger.lines(), "config": to_yaml(s.cfg), "extra": s.extra}
    return ckpt.save_checkpoint(s.run_dir, s.iteration, state, s.cfg.log.keep_last)


def _restore(s: State) -> None:
    path = ckpt.latest_checkpoint(s.run_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {s.run_dir}/checkpoints to resume from")
    st = ckpt.load_checkpoint(path)
    ckpt.load_trainable_state(module_of(s.policy), st["policy"])
    s.optimizer.load_state_dict(st["optimizer"])
    s.scheduler.load_state_dict(st["scheduler"])
    ckpt.set_rng_state(st["rng"])
    if st["ema"] is not None and s.ema is not None:
        s.ema = [e.to(s.device) for e in st["ema"]]
    s.iteration, s.elapsed, s.extra = st["iteration"], st["elapsed"], st["extra"]
    s.logger.truncate(st["metrics_lines"])
    print(f"resumed from {path} at iteration {s.iteration}", flush=True)


def run_eval(s: State, tag: str) -> dict[str, float]:
    """Held-out evaluation (with EMA weights when enabled), logged and gridded."""
    cfg = s.cfg
    plan = build_plan(METHODS.get(cfg.rollout.method).plan, **plan_params(cfg))
    n = cfg.data.eval_samples
    prompts = [s.eval_prompts[i % len(s.eval_prompts)] for i in range(n)]
    scorers = {"judge": s.judge} if s.judge is not None else {}
    scorers |= {k: s.rewards.rewards[k] for k in s.rewards.rewards}
    with _ema_weights(s), _autocast(s):
        metrics, media = evaluate(s.policy, prompts, torch.tensor(plan.sigmas), scorers,
                                  seed=cfg.train.seed + 10_000, max_batch=cfg.rollout.max_batch,
                                  device=s.device)
    save_grid(media, prompts, s.run_dir / "samples" / f"{tag}.png", title=tag)
    s.logger.log(s.iteration, {"eval/tag": tag, **metrics})
    return metrics


# ----------------------------------------------------------------------------- helpers
def _prompt_batch(s: State) -> list[str]:
    g = seeded(s.cfg.train.seed, s.iteration, "prompts")
    idx = torch.randint(0, len(s.train_prompts), (s.cfg.train.prompts_per_iteration,),
                        generator=g)
    return [s.train_prompts[i] for i in idx.tolist()]


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


def _judge(cfg: Config):
    if not cfg.reward.judge:
        return None
    if cfg.reward.judge == "judge":
        from .tasks.shapes_reward import ShapesJudge

        return ShapesJudge.cached(Path(cfg.model.cache_dir).expanduser(), cfg.log.progress)
    from .rewards import build_reward

    return build_reward(cfg.reward.judge)


def _progress(s: State):
    from tqdm import tqdm

    return tqdm(total=s.cfg.train.iterations, initial=s.iteration, desc="training",
                disable=not s.cfg.log.progress, dynamic_ncols=True)


__all__ = ["train", "TrainingStopped", "Tree"]

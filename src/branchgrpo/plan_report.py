"""``branchgrpo plan``: the resolved run, before any weights load.

`plan_report` is one JSON-ready dict: the method, kernel and level; the sigma grid [T + 1]
and the transformer's timesteps [T]; guidance; each step's branch factor and solvers; the
forwards, edges, trained edges and leaves of one tree (the plan's own count and the analytic
dry run that `branchgrpo.preflight` runs), per rank and per iteration; the batch geometry over
``WORLD_SIZE`` ranks (a sequence-parallel group of ranks counts as one); the dtype of each
module group; and the estimated peak memory per rank and compute cost of an iteration
(``"memory"``, ``"cost"``: `branchgrpo.memory`). ``branchgrpo train`` writes the same object
to ``RUN/plan.json``.
"""

from __future__ import annotations

import os
from typing import Any

from .config import Config, prompts_per_rank
from .memory import DEFAULT_TFLOPS, summary
from .spec import RunSpec, family_class, kl_coef

PER_TREE = ("forwards", "nodes", "edges", "trained_edges", "leaves")


def plan_report(cfg: Config, spec: RunSpec | None = None,
                tflops: float = DEFAULT_TFLOPS) -> dict[str, Any]:
    """The resolved run of ``cfg`` (see the module docstring); ``tflops``: the sustained
    TFLOP/s per device the cost's seconds assume. `ConfigError` on bad input."""
    from .memory import estimate
    from .preflight import check_plan, dry_run_counts

    spec = spec or check_plan(cfg)
    plan = spec.build_plan()
    counts = dry_run_counts(cfg, spec)
    counts["nodes"], counts["leaves"] = plan.size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    groups = max(1, world // cfg.dist.sequence_parallel)  # data-parallel ranks
    per_rank = prompts_per_rank(cfg, groups)
    t = cfg.train
    return {
        "method": spec.method, "plan": spec.plan, "family": spec.family,
        "model": cfg.model.path or "tiny (embedded default)", "model_config": spec.model_source,
        "schedule": spec.schedule, "schedule_rule": spec.rule, "shift": spec.shift,
        "mu": spec.mu, "image_seq_len": spec.image_seq_len, "num_steps": len(spec.sigmas) - 1,
        "sigmas": list(spec.sigmas), "timesteps": list(spec.timesteps),
        "quantize_timestep": spec.quantize_timestep, "kernel": spec.kernel, "level": spec.level,
        "kl_coef": kl_coef(cfg),
        "guidance": _guidance(cfg, spec), "steps": _steps(plan),
        **{k: counts[k] for k in PER_TREE},
        "per_rank": {k: counts[k] * per_rank for k in PER_TREE},
        "per_iteration": {k: counts[k] * per_rank * groups for k in PER_TREE},
        "batch": {"world_size": world, "sequence_parallel": cfg.dist.sequence_parallel,
                  "prompts_per_rank": per_rank, "prompts_per_iteration": per_rank * groups,
                  "updates_per_rollout": t.updates_per_rollout,
                  "trained_edges_per_update": counts["trained_edges"] * per_rank
                  / t.updates_per_rollout,
                  "edge_chunk": t.edge_chunk, "max_batch": cfg.rollout.max_batch},
        "dtypes": _dtypes(cfg), "notes": list(spec.notes),
        **estimate(cfg, counts, world, per_rank, tflops),
    }


def _steps(plan: Any) -> list[dict[str, Any]]:
    """Per grid step i (sigma_i -> next): lane 0's branch factor, and the solvers of every
    lane's forks at i."""
    out = []
    for i in range(len(plan.sigmas) - 1):
        solvers: set[str] = set()
        branch = 0
        for li, lane in enumerate(plan.lanes):
            if i in lane.track[:-1]:
                forks = lane.forks[lane.track.index(i)]
                solvers |= {f.solver for f in forks}
                branch += sum(f.count for f in forks) if li == 0 else 0
        out.append({"step": i, "sigma": plan.sigmas[i], "branch": branch,
                    "solvers": sorted(solvers)})
    return out


def _guidance(cfg: Config, spec: RunSpec) -> str:
    from .spec import guidance

    fam, g = family_class(cfg.model.kind), guidance(cfg)
    if fam is None or g is None:
        return "none (tiny policy)"
    if fam.guidance_kind == "embedding":
        from .spec import distilled

        dist = distilled(cfg)
        if dist is not None and dist.guidance_free:
            return f"none ({dist.name} is distilled without guidance; model.guidance unused)"
        return f"guidance embedding {g:g}"
    if fam.guidance_kind == "true_cfg":  # Qwen-Image: model.guidance > 1 adds the negative " "
        return (f"true CFG, scale {g:g}, negative prompt ' ', rescaled to the conditional's "
                "norm (cond and uncond rows in one forward)" if g > 1
                else "off (scale <= 1: the pipeline's default, no negative prompt)")
    above = getattr(fam, "cfg_above", 1.0)  # Z-Image: on for any scale > 0
    return (f"classifier-free, scale {g:g} (cond and uncond rows in one forward)" if g > above
            else f"off (scale <= {above:g})")


def _dtypes(cfg: Config) -> dict[str, str]:
    """The dtype of each module group as `branchgrpo.models.factory.build_policy` loads it."""
    m = cfg.model
    math = {"step math": "fp32", "rollout latents": m.storage_dtype,
            "autocast": cfg.train.amp}
    fam = family_class(m.kind)
    if fam is None:
        return {"policy": "fp32", **math}
    out = {"transformer compute": m.dtype,
           "transformer weights": "fp32 (master)" if m.finetune == "full" else m.dtype,
           "text encoders": m.dtype, "vae": "fp32" if "vae" in fam.fp32_modules else m.dtype}
    if m.finetune == "lora":
        out["lora adapters"] = "fp32"
    if m.quantize != "none":  # model.quantize: torchao weight-only linear layers
        out["transformer weights"] = f"{m.quantize} linear layers, {m.dtype} the rest"
    if m.offload_encoders or m.free_encoders:
        out["text encoders"] += (" (freed once every prompt is encoded)" if m.free_encoders
                                 else " (on the CPU between encodes)")
    if m.prompt_embeddings:
        out["text encoders"] = f"not loaded (model.prompt_embeddings, {m.dtype} rows)"
    if m.dtype != "fp32" and (keep := _fp32_modules(fam.transformer_class)):
        out["transformer fp32 modules"] = ", ".join(keep)
    return {**out, **math}


def _fp32_modules(transformer_class: str) -> list[str]:
    """The ``_keep_in_fp32_modules`` of the diffusers transformer class ``transformer_class``."""
    import diffusers

    return list(getattr(diffusers, transformer_class)._keep_in_fp32_modules or [])


def format_report(r: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    f6 = lambda xs: "[" + ", ".join(f"{x:.6g}" for x in xs) + "]"  # noqa: E731
    lines = [
        f"method {r['method']} (plan {r['plan']}), model {r['model']} [{r['family']}]",
        f"model config: {r['model_config']}",
        f"schedule: {r['schedule']} ({r['schedule_rule']}); shift {r['shift']}, mu {r['mu']}, "
        f"image tokens {r['image_seq_len']}",
        f"sigmas [{r['num_steps'] + 1}]: {f6(r['sigmas'])}",
        f"timesteps [{r['num_steps']}]{' (quantised)' if r['quantize_timestep'] else ''}: "
        f"{f6(r['timesteps'])}",
        f"kernel {r['kernel']}, level {r['level']:g}; KL coefficient {r['kl_coef']:g}; "
        f"guidance: {r['guidance']}",
        "steps (branch x solvers): " + "  ".join(
            f"{s['step']}:{s['branch']}x{'/'.join(s['solvers'])}" for s in r["steps"]),
        "                 " + "  ".join(f"{k:>13}" for k in PER_TREE),
    ]
    for name, row in (("per tree", r), ("per rank", r["per_rank"]),
                      ("per iteration", r["per_iteration"])):
        lines.append(f"{name:>16} " + "  ".join(f"{row[k]:>13,}" for k in PER_TREE))
    b = r["batch"]
    sp = b.get("sequence_parallel", 1)
    ranks = (f"{b['world_size']} rank(s)" if sp == 1 else
             f"{b['world_size'] // sp} sequence-parallel group(s) of {sp} ranks")
    lines.append(f"batch: {ranks} x {b['prompts_per_rank']} prompts = "
                 f"{b['prompts_per_iteration']} per iteration; {b['updates_per_rollout']} "
                 f"update(s) per rollout ({b['trained_edges_per_update']:g} edges each per "
                 f"rank, chunks of {b['edge_chunk']}); {b['max_batch']} rows per forward")
    lines.append("dtypes: " + "; ".join(f"{k} {v}" for k, v in r["dtypes"].items()))
    lines.append(summary(r["memory"], r["cost"]))
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)

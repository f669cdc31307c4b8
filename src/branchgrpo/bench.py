"""Benchmarks of the rollout engine: forward counts per method (``bench nfe``) and the batched
engine against per-node and sequential evaluation (``bench rollout``).

Numbers are measured, not derived: ``nfe`` runs each method's plan through the real engine on
the analytic policy and counts model rows, edges and the edges its selection trains.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .engine.advantages import compute_advantages
from .engine.methods import METHODS
from .engine.plans import build_plan
from .engine.pruning import select_edges
from .engine.tree import chain_plan, rollout
from .models.analytic import GaussianPolicy


def machine() -> dict[str, Any]:
    """CPU model, cores, torch version and threads, accelerator."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}


def nfe_table(methods: list[str] | None = None, seed: int = 0) -> list[dict]:
    """Per method, for one tree (one prompt) of its default plan: forwards, edges, trained
    edges, leaves, and the per-leaf ratios."""
    policy = GaussianPolicy(dim=4)
    cond = policy.encode(["a prompt"])
    rows = []
    for name in methods or METHODS.names():
        m = METHODS.get(name)
        plan = build_plan(m.plan, **m.plan_kw)
        tree = rollout(policy, cond, plan, generator=torch.Generator().manual_seed(seed))
        reward = tree.leaf_x0.float().sum(1)
        adv = compute_advantages(tree, {"r": reward}, m.advantage, **m.advantage_kw)
        mask = select_edges(tree, adv, m.selection, generator=torch.Generator().manual_seed(seed),
                            **m.selection_kw)
        leaves = int(tree.leaf.sum())
        rows.append({
            "method": name, "plan": plan.name, "steps": plan.num_steps,
            "forwards": tree.forwards, "edges": int(tree.edge_mask.sum()),
            "trained_edges": int(mask.sum()), "leaves": leaves,
            "forwards_per_leaf": round(tree.forwards / leaves, 4),
            "trained_per_leaf": round(int(mask.sum()) / leaves, 4),
        })
    return rows


def markdown(rows: list[dict]) -> str:
    """Rows of dicts as a Markdown table."""
    if not rows:
        return ""
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(out)


@dataclass
class Timing:
    name: str
    seconds: float
    forwards: int


def _best_of(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    best, fw = float("inf"), 0
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fw = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, fw


def rollout_timings(policy, cond, *, trees: int, max_batch: int = 256, repeats: int = 3,
                    seed: int = 0, storage_dtype: torch.dtype = torch.float32,
                    branch_kw: dict | None = None, dance_kw: dict | None = None) -> list[Timing]:
    """Wall time per BranchGRPO tree: batched frontier vs per-node (batch 1, as the published
    BranchGRPO), and the sequential DanceGRPO rollout (each sample alone, batch 1) on the same
    policy. ``cond`` has one row per tree. The best of ``repeats`` runs after one warm-up."""
    bplan = build_plan("branch", **(branch_kw or {}))
    dplan = build_plan("dance", **(dance_kw or {}))
    gen = lambda: torch.Generator(device=next(iter(cond.values())).device).manual_seed(seed)  # noqa: E731

    def run(plan, mb: int) -> int:
        return rollout(policy, cond, plan, generator=gen(), max_batch=mb,
                       storage_dtype=storage_dtype).forwards

    def sequential_dance() -> int:
        # DanceGRPO generates one sample at a time: G chains of T forwards at batch 1 per tree
        chain = chain_plan("sequential", dplan.sigmas, [1] * dplan.num_steps,
                           ["sde"] * dplan.num_steps, kernel=dplan.kernel, level=dplan.level)
        fw = 0
        for row in range(trees):
            one = {k: v[row:row + 1] for k, v in cond.items()}
            for _ in range(dplan.info["group_size"]):
                fw += rollout(policy, one, chain, generator=gen(), max_batch=1,
                              storage_dtype=storage_dtype).forwards
        return fw

    run(bplan, max_batch)  # warm-up
    out = []
    for name, fn in [("branch_batched", lambda: run(bplan, max_batch)),
                     ("branch_per_node", lambda: run(bplan, 1)),
                     ("dance_batched", lambda: run(dplan, max_batch)),
                     ("dance_sequential", sequential_dance)]:
        sec, fw = _best_of(fn, repeats)
        out.append(Timing(name, sec / trees, fw // trees))
    return out


def bench_policy(model: str, trees: int, device: torch.device):
    """(policy, cond) for the benchmarks: ``tiny`` (the embedded default's architecture,
    random weights), ``analytic``, or ``flux-dev`` (the FLUX.1-dev transformer with random bf16
    weights at 512x512, LoRA rank 32, gradient checkpointing; no text encoders or VAE)."""
    from .tasks.shapes import all_specs

    prompts = [all_specs()[i % 64].prompt for i in range(trees)]
    if model == "tiny":
        from .models.tiny import TinyFluxPolicy

        policy = TinyFluxPolicy().to(device).eval()
    elif model == "analytic":
        policy = GaussianPolicy(dim=48).to(device)
    elif model == "flux-dev":
        from diffusers import FluxTransformer2DModel

        from .models.flux import FluxPolicy, flux_dev_config
        from .models.lora import LoraSpec

        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN attention backward fails (cu130)
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                tr = FluxTransformer2DModel(**flux_dev_config())
        finally:
            torch.set_default_dtype(torch.float32)
        policy = FluxPolicy.from_transformer(tr, 512, 512, dtype=torch.bfloat16, device=device,
                                             lora=LoraSpec(rank=32, alpha=64),
                                             gradient_checkpointing=True)
    else:
        raise ValueError(f"unknown bench model {model!r}; use tiny, analytic or flux-dev")
    return policy, policy.encode(prompts), prompts

"""torch.distributed for the recipe: init from torchrun's environment, DDP and FSDP2 wrapping,
collectives for logging and global statistics, and a cross-rank sync check.

Layout: every rank holds whole trees (one prompt = one tree = one group), so group statistics
stay local; only Flow-GRPO's ``prompt_global_std`` needs a gather (`global_std`). Gradients
are averaged across ranks by DDP (replicated weights) or FSDP2 (sharded weights, reduce-scatter);
each rank averages its loss over its own edges, so with equal edge counts per rank the mean
over ranks is the global mean. Single-process runs never touch torch.distributed.

Every function takes plain values (a `Dist`, tensors, flags), not the run's Config: the
recipe reads the config (`branchgrpo.spec.strategy_of`, `branchgrpo.preflight.check_geometry`)
and passes what this module needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as td
from torch import nn


@dataclass(frozen=True)
class Dist:
    """This process's place: ``rank`` of ``world`` (``local_rank`` on its node), ``strategy``
    (none for one process, ddp or fsdp), ``sp`` ranks per sequence-parallel group (1: off;
    the groups are runs of ``sp`` consecutive ranks, `branchgrpo.sequence_parallel`)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"
    sp: int = 1

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: its sequence-parallel group (the rank when sp=1).
        The ranks of one group draw the same prompts and noise and run each forward together."""
        return self.rank // self.sp

    @property
    def dp_world(self) -> int:
        """Data-parallel ranks: the number of sequence-parallel groups."""
        return self.world // self.sp

    @property
    def layout(self) -> str:
        """E.g. "4 ranks, ddp, sequence parallel 2 (2 groups)"."""
        sp = f", sequence parallel {self.sp} ({self.dp_world} groups)" if self.sp > 1 else ""
        return f"{self.world} ranks, {self.strategy}{sp}"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the only rank that writes logs, plots, reports and the config."""
        return self.rank == 0


def env_world() -> int:
    """WORLD_SIZE set by torchrun (1 when launched without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: torch.device, *, strategy: str, backend: str = "auto",
         timeout_minutes: float = 30, sequence_parallel: int = 1) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (env://) and return this process's place and
    device (on CUDA: the local rank's GPU); a no-op for one process. ``strategy``: ddp or
    fsdp; backend auto: nccl on CUDA, gloo on CPU; ``sequence_parallel``: ranks per
    sequence-parallel group (must divide the world size)."""
    world = env_world()
    if world % sequence_parallel:
        fits = [r for r in range(1, world + 1) if world % r == 0]
        raise ValueError(f"dist.sequence_parallel={sequence_parallel} does not divide the "
                         f"{world} ranks (WORLD_SIZE): use one of {fits}")
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not td.is_initialized():
        td.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return Dist(rank, world, local, strategy, sequence_parallel), device


def close(d: Dist) -> None:
    if d.enabled and td.is_initialized():
        td.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        td.barrier()


@contextmanager
def main_first(d: Dist) -> Iterator[None]:
    """Rank 0 runs the block before the other ranks (e.g. it fills the model caches they then
    read); one process: just the block."""
    if d.enabled and not d.main:
        td.barrier()
    yield
    if d.enabled and d.main:
        td.barrier()


def print0(d: Dist, *lines: str) -> None:
    """Print on rank 0 only (flushed, so torchrun's interleaved logs stay in order)."""
    if d.main:
        print(*lines, sep="\n", flush=True)


def broadcast(d: Dist, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the run directory name)."""
    if not d.enabled:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- wrapping
def wrap(policy: Any, d: Dist, *, trainable: bool = True, bf16: bool = False,
         cpu_offload: bool = False, find_unused_parameters: bool = False) -> None:
    """Wrap ``policy.transformer`` in place: DDP (replicated, gradients all-reduced) or FSDP2
    (``fully_shard`` each transformer block, then the transformer; ``bf16``: bf16 parameters,
    fp32 gradient reduction; ``cpu_offload``: parameters on the CPU between uses). The frozen
    text encoder and VAE stay outside, so DDP sees only trained weights. ``trainable=False``
    (the KL reference): FSDP shards it too, DDP leaves it as is (it has no gradients). A no-op
    for one process or ``policy`` None. Under sequence parallelism (``d.sp`` > 1) the
    transformer's token sequence is split over each group first
    (`branchgrpo.sequence_parallel.enable`), the frozen reference's too."""
    if policy is None or not d.enabled:
        return
    if d.sp > 1:
        from .sequence_parallel import enable

        enable(policy, d)
    if d.strategy == "ddp" and not trainable:
        return
    inner = getattr(policy, "transformer", None)
    if not isinstance(inner, nn.Module):
        raise ValueError(f"{type(policy).__name__} has no .transformer module to wrap for "
                         f"dist.strategy={d.strategy}")
    if d.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = [d.local_rank] if next(inner.parameters()).is_cuda else None
        # a quantized frozen base (model.quantize) is the same file on every rank, and its
        # tensor subclasses cannot be broadcast: DDP's start-up sync skips it
        DDP._set_params_and_buffers_to_ignore_for_model(inner, [
            n for n, t in [*inner.named_parameters(), *inner.named_buffers()]
            if type(t.data) is not torch.Tensor and not t.requires_grad])
        # a mixture of experts (Wan2.2 A14B's WanExperts) runs one expert per forward
        policy.transformer = DDP(inner, device_ids=dev, forward_sync_buffers=False,
                                 find_unused_parameters=find_unused_parameters
                                 or hasattr(inner, "experts"))
        return
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {}
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                               reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for block in transformer_blocks(inner):
        fully_shard(block, **kw)
    fully_shard(inner, **kw)


@contextmanager
def unwrapped(policy: Any) -> Iterator[Any]:
    """``policy`` with its DDP-wrapped transformer swapped back for the inner module for the
    block (e.g. to export its LoRA through the module's own API); otherwise as it is."""
    inner = getattr(policy, "transformer", None)
    module = getattr(inner, "module", None)
    if not isinstance(module, nn.Module) or not hasattr(inner, "no_sync"):
        yield policy
        return
    policy.transformer = module
    try:
        yield policy
    finally:
        policy.transformer = inner


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: the items of the module's ModuleLists
    (diffusers: ``transformer_blocks``, ``single_transformer_blocks``, ``blocks``); those of
    each expert of a mixture (``experts()``: Wan2.2 A14B's `WanExperts`)."""
    if callable(getattr(module, "experts", None)):
        return [b for m in module.experts().values() for b in transformer_blocks(m)]
    return [b for child in module.children() if isinstance(child, nn.ModuleList) for b in child]


def no_sync(policy: Any, d: Dist, last: bool):
    """DDP: skip the gradient all-reduce on every backward but the minibatch's last one.
    FSDP reduce-scatters every backward (sharded accumulation); one process: nothing."""
    inner = getattr(policy, "transformer", None)
    if d.strategy == "ddp" and not last and hasattr(inner, "no_sync"):
        return inner.no_sync()
    return nullcontext()


# ----------------------------------------------------------------------------- collectives
def gather_cat(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` [n, ...] over ranks (equal n on every rank) -> [world n, ...]."""
    if not d.enabled:
        return t
    dev = torch.device("cuda", d.local_rank) if td.get_backend() == "nccl" else torch.device(
        "cpu")
    x = t.detach().to(dev).contiguous()
    out = [torch.empty_like(x) for _ in range(d.world)]
    td.all_gather(out, x)
    return torch.cat(out).to(t.device)


def global_std(d: Dist, leaf_reward: torch.Tensor) -> float:
    """Population std of the leaf rewards [L] of every rank (Flow-GRPO's batch std)."""
    return float(gather_cat(d, leaf_reward.double().cpu()).std(unbiased=False))


def mean_metrics(d: Dist, metrics: dict[str, Any]) -> dict[str, Any]:
    """Per-key mean over ranks of the numeric metrics (rank 0 logs the result)."""
    if not d.enabled:
        return metrics
    rows: list[dict[str, Any]] = [{} for _ in range(d.world)]
    td.all_gather_object(rows, metrics)
    out = dict(metrics)
    for k, v in metrics.items():
        vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and vals:
            out[k] = sum(vals) / len(vals)
    return out


def same_work(d: Dist, counts: list[int]) -> bool:
    """Whether ranks with per-rank work ``counts`` can step together: FSDP needs the same
    forwards on every rank (its all-gathers are collective), DDP and one process do not."""
    return d.strategy != "fsdp" or len(set(counts)) == 1


def gather_int(d: Dist, value: int) -> list[int]:
    """``value`` from every rank."""
    if not d.enabled:
        return [value]
    out: list[int] = [0] * d.world
    td.all_gather_object(out, value)
    return out


def check_sync(d: Dist, params: list[torch.Tensor], iteration: int) -> None:
    """Raise when replicated (DDP) weights differ across ranks: all-gather a float64
    checksum (sum and sum of squares). FSDP shards have one owner each, nothing to compare."""
    if not d.enabled or d.strategy != "ddp":
        return
    with torch.no_grad():
        local = [p.detach().double() for p in params]
        c = (sum(float(p.sum()) for p in local), sum(float(p.square().sum()) for p in local))
    rows: list[Any] = [None] * d.world
    td.all_gather_object(rows, c)
    if any(r != rows[0] for r in rows):
        raise RuntimeError(f"iteration {iteration}: parameters differ across ranks "
                           f"(checksums {rows}); gradients are not being synchronised")

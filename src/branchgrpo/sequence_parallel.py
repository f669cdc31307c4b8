"""Ulysses sequence (context) parallelism for the video transformers (Wan): the R ranks of a
sequence-parallel group each hold 1/R of a video's tokens through the transformer blocks;
self-attention all-to-alls its Q, K, V from (all heads, S/R tokens) to (H/R heads, all S
tokens), runs SDPA over the whole sequence, and all-to-alls the output back. The output
projection's tokens are all-gathered, so every rank of the group gets the whole velocity.

This is diffusers' own context parallelism (`ContextParallelConfig(ulysses_degree=R)`, the
model's ``_cp_plan``: split the rotary tables and ``blocks.0``'s hidden states along the
sequence, gather after ``proj_out``; `TemplatedUlyssesAttention` with its backward, over
``torch.distributed._functional_collectives``). We do not call
``ModelMixin.enable_parallelism`` itself: it places each rank on device
``rank % torch.accelerator.device_count()``, a division by zero on a CPU-only machine (gloo),
and it builds a mesh over the whole world. `enable` runs its two steps (the processors'
``_parallel_config``, ``apply_context_parallel``) on a `DeviceMesh` ``(dp, ring=1, ulysses=R)``
whose ``ulysses`` rows are the groups of R consecutive ranks.

Gradients: the gather's backward keeps each rank's own slice of the (replicated) output
gradient, so the true gradient of one group's loss is the *sum* of its ranks' gradients.
`sum_groups_hook` makes DDP all-reduce the sum over every rank divided by the number of
groups (DDP's default divides by the world size): the mean over groups of each group's sum.
"""

from __future__ import annotations

from math import prod
from typing import Any

import torch.distributed as td
from torch import nn

from .config import ConfigError
from .dist import Dist

_MESHES: dict[tuple[int, int, str], Any] = {}


def mesh(d: Dist, device_type: str) -> Any:
    """The `DeviceMesh` ``(dp, ring, ulysses)`` = (world / R, 1, R) of ``d`` (built once per
    process: every rank must call this together the first time)."""
    from torch.distributed.device_mesh import init_device_mesh

    key = (d.world, d.sp, device_type)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device_type, (d.world // d.sp, 1, d.sp),
                                        mesh_dim_names=("dp", "ring", "ulysses"))
    return _MESHES[key]


def check(transformer: nn.Module, latent_shape: tuple[int, ...], sp: int) -> None:
    """Raise `ConfigError` saying what to change when ``transformer`` cannot be split R = ``sp``
    ways: it needs a ``_cp_plan`` (diffusers' context-parallel plan), heads divisible by R
    (each rank attends with H/R heads) and a token count divisible by R (latents ``[C, F, H,
    W]`` over the patch size)."""
    name = type(transformer).__name__
    if getattr(transformer, "_cp_plan", None) is None:
        raise ConfigError(f"dist.sequence_parallel={sp}: {name} has no context-parallel plan "
                         "(_cp_plan); set dist.sequence_parallel=1")
    heads = int(transformer.config.num_attention_heads)
    if heads % sp:
        fits = [r for r in range(1, heads + 1) if heads % r == 0]
        raise ConfigError(f"dist.sequence_parallel={sp} does not divide the {heads} attention "
                         f"heads of {name}: use one of {fits}")
    patch = tuple(transformer.config.patch_size)
    tokens = prod(n // p for n, p in zip(latent_shape[1:], patch, strict=True))
    if tokens % sp:
        raise ConfigError(f"dist.sequence_parallel={sp} does not divide the {tokens} video "
                         f"tokens (latents {tuple(latent_shape)}, patch {patch}): change "
                         "model.num_frames / height / width or dist.sequence_parallel")


def enable(policy: Any, d: Dist) -> None:
    """Split ``policy.transformer``'s token sequence over ``d``'s sequence-parallel groups
    (in place, before DDP wraps it); a no-op for ``d.sp`` 1 or ``policy`` None."""
    if policy is None or d.sp <= 1:
        return
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    tr = policy.transformer
    check(tr, tuple(policy.latent_shape), d.sp)
    device = next(tr.parameters()).device
    m = mesh(d, device.type)
    cp = ContextParallelConfig(ulysses_degree=d.sp, mesh=m)
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(d.rank, d.world, device, mesh=m)
    for module in tr.modules():
        proc = getattr(module, "processor", None)
        if proc is None or not hasattr(proc, "_parallel_config"):
            continue
        backend = getattr(proc, "_attention_backend", None)
        backend = (AttentionBackendName(backend) if backend is not None
                   else _AttentionBackendRegistry.get_active_backend()[0])
        if not _AttentionBackendRegistry._is_context_parallel_available(backend):
            raise ConfigError(f"dist.sequence_parallel={d.sp}: attention backend "
                             f"{backend.value} has no context-parallel kernel; set "
                             "model.attention_backend=native")
        proc._parallel_config = config
    tr._parallel_config = config
    apply_context_parallel(tr, cp, tr._cp_plan)


def sum_groups_hook(dp_world: int, bucket):  # noqa: ANN001, ANN201 (DDP checks the names)
    """DDP communication hook: all-reduce the bucket's gradients (a ``dist.GradBucket``)
    summed over every rank, divided by ``dp_world`` (the number of sequence-parallel groups);
    a future of the reduced buffer. Unannotated: DDP refuses a ``bucket`` annotation other than
    the class itself, and this module's annotations are strings."""
    buf = bucket.buffer().div_(dp_world)
    fut = td.all_reduce(buf, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def register_hook(ddp: nn.Module, d: Dist) -> None:
    """Give the DDP module ``ddp`` `sum_groups_hook` when ``d`` runs sequence parallelism."""
    if d.sp > 1:
        ddp.register_comm_hook(d.world // d.sp, sum_groups_hook)

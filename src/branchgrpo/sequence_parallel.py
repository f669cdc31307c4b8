"""Ulysses sequence (context) parallelism for the video transformers (Wan): the R ranks of a
sequence-parallel group each hold 1/R of a video's tokens through the transformer blocks;
self-attention all-to-alls its Q, K, V from (all heads, S/R tokens) to (H/R heads, all S
tokens), runs SDPA over the whole sequence, and all-to-alls the output back. The output
projection's tokens are all-gathered, so every rank of the group gets the whole velocity.

This is diffusers' own context parallelism (`ContextParallelConfig(ulysses_degree=R)`, the
model's ``_cp_plan``: split the rotary tables and ``blocks.0``'s hidden states along the
sequence; `TemplatedUlyssesAttention` with its backward, over
``torch.distributed._functional_collectives``). We do not call
``ModelMixin.enable_parallelism`` itself: it places each rank on device
``rank % torch.accelerator.device_count()``, a division by zero on a CPU-only machine (gloo),
and it builds a mesh over the whole world. `enable` runs its two steps (the processors'
``_parallel_config``, ``apply_context_parallel``) on a `DeviceMesh` ``(dp, ring=1, ulysses=R)``
whose ``ulysses`` rows are the groups of R consecutive ranks.

Gradients: the plan's output gathers (``proj_out``) are ours, `GatherTokens`, whose backward
is the all-gather's adjoint, a sum over the group (all-reduce, then this rank's slice);
diffusers' keeps only the rank's own slice of the output gradient. Every rank of a group
computes the group's loss L, so the group's objective is R L and the sum of its ranks'
gradients is R dL/dw; DDP's (or FSDP's) mean over all W ranks is then (R / W) sum over
groups = the mean over the W / R groups of their gradients, as in data parallelism without
splitting, and syncing twice (no ``no_sync``) stays idempotent.
"""

from __future__ import annotations

from math import prod
from typing import Any

import torch
import torch.distributed as td
from torch import Tensor, nn

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


def transformers(module: nn.Module) -> list[nn.Module]:
    """The diffusers transformers in ``module``: Wan2.2 A14B's two experts (`WanExperts`), or
    the module itself."""
    experts = getattr(module, "experts", None)
    return list(experts().values()) if callable(experts) else [module]


def enable(policy: Any, d: Dist) -> None:
    """Split ``policy.transformer``'s token sequence (each expert's, for Wan2.2 A14B) over
    ``d``'s sequence-parallel groups, in place, before DDP / FSDP2 wrap it (`dist.wrap` calls
    this); a no-op for ``d.sp`` 1, ``policy`` None, or a transformer already split."""
    if policy is None or d.sp <= 1:
        return
    for tr in transformers(policy.transformer):
        if getattr(tr, "_parallel_config", None) is not None:
            continue  # split already
        check(tr, tuple(policy.latent_shape), d.sp)
        _apply(tr, d)


def _apply(tr: nn.Module, d: Dist) -> None:
    """`ModelMixin.enable_parallelism`'s context-parallel steps on our mesh: the attention
    processors' ``_parallel_config`` (their backend must have a context-parallel kernel), then
    diffusers' split hooks of the model's ``_cp_plan``, and `GatherTokens` for its gathers."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import (
        ContextParallelConfig,
        ContextParallelOutput,
        ParallelConfig,
    )
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

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
    plan = dict(tr._cp_plan)
    group = m["ulysses"].get_group()
    for name, entry in tr._cp_plan.items():
        if isinstance(entry, ContextParallelOutput):
            del plan[name]
            dim = entry.gather_dim
            tr.get_submodule(name).register_forward_hook(
                lambda mod, args, out, dim=dim: GatherTokens.apply(out, dim, group))
    apply_context_parallel(tr, cp, plan)


class GatherTokens(torch.autograd.Function):
    """All-gather the token slices ``x`` [B, S/R, ...] of a group (along ``dim``) into
    [B, S, ...]; backward: the adjoint, the gradient summed over the group's ranks (all-reduce)
    and cut to this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, group: Any) -> Tensor:
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x) for _ in range(td.get_world_size(group))]
        td.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)  # reduced in place
        td.all_reduce(grad, group=ctx.group)
        size = td.get_world_size(ctx.group)
        return grad.chunk(size, ctx.dim)[td.get_rank(ctx.group)], None, None

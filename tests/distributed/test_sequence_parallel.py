"""Ulysses sequence parallelism (`branchgrpo.sequence_parallel`, applied by `dist.wrap`) on CPU
ranks (gloo; processes forked from the test, which builds each tiny policy once): the guided
velocity, the gradients and the weights after one AdamW step match one process within 1e-5,
for Wan2.1 on 2 ranks (one group of 2) and on 4 ranks (two data-parallel groups of 2, each
with its own inputs) under DDP, and under FSDP2 on 4 ranks; Wan2.2 TI2V-5B (per-token
timesteps) and A14B (two experts) on 2 ranks under DDP."""

import copy
import json
import os
import socket
from collections.abc import Iterator
from datetime import timedelta

import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp

TOL = 1e-5
LR = 1e-3


def _losses(policy, group: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(velocity [2, C, F, H, W], loss) of group ``group``'s two velocity calls, one at a time
    (DDP: a backward after each forward): 2 latents at high sigmas, then at low ones (Wan2.2
    A14B: one expert each; DDP cannot take both experts in one forward-backward)."""
    g = torch.Generator().manual_seed(100 + group)
    cond = policy.encode([f"a red ball {group}", f"a blue cube {group}"])
    for hi in (0.95, 0.4):
        x = torch.randn(2, *policy.latent_shape, generator=g)
        v = policy.velocity(x, hi - 0.02 * torch.rand(2, generator=g), cond)
        yield v, (v - x).square().mean()


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (DTensor), or ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker(rank: int, world: int, strategy: str, port: int, out_dir: str, policy) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=world,
                          timeout=timedelta(seconds=120))  # a hung collective fails the test
    try:
        torch.set_num_threads(1)
        out = _compare(rank, world, strategy, policy)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        td.destroy_process_group()


def _compare(rank: int, world: int, strategy: str, policy) -> dict:
    from branchgrpo import dist, sequence_parallel

    d = dist.Dist(rank, world, 0, strategy, sp=2)
    policy.transformer.requires_grad_(True)
    single = copy.deepcopy(policy)
    # one process: every group's loss, the mean over groups, one AdamW step
    single_opt = torch.optim.AdamW(single.transformer.parameters(), lr=LR)
    ref = [list(_losses(single, g)) for g in range(d.dp_world)]
    v_ref = torch.cat([v.detach() for v, _ in ref[d.dp_rank]])
    sum(loss for calls in ref for _, loss in calls).div(d.dp_world).backward()
    g_ref = {n: p.grad.clone() for n, p in single.transformer.named_parameters()}
    single_opt.step()

    seen: list[int] = []
    for tr in sequence_parallel.transformers(policy.transformer):
        tr.blocks[1].register_forward_pre_hook(
            lambda m, args: seen.append(args[0].shape[1]))  # blocks take hidden_states first
    dist.wrap(policy, d)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=LR)
    vs = []
    for v, loss in _losses(policy, d.dp_rank):  # a forward and a backward per call
        loss.backward()
        vs.append(v.detach())
    v = torch.cat(vs)
    names = [n for n, _ in single.transformer.named_parameters()]
    grads = dict(zip(names, [_full(p.grad) for p in policy.trainable_parameters()], strict=True))
    opt.step()
    after = dict(zip(names, map(_full, policy.trainable_parameters()), strict=True))
    ref_after = dict(single.transformer.named_parameters())
    return {"velocity": float((v - v_ref).abs().max()),
            "velocity_scale": float(v_ref.abs().max()),
            "grad": max(float((grads[n] - g_ref[n]).abs().max()) for n in names),
            "grad_scale": max(float(g.abs().max()) for g in g_ref.values()),
            "param": max(float((after[n].detach() - ref_after[n].detach()).abs().max())
                         for n in names),
            "tokens_per_rank": sorted(set(seen)),
            "tokens": int(v.shape[2] * v.shape[3] * v.shape[4] / 4)}  # patch 1 x 2 x 2


def _build(kind: str):
    """Tiny policies with 8 video tokens and 2 heads at 5 frames: Wan2.1 and Wan2.2 A14B (two
    experts) at 32 x 32, Wan2.2 TI2V-5B (spatial factor 16, per-token timesteps) at 64 x 64."""
    from branchgrpo.models.wan import tiny_wan
    from branchgrpo.models.wan22 import tiny_wan22

    torch.set_num_threads(1)  # no intra-op thread pool in the process that forks
    if kind == "wan":
        return tiny_wan(height=32, width=32, num_frames=5)[0]
    if kind == "wan22":
        return tiny_wan22(height=64, width=64, num_frames=5)[0]
    return tiny_wan22(height=32, width=32, num_frames=5, a14b=True)[0]


_BUILT: dict[str, object] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("kind", "world", "strategy"), [
    ("wan", 2, "ddp"), ("wan", 4, "ddp"), ("wan22", 2, "ddp"), ("wan22_a14b", 2, "ddp"),
    ("wan", 4, "fsdp")])
def test_sequence_parallel_wan_matches_one_process(kind, world, strategy, tmp_path):
    if kind not in _BUILT:  # built once per kind, in the process that forks
        _BUILT[kind] = _build(kind)
    policy = _BUILT[kind]
    mp.start_processes(_worker, args=(world, strategy, _free_port(), str(tmp_path), policy),
                       nprocs=world, start_method="fork")  # the forks inherit the policy
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    print(world, "ranks:", rows)
    for r in rows:
        assert r["tokens_per_rank"] == [4] and r["tokens"] == 8, r  # each rank holds half
        assert r["velocity_scale"] > 0.1 and r["grad_scale"] > 1e-3, r
        assert r["velocity"] < TOL and r["grad"] < TOL and r["param"] < TOL, r

"""Ulysses sequence parallelism (`branchgrpo.sequence_parallel`) on CPU ranks (gloo, processes
forked from the test, which builds the tiny Wan once): its guided velocity, its gradients under
DDP and the weights after one AdamW step match one process within 1e-5, on 2 ranks (one group
of 2) and on 4 ranks (two data-parallel groups of 2, each with its own inputs)."""

import copy
import json
import os
import socket

import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp

TOL = 1e-5
LR = 1e-3


def _inputs(policy, group: int):
    """Group ``group``'s latents [2, C, F, H, W], sigmas [2] and prompt embeddings."""
    g = torch.Generator().manual_seed(100 + group)
    x = torch.randn(2, *policy.latent_shape, generator=g)
    sigma = torch.rand(2, generator=g) * 0.8 + 0.1
    cond = policy.encode([f"a red ball {group}", f"a blue cube {group}"])
    return x, sigma, cond


def _loss(policy, group: int):
    x, sigma, cond = _inputs(policy, group)
    v = policy.velocity(x, sigma, cond)
    return v, (v - x).square().mean()


def _worker(rank: int, world: int, sp: int, port: int, out_dir: str, policy) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        out = _compare(rank, world, sp, policy)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        td.destroy_process_group()


def _compare(rank: int, world: int, sp: int, policy) -> dict:
    from branchgrpo import dist, sequence_parallel

    d = dist.Dist(rank, world, 0, "ddp", sp)
    policy.transformer.requires_grad_(True)
    single = copy.deepcopy(policy)
    # one process: every group's loss, the mean over groups, one AdamW step
    single_opt = torch.optim.AdamW(single.transformer.parameters(), lr=LR)
    v_ref = [_loss(single, g)[0].detach() for g in range(d.dp_world)]
    sum(_loss(single, g)[1] for g in range(d.dp_world)).div(d.dp_world).backward()
    g_ref = {n: p.grad.clone() for n, p in single.transformer.named_parameters()}
    single_opt.step()

    sequence_parallel.enable(policy, d)
    seen: list[int] = []
    policy.transformer.blocks[1].register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw.get("hidden_states", args[0] if args else None)
                                        .shape[1]), with_kwargs=True)
    dist.wrap(policy, d)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=LR)
    v, loss = _loss(policy, d.dp_rank)
    loss.backward()
    names = [n for n, _ in single.transformer.named_parameters()]
    grads = dict(zip(names, [p.grad for p in policy.trainable_parameters()], strict=True))
    opt.step()
    after = dict(zip(names, policy.trainable_parameters(), strict=True))
    ref_after = dict(single.transformer.named_parameters())
    return {"velocity": float((v.detach() - v_ref[d.dp_rank]).abs().max()),
            "velocity_scale": float(v_ref[d.dp_rank].abs().max()),
            "grad": max(float((grads[n] - g_ref[n]).abs().max()) for n in names),
            "grad_scale": max(float(g.abs().max()) for g in g_ref.values()),
            "param": max(float((after[n].detach() - ref_after[n].detach()).abs().max())
                         for n in names),
            "tokens_per_rank": seen[0], "tokens": int(v.shape[2] * v.shape[3] * v.shape[4] / 4)}


@pytest.fixture(scope="module")
def tiny_policy():
    """The tiny Wan at 32 x 32 x 5 frames: 2 x 2 x 2 = 8 video tokens, 2 heads."""
    from branchgrpo.models.wan import tiny_wan

    torch.set_num_threads(1)  # no intra-op thread pool in the process that forks
    return tiny_wan(height=32, width=32, num_frames=5)[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_wan_matches_one_process(world, tiny_policy, tmp_path):
    mp.start_processes(_worker, args=(world, 2, _free_port(), str(tmp_path), tiny_policy),
                       nprocs=world, start_method="fork")  # the forks inherit the policy
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    print(world, "ranks:", rows)
    for r in rows:
        assert r["tokens_per_rank"] * 2 == r["tokens"] == 8, r  # each rank holds half
        assert r["velocity_scale"] > 0.1 and r["grad_scale"] > 1e-3, r
        assert r["velocity"] < TOL and r["grad"] < TOL and r["param"] < TOL, r

"""branchgrpo.dist without torchrun: the single-process defaults (every collective a no-op that
never touches torch.distributed), the strategy rule, batch geometry errors, and the reductions
over ranks with the collective faked (tests/distributed runs the real ones under torchrun)."""

from __future__ import annotations

import math
import re
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as td
from torch import nn

from branchgrpo import dist as D
from branchgrpo.config import ConfigError, load_config
from branchgrpo.dist import Dist
from branchgrpo.preflight import check_geometry, check_run
from branchgrpo.spec import strategy_of


@pytest.fixture
def no_collectives(monkeypatch):
    """Fail any test whose single-process path calls into torch.distributed."""
    def refuse(*a, **k):
        raise AssertionError("a single-process run called torch.distributed")

    for name in ("barrier", "broadcast_object_list", "all_gather", "all_gather_object",
                 "init_process_group", "destroy_process_group", "get_backend"):
        monkeypatch.setattr(td, name, refuse)


def test_single_process_defaults(monkeypatch):
    d = Dist()
    assert (d.rank, d.world, d.local_rank, d.strategy, d.enabled, d.main) == (
        0, 1, 0, "none", False, True)
    assert (Dist(1, 2).enabled, Dist(1, 2).main, Dist(0, 2).main) == (True, False, True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.env_world() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert D.env_world() == 4


def test_init_without_torchrun_is_one_process(monkeypatch, no_collectives):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d, device = D.init(torch.device("cpu"), strategy="ddp")
    assert d == Dist() and device == torch.device("cpu") and not td.is_initialized()
    D.close(d)


def test_collectives_are_no_ops_on_one_process(no_collectives):
    d = Dist()
    obj = {"run": "x"}
    metrics = {"a": 1.0, "b": True}
    t = torch.arange(6.0).reshape(3, 2)
    assert D.broadcast(d, obj) is obj
    assert D.mean_metrics(d, metrics) is metrics
    assert D.gather_cat(d, t) is t
    assert D.gather_int(d, 7) == [7]
    D.barrier(d)
    D.check_sync(d, [torch.ones(2)], 1)
    # population std of [1, 2, 3, 4]: sqrt(mean of (1.5^2, 0.5^2, 0.5^2, 1.5^2)) = sqrt(1.25)
    assert D.global_std(d, torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(math.sqrt(1.25))


def test_wrap_and_no_sync_leave_one_process_alone(no_collectives):
    class P:
        transformer = nn.Linear(2, 2)

    p = P()
    inner = p.transformer
    D.wrap(p, Dist())
    assert p.transformer is inner
    assert isinstance(D.no_sync(p, Dist(), last=False), nullcontext)
    assert isinstance(D.no_sync(p, Dist(0, 2, 0, "fsdp"), last=False), nullcontext)


def test_ddp_without_a_transformer_is_a_clear_error():
    with pytest.raises(ValueError, match="object has no .transformer module to wrap for "
                                         "dist.strategy=ddp"):
        D.wrap(object(), Dist(0, 2, 0, "ddp"))


@pytest.mark.parametrize("over,expected", [
    ([], "ddp"),  # tiny: replicated
    (["model.kind=flux", "model.path=m"], "fsdp"),  # full fine-tuning of a real model: sharded
    (["model.kind=sd3", "model.path=m", "model.finetune=lora"], "ddp"),  # LoRA: small states
    (["model.kind=flux", "model.path=m", "dist.strategy=ddp"], "ddp"),  # explicit wins
    (["dist.strategy=fsdp"], "fsdp"),
])
def test_strategy_rule(over, expected):
    assert strategy_of(load_config(None, over)) == expected


def test_transformer_blocks_are_the_module_list_items_in_order():
    class T(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(2, 2)
            self.transformer_blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
            self.single_transformer_blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))

    t = T()
    assert D.transformer_blocks(t) == [*t.transformer_blocks, *t.single_transformer_blocks]


@pytest.mark.parametrize("over,world,prompts,message", [
    (["dist.global_prompts=0", "train.prompts_per_iteration=4"], 8, 16,
     "8 ranks x 4 prompts = 32 > 16 training prompts: lower train.prompts_per_iteration to 2"),
    (["dist.global_prompts=32"], 8, 16,
     "8 ranks x 4 prompts = 32 > 16 training prompts: lower dist.global_prompts to 16"),
    ([], 20, 16, "20 ranks > 16 training prompts: each rank needs its own prompt; use at most "
                 "16 ranks"),
    (["dist.global_prompts=6"], 4, 16, "dist.global_prompts=6 does not divide over 4 ranks"),
])
def test_geometry_errors_say_what_to_change(over, world, prompts, message):
    cfg = load_config(None, over)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_geometry(cfg, world, prompts)


@pytest.mark.parametrize("over,world,prompts,per_rank", [
    ([], 1, 1, 8),  # one process: no prompt-count limit (prompts are cycled)
    ([], 2, 16, 8), (["dist.global_prompts=16"], 8, 16, 2),
    (["dist.global_prompts=2"], 2, 2, 1),
])
def test_geometry_that_fits_gives_prompts_per_rank(over, world, prompts, per_rank):
    assert check_geometry(load_config(None, over), world, prompts) == per_rank


def test_a_global_std_over_a_combined_reward_needs_reward_sum():
    over = ["rollout.method=flow_grpo", "advantage.combine=advantage_sum",
            "reward.weights={shapes: 1.0, judge: 1.0}"]
    with pytest.raises(ConfigError, match="set advantage.combine=reward_sum"):
        check_geometry(load_config(None, over), 2, 16)
    assert check_geometry(load_config(None, over), 1, 16) == 8  # one rank: no gather


def test_the_preflight_check_knows_the_world_from_world_size(monkeypatch):
    cfg = load_config(None, ["model.pretrain_steps=1", "dist.global_prompts=6"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=re.escape(
            "dist.global_prompts=6 does not divide over 4 ranks: set it to a multiple of 4 "
            "(e.g. 8 or 4) or run on 1, 2, 3, 6 ranks")):
        check_run(cfg)


def _fake_gather(monkeypatch, rows):
    """all_gather_object filling in ``rows``: what the other ranks sent."""
    def gather(out, obj):
        assert obj == rows[0]  # this process is rank 0
        out[:] = rows

    monkeypatch.setattr(td, "all_gather_object", gather)


def test_mean_metrics_averages_numbers_over_ranks_and_keeps_the_rest(monkeypatch):
    rows = [{"a": 1.0, "n": 2, "flag": True, "tag": "x", "only0": 4.0},
            {"a": 3.0, "n": 5, "flag": False, "tag": "y"}]
    _fake_gather(monkeypatch, rows)
    out = D.mean_metrics(Dist(0, 2, 0, "ddp"), rows[0])
    # numbers: the mean over the ranks that have them; bools and strings: rank 0's
    assert out == {"a": 2.0, "n": 3.5, "flag": True, "tag": "x", "only0": 4.0}
    assert rows[0]["a"] == 1.0  # the input is not changed


def test_gather_int_returns_every_rank(monkeypatch):
    _fake_gather(monkeypatch, [3, 9])
    assert D.gather_int(Dist(0, 2, 0, "ddp"), 3) == [3, 9]


def test_check_sync_raises_when_replicas_differ(monkeypatch):
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    mine = (6.0, 14.0)  # sum, sum of squares: 1 + 2 + 3, 1 + 4 + 9
    _fake_gather(monkeypatch, [mine, mine])
    D.check_sync(Dist(0, 2, 0, "ddp"), params, 5)
    _fake_gather(monkeypatch, [mine, (6.0, 14.5)])
    with pytest.raises(RuntimeError, match="iteration 5: parameters differ across ranks"):
        D.check_sync(Dist(0, 2, 0, "ddp"), params, 5)
    D.check_sync(Dist(0, 2, 0, "fsdp"), params, 5)  # shards: nothing to compare


def test_updates_that_the_per_rank_edges_cannot_feed_are_refused(monkeypatch):
    # 2 trees of 14 trained edges over 2 ranks: 14 per rank, not 100
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=re.escape(
            "14 trained edges per rollout batch on each of 2 ranks (1 trees x 14) cannot feed "
            "train.updates_per_rollout=100: lower it to at most 14 or raise "
            "dist.global_prompts")):
        check_run(load_config(None, ["rollout.num_steps=4", "rollout.split_steps=[0,1]",
                                     "dist.global_prompts=2", "train.updates_per_rollout=100"]))

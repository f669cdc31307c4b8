"""``dist.sequence_parallel``: the settings it cannot run under are refused with what to change
(config.validate, preflight.check_sequence_parallel, sequence_parallel.check on the built
transformer); groups are consecutive ranks; the plan report counts a group as one
data-parallel rank."""

import pytest

from branchgrpo import sequence_parallel
from branchgrpo.config import ConfigError, load_config, validate
from branchgrpo.dist import Dist
from branchgrpo.preflight import check_sequence_parallel


def _cfg(*args: str):
    return load_config(None, list(args))


def test_range():
    with pytest.raises(ConfigError, match="dist.sequence_parallel must be >= 1"):
        validate(_cfg("dist.sequence_parallel=0"))
    validate(_cfg("dist.sequence_parallel=2", "model.kind=wan", "dist.strategy=fsdp"))


def test_only_video_families_and_divisors_of_the_world():
    check_sequence_parallel(_cfg("model.kind=tiny"), 4)  # off: nothing to check
    with pytest.raises(ConfigError, match="model.kind=flux is not a video family"):
        check_sequence_parallel(_cfg("model.kind=flux", "dist.sequence_parallel=2"), 2)
    with pytest.raises(ConfigError, match=r"=4 does not divide the 6 ranks.*one of \[1, 2, 3, 6\]"):
        check_sequence_parallel(_cfg("model.kind=wan", "dist.sequence_parallel=4"), 6)
    check_sequence_parallel(_cfg("model.kind=wan", "dist.sequence_parallel=2"), 4)


def test_heads_and_tokens_must_divide():
    from diffusers import WanTransformer3DModel

    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=4,
                               in_channels=4, out_channels=4, text_dim=8, freq_dim=16, ffn_dim=8,
                               num_layers=1, rope_max_seq_len=16)
    sequence_parallel.check(tr, (4, 2, 4, 4), 2)  # 8 tokens, 2 heads
    with pytest.raises(ConfigError, match=r"does not divide the 2 attention heads.*\[1, 2\]"):
        sequence_parallel.check(tr, (4, 2, 4, 4), 4)
    with pytest.raises(ConfigError, match=r"does not divide the 1 video tokens"):
        sequence_parallel.check(tr, (4, 1, 2, 2), 2)


def test_groups_are_consecutive_ranks():
    d = Dist(rank=5, world=8, sp=2)
    assert (d.dp_rank, d.dp_world) == (2, 4)
    assert (Dist(rank=3, world=4).dp_rank, Dist(rank=3, world=4).dp_world) == (3, 4)


def test_plan_counts_a_group_as_one_data_parallel_rank(monkeypatch):
    from branchgrpo.plan_report import format_report, plan_report

    monkeypatch.setenv("WORLD_SIZE", "4")
    r = plan_report(_cfg("model.kind=wan", "model.path=Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                         "dist.sequence_parallel=2", "dist.global_prompts=2"))
    assert r["batch"]["prompts_per_rank"] == 1 and r["batch"]["prompts_per_iteration"] == 2
    assert r["per_iteration"]["leaves"] == 2 * r["leaves"]
    assert "batch: 2 sequence-parallel group(s) of 2 ranks x 1 prompts = 2" in format_report(r)

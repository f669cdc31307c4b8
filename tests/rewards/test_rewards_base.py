"""Protocol, registry, validation and combination (rewards/base.py)."""

from __future__ import annotations

import pytest
import torch

from branchgrpo.rewards import REWARDS, RewardError, RewardSet, build_reward, check_scores
from branchgrpo.rewards.base import weighted_sum


def test_check_scores_casts_and_validates():
    s = check_scores("r", torch.tensor([1, 2, 3], dtype=torch.float64), 3)
    assert s.dtype == torch.float32 and s.tolist() == [1.0, 2.0, 3.0]
    assert check_scores("r", [0.5, 1.5], 2).tolist() == [0.5, 1.5]
    assert check_scores("r", torch.ones(2, 1), 2).shape == (2,)
    with pytest.raises(RewardError, match=r"'r'.*2 non-finite.*out of 4"):
        check_scores("r", torch.tensor([0.0, float("nan"), float("inf"), 1.0]), 4)
    with pytest.raises(RewardError, match=r"'r'.*expected \[3\] \(1 missing\)"):
        check_scores("r", torch.zeros(2), 3)
    with pytest.raises(RewardError, match="no scores"):
        check_scores("r", None, 3)


def test_registry_names_and_unknown_name():
    for n in [
        "jpeg_compressibility",
        "jpeg_incompressibility",
        "remote",
        "hpsv2",
        "pickscore",
        "imagereward",
        "clip",
        "aesthetic",
        "ocr",
        "vlm_judge",
    ]:
        assert n in REWARDS
    with pytest.raises(KeyError, match="Did you mean 'pickscore'"):
        build_reward("pickscor")


def test_dotted_path_function_factory_and_class():
    media = torch.full((2, 3, 4, 4), 0.25)
    r = build_reward("rewards_testlib:mean_pixel")
    assert r.name == "mean_pixel"
    assert r(media, ["ab", "abcd"]).tolist() == [2.25, 4.25]
    f = build_reward("rewards_testlib:scaled_factory", scale=4.0)  # kwargs -> factory
    assert f(media, ["x", "y"]).tolist() == [1.0, 1.0]
    c = build_reward("rewards_testlib:RankInGroup")  # class -> instance
    assert c.name == "rank" and c.groupwise


def test_dotted_path_errors_name_the_path():
    with pytest.raises(ImportError, match="no_such_module_xyz.*'no_such_module_xyz:f'"):
        build_reward("no_such_module_xyz:f")
    with pytest.raises(ImportError, match="has no attribute 'missing'"):
        build_reward("rewards_testlib:missing")


def test_nan_reward_raises_naming_it():
    rs = RewardSet({"bad": 1.0}, {"bad": {"source": "rewards_testlib:nan_reward"}})
    with pytest.raises(RewardError, match=r"'bad' returned 2 non-finite score\(s\).*out of 4"):
        rs.score(torch.zeros(4, 3, 4, 4), ["a"] * 4)


def test_rewardset_batches_pointwise_and_groups_groupwise():
    calls = []

    def counting(media, prompts):
        calls.append(media.shape[0])
        return media.reshape(media.shape[0], -1).mean(1)

    rank = build_reward("rewards_testlib:RankInGroup")
    rs = RewardSet({"m": 1.0, "rank": 2.0}, rewards={"m": counting, "rank": rank}, batch_size=2)
    means = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2])
    media = means.view(5, 1, 1, 1).expand(5, 3, 2, 2).contiguous()
    group = torch.tensor([0, 0, 1, 1, 1])
    s = rs.score(media, list("abcde"), group)
    assert calls == [2, 2, 1]
    assert torch.allclose(s["m"], means)
    assert s["rank"].tolist() == [0.0, 1.0, 2.0, 1.0, 0.0]  # ranks within each group
    assert sorted(rank.calls) == [2, 3]
    w = rs.weighted(s)
    assert torch.allclose(w, means + 2 * s["rank"])
    assert rs.metrics(s)["reward/rank"] == pytest.approx(0.8)
    assert list(rs.score(media, list("abcde"), group, names=["m"])) == ["m"]


def test_weighted_sum_and_errors():
    s = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([10.0, 20.0])}
    assert weighted_sum(s, {"a": 0.7, "b": 1.4}).tolist() == pytest.approx([14.7, 29.4])
    with pytest.raises(RewardError, match="'c'"):
        weighted_sum(s, {"c": 1.0})
    with pytest.raises(ValueError, match="2 media but 1 prompts"):
        RewardSet({"jpeg_compressibility": 1.0}).score(torch.zeros(2, 3, 4, 4), ["a"])
    with pytest.raises(ValueError, match="no weight"):
        RewardSet({"a": 1.0}, {"b": {}})

"""A run whose reward cannot tell images apart says so at every iteration (and logs it)."""

import pytest

from branchgrpo.log import read_metrics, split_evals
from testlib import TRAIN_HELPERS, cli, small_args

pytestmark = pytest.mark.slow


def test_a_constant_reward_warns_that_nothing_is_learnt(tmp_path, cache_dir, capsys,
                                                        monkeypatch):
    monkeypatch.syspath_prepend(str(TRAIN_HELPERS))  # the reward source flat_reward.py
    run = tmp_path / "flat"
    _, _, err = cli(capsys, "train", *small_args(
        cache_dir, run, "train.iterations=2", "reward.weights={flat: 1.0}",
        "reward.options={flat: {source: 'flat_reward:score'}}"))
    for it in (1, 2):
        assert f"warning: iteration {it}: every tree's rewards are equal" in err
    rows, _ = split_evals(read_metrics(run))
    assert [r["reward/zero_std_frac"] for r in rows] == [1.0, 1.0]
    assert all(r["loss/policy"] == 0.0 for r in rows)


def test_a_varying_reward_does_not_warn(trained_run):
    _, out = trained_run  # python -m branchgrpo train, 2 iterations (tests/conftest.py)
    assert "every tree's rewards are equal" not in out.stderr

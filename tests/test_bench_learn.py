"""``branchgrpo bench learn`` end to end (its --quick path, shrunk further), the training time
budget and time-based evaluation it relies on, and its aggregation helpers."""

import json
import math

import pytest

from branchgrpo.bench.learn import Run, crossing, curve
from branchgrpo.cli import main
from branchgrpo.config import ConfigError, load_config
from branchgrpo.log import read_metrics
from branchgrpo.train import train
from plot_testlib import LEGEND_SWATCH, curve_pixels


def _small(cache_dir, run_dir, *extra):
    return [f"log.run_dir={run_dir}", f"model.cache_dir={cache_dir}", "model.pretrain_steps=5",
            "rollout.num_steps=4", "rollout.split_steps=[0,1]", "train.prompts_per_iteration=2",
            "data.eval_samples=4", "log.progress=false", "log.tensorboard=false",
            "log.eval_every=0", *extra]


def test_bench_learn_quick_writes_table_plots_and_report(tmp_path, cache_dir, capsys):
    out = tmp_path / "bl"
    rc = main(["bench", "learn", "--quick", "--budget", "1e-3", "--out", str(out),
               f"model.cache_dir={cache_dir}", "train.prompts_per_iteration=1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "[1/2] dance seed 0" in printed and "[2/2] branch seed 0" in printed
    result = json.loads((out / "learn.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"dance", "branch"}
    for r in rows.values():
        assert r["iterations"] >= 1
        for k in ("judge_before", "judge_final", "strict_final", "s_per_iteration",
                  "grid_before", "grid_final"):
            assert math.isfinite(r[k]), (r["method"], k)
    assert result["budget_s"] == 1e-3 and result["machine"]["torch"]
    for png in ("learn_time.png", "learn_iterations.png"):  # curves, not only the legend (the
        # two methods' curves may coincide here: one iteration each from the same base model)
        assert sum(curve_pixels(out / png, 2)) > 6 * LEGEND_SWATCH, png
    md = (out / "learn.md").read_text()
    assert "| dance |" in md and "| branch |" in md and "branchgrpo bench learn" in md
    assert f"{rows['branch']['grid_before']:.3f} → {rows['branch']['grid_final']:.3f}" in md
    assert (out / "runs" / "branch-s0" / "metrics.jsonl").exists()


def test_bench_learn_rejects_a_bad_override_before_training(tmp_path, capsys):
    rc = main(["bench", "learn", "--quick", "--out", str(tmp_path), "train.lrr=1"])
    assert rc == 2 and "did you mean 'train.lr'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_time_budget_stops_after_the_iteration_that_crosses_it(tmp_path, cache_dir):
    run = tmp_path / "run"
    train(load_config(None, _small(cache_dir, run, "train.iterations=50",
                                   "train.time_budget=1e-9", "log.eval_every_seconds=1e-9")))
    rows = read_metrics(run)
    steps = [r for r in rows if "eval/tag" not in r]
    evals = [r for r in rows if "eval/tag" in r]
    assert [r["iteration"] for r in steps] == [1]
    assert [r["eval/tag"] for r in evals] == ["before", "after"]  # no extra eval when done
    assert evals[0]["time/elapsed"] == 0.0
    assert evals[1]["time/elapsed"] == steps[0]["time/elapsed"] > 0
    assert (run / "checkpoints" / "iter_000001" / "manifest.json").exists()


def test_eval_every_seconds_evaluates_between_iterations(tmp_path, cache_dir):
    run = tmp_path / "run"
    train(load_config(None, _small(cache_dir, run, "train.iterations=3",
                                   "log.eval_every_seconds=1e-9")))
    tags = [r["eval/tag"] for r in read_metrics(run) if "eval/tag" in r]
    assert tags == ["before", "iter_0001", "iter_0002", "after"]


@pytest.mark.parametrize("override,key", [("train.time_budget=-1", "train.time_budget"),
                                          ("log.eval_every_seconds=-0.5",
                                           "log.eval_every_seconds")])
def test_negative_seconds_are_config_errors(override, key):
    with pytest.raises(ConfigError, match=f"{key} must be >= 0"):
        load_config(None, [override])


def test_crossing_and_curve():
    ev = [{"time": 0.0, "iteration": 0, "judge": 0.4},
          {"time": 10.0, "iteration": 4, "judge": 0.5},
          {"time": 20.0, "iteration": 8, "judge": 0.7}]
    assert crossing(ev, 0.6, "time") == pytest.approx(15.0)
    assert crossing(ev, 0.6, "iteration") == pytest.approx(6.0)
    assert crossing(ev, 0.3, "time") == 0.0 and crossing(ev, 0.8, "time") is None
    short = [dict(e, time=e["time"] / 2) for e in ev[:2]]  # a seed that stopped at 5 s
    c = curve([Run("m", 0, "", ev), Run("m", 1, "", short)], "time")
    assert c["time"][0] == 0.0 and c["time"][-1] == 5.0  # no extrapolation past a seed
    assert c["min"][-1] == pytest.approx(0.45) and c["max"][-1] == pytest.approx(0.5)
    assert c["mean"][-1] == pytest.approx(0.475)

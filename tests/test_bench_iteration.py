"""``branchgrpo bench iteration`` times `branchgrpo.train.iteration` itself: its counts are the
plan a training run of the method runs, its columns are that iteration's ``time/<phase>``
metrics, the best of the repeats is kept, the batch-1 row runs at batch 1, and the ratios are
to DanceGRPO."""

import json

import pytest
import torch

import branchgrpo.bench.iteration as bench_iteration
from branchgrpo.cli import main
from branchgrpo.plan_report import plan_report
from branchgrpo.train import iteration as train_iteration

METHODS = ["dance_full", "branch_depth"]


@pytest.fixture
def recorded(monkeypatch):
    """Every train.iteration the bench runs: (method, max_batch, edge_chunk, metrics)."""
    calls = []

    def spy(s):
        metrics = train_iteration(s)
        calls.append((s.cfg.rollout.method, s.cfg.rollout.max_batch, s.cfg.train.edge_chunk,
                      metrics))
        return metrics

    monkeypatch.setattr(bench_iteration, "iteration", spy)
    return calls


def test_bench_iteration_reports_train_iterations_of_the_methods_plans(recorded, capsys):
    rc = main(["bench", "iteration", "--json", "--repeats", "2", "--methods", *METHODS])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == [*METHODS, "dance_full (batch 1)"]

    # the counts are those of the plan `branchgrpo train rollout.method=<m>` runs
    for name, r in rows.items():
        method = name.split(" ")[0]
        report = plan_report(bench_iteration.method_config(method, 1))
        assert (r["forwards"], r["trained_edges"]) == (report["forwards"],
                                                       report["trained_edges"]), name

    # every timed run is train.iteration: warm-up + 2 per method, 2 for the batch-1 row
    # (already warm), and the batch-1 row ran one sample per forward and one edge per backward
    assert [(m, mb, ch) for m, mb, ch, _ in recorded] == (
        [("dance_full", 64, 64)] * 3 + [("branch_depth", 64, 64)] * 3
        + [("dance_full", 1, 1)] * 2)

    # each row is the fastest timed run, its columns the sums of train's phase timers
    def columns(m):
        cols = {"rollout_s": m["time/rollout"], "reward_s": m["time/decode"] + m["time/reward"],
                "update_s": m["time/advantage"] + m["time/select"] + m["time/update"]}
        return cols | {"total_s": sum(cols.values())}

    timed = {"dance_full": recorded[1:3], "branch_depth": recorded[4:6],
             "dance_full (batch 1)": recorded[6:8]}
    for name, runs in timed.items():
        best = min((columns(m) for *_, m in runs), key=lambda c: c["total_s"])
        for col, v in best.items():
            assert rows[name][col] == round(v, 3), (name, col)

    # ratios are to dance_full and to its batch-1 row
    base, slow = rows["dance_full"], rows["dance_full (batch 1)"]
    for r in rows.values():
        assert r["ratio_total"] == pytest.approx(r["total_s"] / base["total_s"], abs=2e-3)
        assert r["ratio_batch1"] == pytest.approx(r["total_s"] / slow["total_s"], abs=2e-3)
    assert result["machine"]["torch"] == torch.__version__
    assert result["device"] == "cpu" and result["machine"]["gpu"] == "none"

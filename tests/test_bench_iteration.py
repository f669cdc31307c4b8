import json
import subprocess
import sys

import torch


def test_bench_iteration_cli_counts_match_the_plans_and_ratios_are_to_dance_full():
    """One real iteration per method on the tiny FLUX policy, through the CLI: the forward and
    trained-edge counts are the plans' own (the same as ``bench nfe`` on the analytic policy),
    also for the batch-1 baseline row, the baselines' ratios are exactly 1, and the header
    names the machine it ran on."""
    out = subprocess.run(
        [sys.executable, "-m", "branchgrpo", "bench", "iteration", "--json",
         "--methods", "dance_full", "branch_depth"],
        capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["dance_full", "branch_depth", "dance_full (batch 1)"]
    for name in ("dance_full", "dance_full (batch 1)"):  # batch size changes time, not work
        assert (rows[name]["forwards"], rows[name]["trained_edges"]) == (305, 304)
    assert (rows["branch_depth"]["forwards"], rows["branch_depth"]["trained_edges"]) == (203, 138)
    assert rows["dance_full"]["ratio_total"] == 1.0
    assert rows["dance_full (batch 1)"]["ratio_batch1"] == 1.0
    for r in rows.values():
        assert min(r["rollout_s"], r["update_s"]) > 0
        assert abs(r["total_s"] - r["rollout_s"] - r["reward_s"] - r["update_s"]) <= 0.002
    assert result["machine"]["torch"] == torch.__version__
    assert result["device"] == "cpu" and result["machine"]["gpu"] == "none"

"""End to end: ``monitor/grid`` in the log and report, ``branchgrpo sample`` into the run."""

import json
import subprocess
import sys

import pytest

from testlib import cli_env, run_cli, small_args

pytestmark = pytest.mark.slow


def test_grid_monitor_logged_and_sample_writes_into_the_run(tmp_path, cache_dir):
    run = tmp_path / "run"
    run_cli("train", *small_args(cache_dir, run, "train.iterations=1"))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "eval/tag" not in r]
    evals = [r for r in rows if "eval/tag" in r]
    assert all(0 <= r["monitor/grid"] <= 1 for r in train)
    assert {r["eval/tag"] for r in evals} == {"before", "after"}
    assert all(0 <= r["eval/grid"] <= 1 for r in evals)
    assert "| grid |" in (run / "report.md").read_text()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    for _ in range(2):
        subprocess.run([sys.executable, "-m", "branchgrpo", "sample", str(run), "--prompt",
                        "one red circle on the left", "--n", "1"], cwd=elsewhere, check=True,
                       capture_output=True, env=cli_env())
    assert list(elsewhere.iterdir()) == []  # nothing in the current folder
    for name in ("sample_000", "sample_001"):
        out = run / "samples" / name
        assert (out / "grid.png").exists() and len(list(out.glob("0*.png"))) == 1

"""End to end: ``monitor/grid`` in the log and report, ``branchgrpo sample`` into the run."""

import json

import pytest

from testlib import cli, copy_run

pytestmark = pytest.mark.slow


def test_grid_monitor_logged_and_sample_writes_into_the_run(trained_run, tmp_path, capsys,
                                                            monkeypatch):
    run = copy_run(trained_run[0], tmp_path)  # python -m branchgrpo train (tests/conftest.py)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "eval/tag" not in r]
    evals = [r for r in rows if "eval/tag" in r]
    assert all(0 <= r["monitor/grid"] <= 1 for r in train)
    assert {r["eval/tag"] for r in evals} == {"before", "after"}
    assert all(0 <= r["eval/grid"] <= 1 for r in evals)
    assert "| grid |" in (run / "report.md").read_text()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for _ in range(2):
        cli(capsys, "sample", str(run), "--prompt", "one red circle on the left", "--n", "1")
    assert list(elsewhere.iterdir()) == []  # nothing in the current folder
    for name in ("sample_000", "sample_001"):
        out = run / "samples" / name
        assert (out / "grid.png").exists() and len(list(out.glob("0*.png"))) == 1

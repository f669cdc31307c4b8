import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from branchgrpo import checkpoint as ckpt
from branchgrpo.models.tiny import TinySpec, load_or_pretrain
from branchgrpo.tasks.shapes import split_prompts

from .conftest import HERE, cli_env, run_cli, small_args


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_trains_two_iterations_end_to_end(tmp_path, cache_dir):
    run = tmp_path / "run"
    run_cli("train", *small_args(cache_dir, run, "train.iterations=2"))
    rows = [r for r in _metrics(run) if "eval/tag" not in r]
    assert len(rows) == 2
    for r in rows:
        assert all(v == v and abs(v) != float("inf") for k, v in r.items()
                   if k.startswith("loss/"))
        assert r["ratio/first"] == 1.0  # exactly on-policy before the first update
    base = load_or_pretrain(TinySpec(pretrain_steps=5), cache_dir, split_prompts()[0], False)
    trained = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))["policy"]
    names = {k for k, p in base.named_parameters() if k.startswith("transformer.")}
    assert set(trained) == names  # every transformer parameter is trained, text frozen
    base_params = dict(base.named_parameters())
    unchanged = [k for k, v in trained.items() if torch.equal(v, base_params[k].detach())]
    assert unchanged == []
    for f in ("config.yaml", "report.md", "plots/reward_per_iteration.png",
              "plots/reward_per_second.png", "plots/heldout.png", "samples/before.png",
              "samples/after.png"):
        assert (run / f).exists(), f
    report = (run / "report.md").read_text()
    assert "| judge |" in report and "before" in report


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path, cache_dir):
    args = ["train.iterations=6", "log.checkpoint_every=1", "log.keep_last=10"]
    full = tmp_path / "full"
    run_cli("train", *small_args(cache_dir, full, *args))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "branchgrpo", "train", *small_args(cache_dir, killed, *args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=cli_env())
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "iter_000002.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "iter_000006.pt").exists()
    out = run_cli("train", "--resume", str(killed))
    assert "resumed from" in out.stdout
    a = ckpt.load_checkpoint(full / "checkpoints" / "iter_000006.pt")
    b = ckpt.load_checkpoint(killed / "checkpoints" / "iter_000006.pt")
    for k in a["policy"]:
        assert torch.equal(a["policy"][k], b["policy"][k]), k
    steps_a = [r["iteration"] for r in _metrics(full) if "eval/tag" not in r]
    steps_b = [r["iteration"] for r in _metrics(killed) if "eval/tag" not in r]
    assert steps_a == steps_b == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("args,message", [
    (["train.lrr=1"], "unknown config key 'train.lrr'.*did you mean 'train.lr'"),
    (["train.lr=fast"], "bad value for 'train.lr'"),
    (["train.updates_per_rollout=100000"], "cannot feed train.updates_per_rollout"),
    (["rollout.split_steps=[0,40]"], r"split steps must lie in \[0, 19\]"),
    (["rollout.window=3"], "rollout.window is not used by method 'branch'"),
    (["missing.yaml"], "config file 'missing.yaml' not found"),
    (["data.prompts=/nonexistent/prompts.txt", "model.pretrain_steps=1"],
     "prompt file '/nonexistent/prompts.txt' not found"),
])
def test_bad_configs_give_clear_errors(tmp_path, args, message):
    import re

    out = run_cli("train", f"log.run_dir={tmp_path / 'r'}", f"model.cache_dir={tmp_path}",
                  *args, check=False)
    assert out.returncode == 2, out.stderr
    assert re.search(message, out.stderr), out.stderr


def test_nan_reward_stops_with_its_name_and_checkpoint_stays_loadable(tmp_path, cache_dir):
    run = tmp_path / "nan"
    cfg = tmp_path / "nan.yaml"
    cfg.write_text("reward:\n  weights: {nanny: 1.0}\n  options: {nanny: {source: "
                   "'nan_reward:score'}}\nlog:\n  checkpoint_every: 1\n")
    out = run_cli("train", str(cfg), *small_args(cache_dir, run, "train.iterations=4"),
                  check=False)
    assert out.returncode == 1
    assert "nanny" in out.stderr and "iteration 2" in out.stderr, out.stderr
    last = ckpt.latest_checkpoint(run)
    assert last is not None and last.name == "iter_000001.pt"
    assert not list((run / "checkpoints").glob("*.tmp"))
    state = ckpt.load_checkpoint(last)
    assert state["iteration"] == 1 and state["policy"]
    ev = run_cli("eval", str(run), "--json", "--samples", "2", check=False)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["iteration"] == 1


def test_sample_and_eval_commands(tmp_path, cache_dir):
    run = tmp_path / "run"
    run_cli("train", *small_args(cache_dir, run, "train.iterations=1"))
    out = tmp_path / "imgs"
    run_cli("sample", str(run), "--prompt", "two red circles on the left", "--n", "2",
            "--out", str(out))
    assert len(list(out.glob("0*.png"))) == 2 and (out / "grid.png").exists()
    ev = json.loads(run_cli("eval", str(run), "--json", "--samples", "4").stdout)
    assert {"eval/judge", "eval/judge_strict", "eval/shapes"} <= set(ev)


def test_help_explains_commands():
    out = run_cli("--help").stdout
    for cmd in ("train", "sample", "eval", "serve-reward", "bench"):
        assert cmd in out
    keys = run_cli("train", "--help-config").stdout
    assert "rollout.split_steps" in keys and "children per split" in keys
    assert HERE.exists()

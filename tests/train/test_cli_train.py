import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from branchgrpo import checkpoint as ckpt
from branchgrpo.config import all_keys
from branchgrpo.models.tiny import TinySpec, load_or_pretrain
from branchgrpo.tasks.shapes import split_prompts
from testlib import (
    TRAIN_HELPERS,
    checkpoint_tensors,
    cli,
    cli_env,
    comparable_rows,
    copy_run,
    metrics,
    run_cli,
    small_args,
)

pytestmark = pytest.mark.slow


def _report_table(report: str) -> dict[str, tuple[str, str]]:
    """{metric: (before, after)} of the report's held-out table."""
    rows = [x.split("|")[1:-1] for x in report.splitlines() if x.startswith("| ")]
    return {c[0].strip(): (c[1].strip(), c[2].strip()) for c in rows[1:]}


def test_cli_trains_two_iterations_end_to_end(trained_run, cache_dir):
    run, _ = trained_run  # python -m branchgrpo train, 2 iterations (tests/conftest.py)
    rows = [r for r in metrics(run) if "eval/tag" not in r]
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(v) for k, v in r.items() if k.startswith(("loss/", "reward/")))
        assert r["ratio/first"] == 1.0  # exactly on-policy before the first update
        # 2 trees of the 4-step plan split at steps 0 and 1 (K 2): 1 + 2 + 4 + 4 + 4 = 15
        # nodes, 14 SDE edges (all trained), forwards at grids 0..3: 1 + 2 + 4 + 4 = 11
        assert (r["tree/nodes"], r["tree/edges"], r["tree/trained_edges"],
                r["tree/forwards"]) == (30, 28, 28, 22)
        assert 0 <= r["reward/shapes"] <= 1 and r["reward/total"] == r["reward/shapes"]
    evals = {r["eval/tag"]: r for r in metrics(run) if "eval/tag" in r}
    assert sorted(evals) == ["after", "before"]
    assert (evals["before"]["iteration"], evals["after"]["iteration"]) == (0, 2)
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
    table = _report_table((run / "report.md").read_text())
    for name in ("judge", "shapes", "grid"):  # the report shows the logged evaluations
        assert table[name] == (f"{evals['before'][f'eval/{name}']:.4f}",
                               f"{evals['after'][f'eval/{name}']:.4f}"), name
    cfg = (run / "config.yaml").read_text()
    assert "iterations: 2" in cfg and "pretrain_steps: 5" in cfg


def _meta(folder, run_dir):
    """A checkpoint's meta.json without its wall time and run directory, and its numpy /
    python generator states apart: train.seed does not seed those global generators (nothing
    draws from them), so two runs start them from different OS entropy."""
    meta = json.loads((folder / "meta.json").read_text())
    assert meta.pop("elapsed") > 0
    meta["config"] = meta["config"].replace(str(run_dir), "RUN")
    return meta, meta.pop("rng")


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path, cache_dir):
    args = ["train.iterations=6", "log.checkpoint_every=1", "log.keep_last=10",
            "train.ema_decay=0.9", "train.lr_schedule=cosine", "train.kl_coef=0.1"]
    full = tmp_path / "full"
    run_cli("train", *small_args(cache_dir, full, *args))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "branchgrpo", "train", *small_args(cache_dir, killed, *args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=cli_env())
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "iter_000002").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "iter_000006").exists()
    out = run_cli("train", "--resume", str(killed))
    assert "resumed from" in out.stdout
    assert "warning" not in out.stderr, out.stderr  # same thread count: no warning
    a_dir, b_dir = full / "checkpoints" / "iter_000006", killed / "checkpoints" / "iter_000006"
    a, b = checkpoint_tensors(a_dir), checkpoint_tensors(b_dir)
    files = {k.split(":")[0] for k in a}
    assert files == {"model.safetensors", "optimizer.safetensors", "ema.safetensors",
                     "rng.safetensors"}
    assert a.keys() == b.keys()
    for k in a:  # weights, Adam moments and steps, EMA, generator states: bit for bit
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # LR scheduler, param groups, metrics line count, config, iteration, threads
    (ma, _), (mb, rng_b) = _meta(a_dir, full), _meta(b_dir, killed)
    assert ma["scheduler"]["last_epoch"] == 6 and ma["iteration"] == 6
    assert ma == mb
    # the resumed process took the numpy / python states of the checkpoint it resumed from
    assert rng_b == _meta(killed / "checkpoints" / "iter_000002", killed)[1]
    steps_a = [r["iteration"] for r in metrics(full) if "eval/tag" not in r]
    assert steps_a == [1, 2, 3, 4, 5, 6]
    # every logged value but wall times, evaluations included, line for line
    assert comparable_rows(full) == comparable_rows(killed)


@pytest.fixture
def two_checkpoints(trained_run, tmp_path) -> Path:
    """A copy of the finished 2-iteration run with checkpoints after iterations 1 and 2
    (`trained_run`), for this test to damage."""
    return copy_run(trained_run[0], tmp_path)


def _rewrite(folder, name, tensors):
    """Replace one safetensors file of a checkpoint and refresh its manifest (a checkpoint
    that is intact but holds the wrong content)."""
    import hashlib

    from safetensors.torch import save_file

    save_file(tensors, str(folder / name))
    man = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    man["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(man))


def test_truncated_newest_checkpoint_falls_back_for_resume_eval_and_sample(two_checkpoints,
                                                                          tmp_path, capsys):
    run = two_checkpoints
    newest = run / "checkpoints" / "iter_000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    warning = (f"warning: damaged checkpoint {run / 'checkpoints' / 'iter_000002'}: "
               "model.safetensors has 1000 bytes")
    _, ev, err = cli(capsys, "eval", str(run), "--json", "--samples", "2")
    assert json.loads(ev)["iteration"] == 1
    assert warning in err and "using iter_000001 instead" in err, err
    _, sa, err = cli(capsys, "sample", str(run), "--prompt", "one red circle", "--n", "1",
                     "--out", str(tmp_path / "imgs"))
    assert "(iteration 1)" in sa and warning in err
    torch.set_num_threads(2)  # as OMP_NUM_THREADS=2 would (the autouse fixture restores it)
    _, out, err = cli(capsys, "train", "--resume", str(run))
    torch.set_num_threads(1)
    assert warning in err and "resuming from iter_000001 instead" in err
    assert "written with 1 torch threads, this run has 2" in err
    assert "at iteration 1" in out
    assert [r["iteration"] for r in metrics(run) if "eval/tag" not in r] == [1, 2]
    assert ckpt.load_checkpoint(run / "checkpoints" / "iter_000002")["iteration"] == 2


def test_resume_before_the_first_checkpoint_is_a_clear_error(two_checkpoints, capsys):
    import shutil

    run = two_checkpoints
    shutil.rmtree(run / "checkpoints")
    config = (run / "config.yaml").read_text()
    _, _, err = cli(capsys, "train", "--resume", str(run), "train.iterations=5", code=2)
    assert "Traceback" not in err  # (an uncaught exception would fail the test)
    assert err.strip() == (
        f"resume error: no checkpoint in {run / 'checkpoints'} yet: the run stopped before its "
        "first checkpoint (log.checkpoint_every=1); start it again without --resume")
    assert (run / "config.yaml").read_text() == config


def test_a_failed_resume_rewrites_nothing(two_checkpoints, capsys):
    run = two_checkpoints
    for it in (1, 2):  # intact files, but weights of another model
        _rewrite(run / "checkpoints" / f"iter_{it:06d}", "model.safetensors",
                 {"other.weight": torch.zeros(2)})
    before = {f: (run / f).read_text() for f in ("config.yaml", "metrics.jsonl")}
    _, _, err = cli(capsys, "train", "--resume", str(run), "train.iterations=5", code=2)
    assert "Traceback" not in err  # (an uncaught exception would fail the test)
    assert "does not fit the model" in err and "unknown ['other.weight']" in err
    assert {f: (run / f).read_text() for f in before} == before


def test_eval_refuses_empty_and_crafted_checkpoints(two_checkpoints, tmp_path, capsys):
    import os

    run = two_checkpoints
    empty = run / "checkpoints" / "iter_000002"
    _rewrite(empty, "model.safetensors", {})
    _, _, err = cli(capsys, "eval", str(empty), code=2)
    assert "holds no trained weights" in err, err
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"

    class E:  # unpickling it runs `touch marker`
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"policy": E()}, evil)
    _, _, err = cli(capsys, "eval", str(evil), code=2)
    assert "Traceback" not in err  # (an uncaught exception would fail the test)
    assert "cannot be read as data" in err and not marker.exists()


def test_a_start_that_fails_leaves_no_run_directory(tmp_path, capsys):
    run = tmp_path / "r"
    rc, _, err = cli(capsys, "train", f"log.run_dir={run}", "model.kind=flux",
                     f"model.path={tmp_path / 'missing'}", code=None)
    assert rc != 0 and "cannot load" in err
    assert not run.exists()


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
def test_bad_configs_give_clear_errors(tmp_path, args, message, capsys):
    import re

    _, _, err = cli(capsys, "train", f"log.run_dir={tmp_path / 'r'}",
                    f"model.cache_dir={tmp_path}", *args, code=2)
    assert re.search(message, err), err


def test_nan_reward_stops_with_its_name_and_checkpoint_stays_loadable(tmp_path, cache_dir,
                                                                       capsys, monkeypatch):
    # the reward source nan_reward.py, which counts its calls in a process: each command
    # imports it afresh, as its own process would
    monkeypatch.syspath_prepend(str(TRAIN_HELPERS))
    monkeypatch.delitem(sys.modules, "nan_reward", raising=False)
    run = tmp_path / "nan"
    cfg = tmp_path / "nan.yaml"
    cfg.write_text("reward:\n  weights: {nanny: 1.0}\n  options: {nanny: {source: "
                   "'nan_reward:score'}}\nlog:\n  checkpoint_every: 1\n")
    _, _, err = cli(capsys, "train", str(cfg), *small_args(cache_dir, run, "train.iterations=4"),
                    code=1)
    assert "nanny" in err and "iteration 2" in err, err
    last = ckpt.latest_checkpoint(run)
    assert last is not None and last.name == "iter_000001"
    assert not list((run / "checkpoints").glob("*.tmp"))
    state = ckpt.load_checkpoint(last)
    assert state["iteration"] == 1 and state["policy"]
    monkeypatch.delitem(sys.modules, "nan_reward")
    _, ev, _ = cli(capsys, "eval", str(run), "--json", "--samples", "2")
    assert json.loads(ev)["iteration"] == 1


def test_sample_and_eval_commands(trained_run, tmp_path, capsys):
    run, _ = trained_run  # sample writes into --out, eval writes nothing
    out = tmp_path / "imgs"
    cli(capsys, "sample", str(run), "--prompt", "two red circles on the left", "--n", "2",
        "--out", str(out))
    assert len(list(out.glob("0*.png"))) == 2 and (out / "grid.png").exists()
    ev = json.loads(cli(capsys, "eval", str(run), "--json", "--samples", "4")[1])
    assert {"eval/judge", "eval/judge_strict", "eval/shapes"} <= set(ev)


def test_help_explains_commands(capsys):
    out = cli(capsys, "--help")[1]
    for cmd in ("train", "sample", "eval", "serve-reward", "bench"):
        assert cmd in out
    keys = cli(capsys, "train", "--help-config")[1].splitlines()
    # every schema key, with its default and below it its doc
    docs = {line.strip().split(" = ")[0]: keys[i + 1].strip()
            for i, line in enumerate(keys) if line[:2] == "  " and line[2] != " "}
    assert docs == {k: " ".join(d.split()) for k, d in all_keys().items()}
    assert "  rollout.split_steps = None" in keys and "  train.lr = 0.0002" in keys

"""``branchgrpo train`` with ``dist.sequence_parallel=2`` under torchrun (2 CPU ranks, gloo)
on a Wan replica checkpoint, full fine-tuning (so FSDP2 over the group: ``dist.strategy=auto``):
one iteration, exit 0, the same metrics and the same trained weights as one process within
1e-5. DDP under sequence parallelism: `test_sequence_parallel.py`."""

import subprocess
from pathlib import Path

import pytest
import torch

import testlib
from branchgrpo import checkpoint as ckpt

from .conftest import torchrun_cmd

pytestmark = pytest.mark.slow
TOL = 1e-5


@pytest.fixture(scope="module")
def wan_replica(tmp_path_factory) -> Path:
    from branchgrpo.models.testing import write_replica_pipeline

    return write_replica_pipeline("wan", tmp_path_factory.mktemp("replica-wan"))


def _args(path: Path, run: Path, prompts: Path, *extra: str) -> list[str]:
    """One iteration of BranchGRPO on 1 prompt (2 leaves, 2 steps), 32 x 32 x 5 frames (8 video
    tokens, 2 heads), full fine-tuning with a KL reference (split too), the JPEG reward, a
    checkpoint at the end."""
    return ["train", "model.kind=wan", f"model.path={path}", "model.guidance=5.0",
            "model.height=32", "model.width=32", "model.num_frames=5", "model.finetune=full",
            "rollout.method=branch", "rollout.num_steps=2", "rollout.split_steps=[0]",
            "rollout.branch_factor=2", "train.iterations=1", "train.prompts_per_iteration=1",
            "train.device=cpu", "reward.weights={jpeg_compressibility: 1.0}", "reward.judge=''",
            f"data.prompts={prompts}", f"data.eval_prompts={prompts}", "data.eval_samples=1",
            f"log.run_dir={run}", "log.progress=false", "log.tensorboard=false",
            "log.eval_every=0", "log.checkpoint_every=1", "train.kl_coef=0.1", "train.lr=1e-4",
            *extra]


def _start(nproc: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(torchrun_cmd(nproc, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=testlib.cli_env())


def _finish(proc: subprocess.Popen) -> str:
    """The run's stdout; raise with its output unless it exits 0."""
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{out[-2000:]}\n{err[-4000:]}")
    return out


@pytest.fixture
def prompts(tmp_path) -> Path:
    f = tmp_path / "prompts.txt"
    f.write_text("a red cat\n")
    return f


def test_two_rank_sequence_parallel_run_equals_one_process(wan_replica, prompts, tmp_path):
    sp, single = tmp_path / "sp", tmp_path / "single"
    runs = [_start(2, *_args(wan_replica, sp, prompts, "dist.sequence_parallel=2")),
            _start(1, *_args(wan_replica, single, prompts))]  # side by side
    out = [_finish(p) for p in runs][0]
    assert "2 ranks, fsdp, sequence parallel 2 (1 groups)" in out  # auto: full fine-tuning
    rows_sp, rows_one = testlib.comparable_rows(sp), testlib.comparable_rows(single)
    assert [r.keys() for r in rows_sp] == [r.keys() for r in rows_one]
    compared = 0
    for a, b in zip(rows_sp, rows_one, strict=True):
        for k, v in a.items():
            if isinstance(v, float):
                assert v == pytest.approx(b[k], abs=TOL), k
                compared += 1
            else:
                assert v == b[k], k
    assert compared > 10
    row = next(r for r in rows_sp if "loss/total" in r)
    assert row["grad_norm"] > 0 and "loss/kl" in row  # the reference ran
    a, b = (ckpt.load_checkpoint(ckpt.latest_checkpoint(r)) for r in (sp, single))
    assert a["iteration"] == b["iteration"] == 1 and a["policy"].keys() == b["policy"].keys()
    # the gradients (Adam's first moment / (1 - beta1)) match within 1e-5 ...
    grad = {k: torch.as_tensor(v["exp_avg"]) / 0.1 for k, v in b["optimizer"]["state"].items()}
    grad_sp = {k: torch.as_tensor(v["exp_avg"]) / 0.1 for k, v in a["optimizer"]["state"].items()}
    assert max(float((grad_sp[k] - grad[k]).abs().max()) for k in grad) < TOL
    assert max(float(g.abs().max()) for g in grad.values()) > 1e-3
    # ... and so do the weights, wherever the gradient is well above Adam's eps (1e-8): its
    # first step lr g / (|g| + eps) turns a rounding difference of a ~1e-8 gradient into up to
    # lr; everywhere the step is bounded by lr (1e-4) either way
    wa, wb = a["policy"], b["policy"]
    for k in wb:
        diff = (wa[k] - wb[k]).abs()
        assert float(torch.where(grad[k].abs() > 1e-6, diff, 0).max()) < TOL, k
        assert float(diff.max()) < 2e-4, k

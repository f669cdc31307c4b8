import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The processes tests start (CLI runs, torchrun ranks, benches) run one thread each unless the
# caller set OMP_NUM_THREADS: beside a second pytest-xdist worker, a subprocess on two OpenMP
# threads spins on a busy core and ran bench credit's CLI test 10x slower (30 s -> 5 min).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and a busy 2-core machine does not thrash."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A model cache holding a quickly trained shapes judge (end-to-end training tests)."""
    from branchgrpo.tasks.shapes_reward import train_judge

    d = tmp_path_factory.mktemp("cache")
    from safetensors.torch import save_model

    save_model(train_judge(steps=10, batch=16), str(d / "shapes_judge.safetensors"))
    return d


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, cache_dir):
    """One finished `testlib.small_args` run of 2 iterations with a checkpoint after each
    (``log.checkpoint_every=1``), trained once per session (per xdist worker) by ``python -m
    branchgrpo train`` in a subprocess: the end-to-end run that the tests of its outputs, and
    of sample / eval / resume on it, read. Returns (run directory, the finished process, whose
    stdout and stderr the tests read). A test that writes into the run works on a copy
    (`testlib.copy_run`)."""
    from testlib import run_cli, small_args

    run = tmp_path_factory.mktemp("trained") / "run"
    out = run_cli("train", *small_args(cache_dir, run, "train.iterations=2",
                                       "log.checkpoint_every=1", "log.keep_last=3"))
    return run, out

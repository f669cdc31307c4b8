"""Shared fixtures for end-to-end training tests: a cache with a quickly trained judge, and a
small config (tiny plan, 5 pretraining steps) so a CLI run takes seconds."""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def small_args(cache_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"log.run_dir={run_dir}", f"model.cache_dir={cache_dir}", "model.pretrain_steps=5",
            "rollout.num_steps=4", "rollout.split_steps=[0,1]", "train.prompts_per_iteration=2",
            "data.eval_samples=4", "log.progress=false", "log.tensorboard=false",
            "log.eval_every=0", *extra]


def cli_env() -> dict[str, str]:
    """The environment of every CLI run a test compares bit for bit: float reductions split
    over a different number of threads round differently, so the thread count is pinned."""
    return {**os.environ, "PYTHONPATH": str(HERE), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "branchgrpo", *args], capture_output=True,
                         text=True, env=cli_env())
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out

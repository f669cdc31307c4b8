"""Fixtures for distributed end-to-end tests: torchrun on CPU with the gloo backend, two ranks,
the tiny default policy and a small plan (`testlib.small_args`)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import testlib

DIST_ARGS = ("dist.global_prompts=2", "dist.noise=prompt", "train.updates_per_rollout=1",
             "train.iterations=3", "log.checkpoint_every=1", "log.keep_last=10",
             "data.eval_samples=2")
"""3 iterations of 2 prompts in all (1 per rank on 2 ranks), one update per rollout, noise
seeded per global prompt (the run does not depend on the number of ranks), a checkpoint after
every iteration."""


def small_args(cache_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """`testlib.small_args` with `DIST_ARGS`, then ``extra``."""
    return testlib.small_args(cache_dir, run_dir, *DIST_ARGS, *extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    """``python -m torch.distributed.run --nproc_per_node N -m branchgrpo ARGS`` (free port)."""
    if nproc == 1:
        return [sys.executable, "-m", "branchgrpo", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            "-m", "branchgrpo", *args]


def run(nproc: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(torchrun_cmd(nproc, *args), capture_output=True, text=True,
                         env=testlib.cli_env(), timeout=300)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def run_until(nproc: int, marker: Path, *args: str) -> None:
    """Start a run and SIGKILL it once ``marker`` exists: first the rank processes (torchrun
    starts each in its own session), then torchrun itself, each by its pid."""
    proc = subprocess.Popen(torchrun_cmd(nproc, *args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=testlib.cli_env())
    deadline = time.time() + 200
    try:
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
            time.sleep(0.02)
    finally:
        for child in _children(proc.pid):
            os.kill(child, signal.SIGKILL)
        proc.kill()
        proc.wait()

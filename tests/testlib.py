"""Helpers shared by the end-to-end tests (tests/train, tests/distributed): the one small CLI
config, the environment every compared CLI run gets, and readers of a run's outputs.

Importable as ``testlib`` from any test module: pytest puts ``tests/`` on ``sys.path`` (the
rootdir conftest has no ``__init__.py`` beside it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

TESTS = Path(__file__).parent
TRAIN_HELPERS = TESTS / "train"  # flat_reward.py, nan_reward.py: reward sources for the CLI

# metrics.jsonl keys that measure wall time: they differ between any two runs
TIMING_PREFIXES = ("time/",)


def small_args(cache_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides that make a CLI run of the tiny default policy take seconds: 5 pretraining
    steps of the base model (cached in ``cache_dir``), a 4-step plan split at steps 0 and 1
    (4 leaves), 2 prompts per iteration, 4 held-out samples, evaluation only before and
    after, no KL reference (the kill-resume test turns it on), no progress bars or
    TensorBoard. ``extra`` overrides come last and win."""
    return [f"log.run_dir={run_dir}", f"model.cache_dir={cache_dir}", "model.pretrain_steps=5",
            "rollout.num_steps=4", "rollout.split_steps=[0,1]", "train.prompts_per_iteration=2",
            "data.eval_samples=4", "log.progress=false", "log.tensorboard=false",
            "log.eval_every=0", "train.kl_coef=0", *extra]


def cli_env() -> dict[str, str]:
    """The environment of every CLI run a test compares bit for bit: float reductions split
    over a different number of threads round differently, so the thread count is pinned. The
    ``branchgrpo`` this process imported comes first on the path (a worktree's sources, not
    the editable install's)."""
    import branchgrpo

    path = os.pathsep.join([str(Path(branchgrpo.__file__).parents[1]), str(TRAIN_HELPERS)])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_cli(*args: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    """``python -m branchgrpo ARGS`` in `cli_env`; raise with its output unless it exits 0
    (``check``)."""
    out = subprocess.run([sys.executable, "-m", "branchgrpo", *args], capture_output=True,
                         text=True, env=kw.pop("env", cli_env()), **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def cli(capsys: Any, *args: str, code: int | None = 0) -> tuple[int, str, str]:
    """``branchgrpo ARGS`` in this process (`branchgrpo.cli.main`, what ``python -m
    branchgrpo`` runs, without a fresh interpreter's ~4 s of imports): (exit code, stdout,
    stderr), read from ``capsys``; asserts the exit code is ``code`` unless that is None. An
    argparse exit (``--help``, a bad option) counts as its exit code."""
    from branchgrpo.cli import main

    capsys.readouterr()  # only this command's output
    try:
        rc = main(list(args))
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    out = capsys.readouterr()
    if code is not None:
        assert rc == code, f"exit {rc}\n{out.out[-3000:]}\n{out.err[-3000:]}"
    return rc, out.out, out.err


def copy_run(run: Path, tmp_path: Path) -> Path:
    """A copy of the run folder ``run`` as ``tmp_path/run``, for a test that writes into it."""
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every line of a run's metrics.jsonl, in order."""
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The training lines of metrics.jsonl (evaluation lines carry ``eval/tag``)."""
    return [r for r in metrics(run_dir) if "eval/tag" not in r]


def comparable_rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without its wall-time keys: what two runs of one config must share."""
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)}
            for r in metrics(run_dir)]


def checkpoint_tensors(folder: Path) -> dict[str, Any]:
    """Every tensor of a one-process checkpoint folder, as ``<file>:<key>``: the model,
    optimizer, EMA and RNG safetensors files, bit for bit."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out |= {f"{f.name}:{k}": v for k, v in load_file(str(f)).items()}
    return out

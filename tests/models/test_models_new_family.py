"""Adding a model family touches one new file and one registry line (models/README.md): a
family module written here, FLUX.1 under a kind of its own, registered by one entry in
`FAMILIES`, runs ``branchgrpo plan`` and a one-iteration ``branchgrpo train`` on the FLUX
replica checkpoint with no other edit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from models_testlib import RECIPES, REPLICA_SIZE, pipeline_default

NEW_FAMILY = '''"""FLUX.1 under a kind of its own: the new file of the walk-through."""

from dataclasses import dataclass

from branchgrpo.models.flux import FluxFamily
from branchgrpo.models.loading import load


@dataclass
class MyFluxFamily(FluxFamily):
    """FLUX.1's hooks and recipe facts, as a family of its own."""


FAMILY = MyFluxFamily


def build(o, device):
    return load(MyFluxFamily, o.path, device=device, **o.diffusers_kwargs())
'''
REGISTER = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
            "from branchgrpo.models.families import FAMILIES; FAMILIES['myflux'] = 'myflux'; "
            "from branchgrpo.cli import main; sys.exit(main(sys.argv[1:]))")
"""``python -c REGISTER FOLDER ARGS...``: the CLI with the one registry line added."""


@pytest.fixture
def family_dir(tmp_path) -> Path:
    """A folder holding the new family's module, ``myflux.py``."""
    folder = tmp_path / "family"
    folder.mkdir()
    (folder / "myflux.py").write_text(NEW_FAMILY)
    return folder


def cli(family_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """``branchgrpo ARGS`` in a fresh interpreter with ``myflux`` registered."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", REGISTER, str(family_dir), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def replica_args(kind: str, path: Path) -> list[str]:
    """The FLUX replica run's overrides (`models_testlib`) under ``model.kind=kind``."""
    return [f"model.kind={kind}", f"model.path={path}",
            f"model.guidance={pipeline_default('flux', 'guidance_scale')}",
            *(f"{k}={v}" for k, v in REPLICA_SIZE["flux"].items()), *RECIPES["flux"]]


def test_a_new_family_plans_as_the_family_it_reuses(replica, family_dir):
    path = replica("flux")
    new = cli(family_dir, "plan", *replica_args("myflux", path), "--json")
    old = cli(family_dir, "plan", *replica_args("flux", path), "--json")
    assert new.returncode == old.returncode == 0, new.stderr + old.stderr
    got, want = json.loads(new.stdout), json.loads(old.stdout)
    assert (got.pop("family"), want.pop("family")) == ("myflux", "flux")
    assert got == want
    bad = cli(family_dir, "plan", "model.kind=myflx", f"model.path={path}")
    assert bad.returncode == 2 and "did you mean 'myflux'" in bad.stderr, bad.stderr


def test_a_new_family_trains_one_iteration(replica, family_dir, tmp_path):
    path, run = replica("flux"), tmp_path / "run"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\nblue dog 7\n")
    out = cli(family_dir, "train", *replica_args("myflux", path), "rollout.num_steps=2",
              "rollout.split_steps=[0]", "rollout.branch_factor=2", "model.finetune=lora",
              "model.lora_rank=4", "model.lora_alpha=8", "train.lr=1e-2", "train.iterations=1",
              "train.prompts_per_iteration=1", "train.device=cpu",
              "reward.weights={jpeg_compressibility: 1.0}", "reward.judge=''",
              f"data.prompts={prompts}", f"data.eval_prompts={prompts}", "data.eval_samples=1",
              f"log.run_dir={run}", "log.progress=false", "log.tensorboard=false",
              "log.eval_every=0")
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stderr[-3000:]}"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    (trained,) = [r for r in rows if "eval/tag" not in r]
    assert math.isfinite(trained["loss/total"]) and trained["grad_norm"] > 0
    plan = json.loads((run / "plan.json").read_text())
    assert plan["family"] == "myflux"  # and the memory / cost estimate of a family it never saw
    assert plan["memory"]["params"]["trainable"] > 0 and plan["cost"]["backward_rows_per_rank"]

"""Adding a model family touches one new file and one registry line (models/README.md): a
family module written here, FLUX.1 under a kind of its own, registered by one entry in
`FAMILIES`, runs ``branchgrpo plan`` and a one-iteration ``branchgrpo train`` on the FLUX
replica checkpoint with no other edit."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from models_testlib import RECIPES, REPLICA_SIZE, pipeline_default

from branchgrpo.models.families import FAMILIES
from testlib import cli as run_cli

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
@pytest.fixture
def family_dir(tmp_path, monkeypatch) -> Iterator[Path]:
    """A folder holding the new family's module, ``myflux.py``, importable, and the one
    registry line added (``FAMILIES['myflux'] = 'myflux'``) for this test only: the registry,
    ``sys.path`` and ``sys.modules`` are as before after it."""
    folder = tmp_path / "family"
    folder.mkdir()
    (folder / "myflux.py").write_text(NEW_FAMILY)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setitem(FAMILIES, "myflux", "myflux")
    yield folder
    sys.modules.pop("myflux", None)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``branchgrpo ARGS`` in this process (`branchgrpo.cli.main`) with ``myflux`` registered
    (`family_dir`): (exit code, stdout, stderr)."""
    return run_cli(capsys, *args, code=None)


def replica_args(kind: str, path: Path) -> list[str]:
    """The FLUX replica run's overrides (`models_testlib`) under ``model.kind=kind``."""
    return [f"model.kind={kind}", f"model.path={path}",
            f"model.guidance={pipeline_default('flux', 'guidance_scale')}",
            *(f"{k}={v}" for k, v in REPLICA_SIZE["flux"].items()), *RECIPES["flux"]]


def test_a_new_family_plans_as_the_family_it_reuses(replica, family_dir, capsys):
    path = replica("flux")
    new = cli(capsys, "plan", *replica_args("myflux", path), "--json")
    old = cli(capsys, "plan", *replica_args("flux", path), "--json")
    assert new[0] == old[0] == 0, new[2] + old[2]
    got, want = json.loads(new[1]), json.loads(old[1])
    assert (got.pop("family"), want.pop("family")) == ("myflux", "flux")
    assert got == want
    code, _, err = cli(capsys, "plan", "model.kind=myflx", f"model.path={path}")
    assert code == 2 and "did you mean 'myflux'" in err, err


def test_a_new_family_trains_one_iteration(replica, family_dir, tmp_path, capsys):
    path, run = replica("flux"), tmp_path / "run"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\nblue dog 7\n")
    out = cli(capsys, "train", *replica_args("myflux", path), "rollout.num_steps=2",
              "rollout.split_steps=[0]", "rollout.branch_factor=2", "model.finetune=lora",
              "model.lora_rank=4", "model.lora_alpha=8", "train.lr=1e-2", "train.iterations=1",
              "train.prompts_per_iteration=1", "train.device=cpu",
              "reward.weights={jpeg_compressibility: 1.0}", "reward.judge=''",
              f"data.prompts={prompts}", f"data.eval_prompts={prompts}", "data.eval_samples=1",
              f"log.run_dir={run}", "log.progress=false", "log.tensorboard=false",
              "log.eval_every=0")
    code, _, err = out
    assert code == 0, f"exit {code}\n{err[-3000:]}"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    (trained,) = [r for r in rows if "eval/tag" not in r]
    assert math.isfinite(trained["loss/total"]) and trained["grad_norm"] > 0
    plan = json.loads((run / "plan.json").read_text())
    assert plan["family"] == "myflux"  # and the memory / cost estimate of a family it never saw
    assert plan["memory"]["params"]["trainable"] > 0 and plan["cost"]["backward_rows_per_rank"]

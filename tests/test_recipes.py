"""docs/recipes.md is what `branchgrpo recipes` writes now, and every resolved value of every
paper config matches docs/published.json or carries a note saying why it differs."""

from __future__ import annotations

import shutil
from pathlib import Path

from branchgrpo.cli import main
from branchgrpo.recipes import CONFIGS, PUBLISHED, TABLE, build, problems


def test_recipe_table_is_current_and_every_difference_is_noted():
    found = problems(build())
    assert not found, "run `branchgrpo recipes` and commit docs/recipes.md:\n" + "\n".join(found)


def test_check_command_passes_on_the_repository():
    assert main(["recipes", "--check"]) == 0


def _copy(tmp_path: Path) -> tuple[Path, Path]:
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    table = tmp_path / "recipes.md"
    table.write_text(build(configs).markdown, encoding="utf-8")
    return configs, table


def test_a_planted_wrong_value_fails_the_check(tmp_path):
    configs, table = _copy(tmp_path)
    path = configs / "flux_dancegrpo.yaml"
    path.write_text(path.read_text().replace("lr: 1.0e-5", "lr: 3.0e-5"))
    found = problems(build(configs), table)
    assert any("flux_dancegrpo.train.lr" in m and "differs" in m for m in found), found
    assert any("stale" in m for m in found), found


def test_a_new_config_without_published_values_fails(tmp_path):
    configs, table = _copy(tmp_path)
    shutil.copy(configs / "flux_dancegrpo.yaml", configs / "flux_new.yaml")
    found = build(configs).errors
    assert any(m.startswith("flux_new.train.lr") and "no entry" in m for m in found), found


def test_defaults_point_into_the_repository():
    assert CONFIGS.is_dir() and PUBLISHED.is_file() and TABLE.is_file()

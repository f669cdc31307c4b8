from pathlib import Path

import pytest

from branchgrpo.config import load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_there_is_a_recipe_per_published_setup():
    names = {p.stem for p in CONFIGS}
    assert {"flux_branchgrpo", "flux_branchgrpo_depth", "flux_branchgrpo_width",
            "flux_branchgrpo_mix", "flux_dancegrpo", "flux_mixgrpo", "flux_mixgrpo_flash",
            "flux_g2rpo", "sd35_flow_grpo", "wan_branchgrpo"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_loads_and_validates_for_8_ranks(path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = load_config(path)
    assert cfg.model.kind in ("flux", "sd3", "wan") and cfg.model.path
    assert path.read_text().startswith("#")  # every recipe cites where its numbers come from

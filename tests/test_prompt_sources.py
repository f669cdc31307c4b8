"""A missing paper prompt file fails with the command that fetches it (data/sources.json)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from branchgrpo.config import ConfigError, load_config
from branchgrpo.models.factory import SOURCES, load_prompts

ROOT = Path(__file__).parents[1]


def test_every_config_prompt_file_has_a_source():
    sources = json.loads(SOURCES.read_text())
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        for spec in (cfg.data.prompts, cfg.data.eval_prompts):
            assert spec in sources, f"{path.name}: {spec} has no entry in data/sources.json"
            assert spec in (ROOT / "data" / "README.md").read_text()


def test_missing_prompt_file_names_its_fetch_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs" / "flux_dancegrpo.yaml")
    with pytest.raises(ConfigError) as e:
        load_prompts(cfg.data.prompts, cfg.data.eval_prompts)
    msg = str(e.value)
    assert "\n" not in msg and re.search(r"data/hpdv2_train.txt' not found; fetch it with: curl",
                                         msg), msg


def test_unknown_missing_file_keeps_the_general_rule(tmp_path):
    cfg = load_config(overrides=[f"data.prompts={tmp_path / 'nope.txt'}"])
    with pytest.raises(ConfigError, match="one prompt per line"):
        load_prompts(cfg.data.prompts, cfg.data.eval_prompts)

"""Build the configured policy and its prompt sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import Config, ConfigError

SOURCES = Path(__file__).resolve().parents[3] / "data" / "sources.json"


def fetch_hint(spec: str) -> str:
    """How to get the prompt file ``spec``: its command from ``data/sources.json``, else the
    general rule."""
    import json

    try:
        sources = json.loads(SOURCES.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        sources = {}
    key = Path(spec).as_posix().removeprefix("./")
    if key in sources:
        return f"fetch it with: {sources[key]} (data/README.md)"
    return "give a text file with one prompt per line, or 'shapes'"


def load_prompts(cfg: Config) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): the built-in shapes split or text files."""
    from ..tasks.shapes import split_prompts

    def read(spec: str, which: int) -> list[str]:
        if spec == "shapes":
            return split_prompts()[which]
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompt file {spec!r} not found; {fetch_hint(spec)}")
        lines = [x.strip() for x in path.read_text().splitlines() if x.strip()]
        if not lines:
            raise ConfigError(f"prompt file {spec!r} is empty")
        return lines

    return read(cfg.data.prompts, 0), read(cfg.data.eval_prompts, 1)


def build_policy(cfg: Config, device: torch.device, progress: bool = True) -> Any:
    """The policy of ``cfg.model`` on ``device`` (tiny: pretrained on first use, cached)."""
    m = cfg.model
    if m.kind == "tiny":
        from ..tasks.shapes import split_prompts
        from .tiny import TinySpec, load_or_pretrain

        spec = TinySpec(pretrain_steps=m.pretrain_steps, clutter=m.clutter)
        policy = load_or_pretrain(spec, Path(m.cache_dir).expanduser(), split_prompts()[0],
                                  progress)
        return policy.to(device)
    from . import families

    return families.build(cfg, device)

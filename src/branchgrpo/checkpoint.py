"""Full training state on disk: atomic writes (temp file + rename), keep the last N, resume.

A checkpoint holds the trainable weights (only parameters that require grad: the full
transformer, or only LoRA weights), optimizer, LR scheduler, EMA, the RNG states of every
generator, the next iteration, the metrics line count and elapsed time. Base weights are
reloaded from the model path or the tiny-model cache.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

PATTERN = "iter_*.pt"


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that require grad, by name (detached CPU copies)."""
    return {k: p.detach().cpu().clone() for k, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters into ``module``; every saved name must exist."""
    params = dict(module.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise KeyError(f"checkpoint has parameters the model lacks: {missing[:5]} ... "
                       "(was it written for another model or fine-tuning mode?)")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))


def rng_state() -> dict[str, Any]:
    """Every global generator's state (torch CPU/CUDA, numpy, python)."""
    s: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                         "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, iteration: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``checkpoints/iter_<iteration>.pt`` atomically and delete all but the newest
    ``keep_last``. ``iteration`` is the number of finished iterations."""
    folder = Path(run_dir) / "checkpoints"
    path = folder / f"iter_{iteration:06d}.pt"
    atomic_save(state, path)
    for old in sorted(folder.glob(PATTERN))[:-keep_last]:
        old.unlink()
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory (temp files are ignored)."""
    found = sorted((Path(run_dir) / "checkpoints").glob(PATTERN))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)

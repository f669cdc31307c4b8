"""Full training state on disk: atomic writes (temp file + rename), keep the last N, resume.

A checkpoint holds the trainable weights (only parameters that require grad: the full
transformer, or only LoRA weights), optimizer, LR scheduler, EMA, the RNG states of every
generator, the next iteration, the metrics line count and elapsed time. Base weights are
reloaded from the model path or the tiny-model cache.

Two formats, one name per iteration: a single process writes ``checkpoints/iter_XXXXXX.pt``
(one file); a torchrun run writes ``checkpoints/iter_XXXXXX/``, a torch.distributed.checkpoint
(DCP) folder: every rank writes its shards into ``iter_XXXXXX.tmp/``, rank 0 adds ``meta.pt``
(iteration, scheduler, RNG, metrics line count, config) and renames the folder after a barrier.
DCP reshards on load, so a run resumes on any number of ranks, one process included.
`load_checkpoint` reads either format into the same plain dict.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

PATTERN = "iter_*"
META = "meta.pt"


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
    prune(folder, keep_last)
    return path


def save_distributed(run_dir: Path, iteration: int, tensors: dict[str, Any],
                     meta: dict[str, Any], keep_last: int, main: bool) -> Path:
    """Collective: every rank writes its shards of ``tensors`` (model / optimizer / EMA state
    dicts, DTensors or replicated tensors) with DCP into ``iter_<iteration>.tmp/``; rank 0
    (``main``) adds ``meta.pt``, renames the folder to ``iter_<iteration>/`` after a barrier
    and prunes old checkpoints; a second barrier makes the result visible to every rank."""
    import shutil

    import torch.distributed as td
    import torch.distributed.checkpoint as dcp

    folder = Path(run_dir) / "checkpoints"
    path = folder / f"iter_{iteration:06d}"
    tmp = folder / f"iter_{iteration:06d}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    td.barrier()
    dcp.save(tensors, checkpoint_id=str(tmp))
    if main:
        atomic_save(meta, tmp / META)
    td.barrier()
    if main:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        prune(folder, keep_last)
    td.barrier()
    return path


def iteration_of(path: Path) -> int:
    """The iteration number in ``iter_XXXXXX[.pt]`` (-1 for anything else)."""
    stem = path.name.removesuffix(".pt").removeprefix("iter_")
    return int(stem) if stem.isdigit() else -1


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder`` (files and DCP folders, not temp), oldest first."""
    found = [p for p in Path(folder).glob(PATTERN) if iteration_of(p) >= 0
             and (p.is_file() or (p / META).is_file())]
    return sorted(found, key=lambda p: (iteration_of(p), p.is_dir()))


def prune(folder: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (either format)."""
    import shutil

    for old in checkpoints(folder)[:-keep_last]:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def is_checkpoint(path: Path) -> bool:
    """A checkpoint file or a complete DCP checkpoint folder."""
    p = Path(path)
    return p.is_file() or (p / META).is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory (temp files are ignored)."""
    found = checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint as one plain dict on the CPU, for either format: ``policy`` {name:
    tensor}, ``ema`` (list in ``policy`` order, or None), ``iteration``, ``config``, ... A DCP
    folder's tensors are gathered into full tensors (no process group needed); its
    ``optimizer`` is keyed by parameter name rather than index."""
    path = Path(path)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False)
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(str(path), Path(d) / "full.pt")
        full = torch.load(Path(d) / "full.pt", map_location="cpu", weights_only=False)
    meta = torch.load(path / META, map_location="cpu", weights_only=False)
    ema = full.get("ema")
    return {**meta, "policy": full["model"], "optimizer": full["optim"],
            "ema": None if ema is None else [ema[k] for k in full["model"]]}

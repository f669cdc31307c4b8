"""A training run's state on disk: `save` the loop's `State` as a checkpoint, pick the newest
intact one, and `restore` it into a freshly built run (single process, DDP or FSDP2).

The on-disk format, verification and fallback are `branchgrpo.checkpoint`'s; this module maps
the recipe's state (policy, optimizer, EMA, LR schedule, RNG, clocks) onto it. Restoring
writes nothing: the caller opens the run directory only once a checkpoint has loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import checkpoint as ckpt
from . import dist
from .config import Config, to_yaml
from .models.families import module_of

if TYPE_CHECKING:
    from .train import State


def save(s: State) -> Path:
    """Write the checkpoint of ``s.iteration`` (format: `branchgrpo.checkpoint`)."""
    meta = {"iteration": s.iteration, "elapsed": s.elapsed,
            "scheduler": s.scheduler.state_dict(), "metrics_lines": s.logger.lines(),
            "config": to_yaml(s.cfg), "extra": s.extra, "param_names": s.param_names,
            "world": s.dist.world}
    ema = None if s.ema is None else dict(zip(s.param_names, s.ema, strict=True))
    if s.dist.enabled:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(module_of(s.policy), s.optimizer, options=_dcp_options())
        return ckpt.save_distributed(s.run_dir, s.iteration, meta, model, optim, ema,
                                     s.cfg.log.keep_last, s.dist.main)
    optim = ckpt.optimizer_by_name(s.optimizer.state_dict(), s.param_names)
    return ckpt.save_checkpoint(s.run_dir, s.iteration, meta,
                                ckpt.trainable_state(module_of(s.policy)), optim, ema,
                                s.cfg.log.keep_last)


def pick_checkpoint(cfg: Config, d: dist.Dist, run_dir: Path) -> Path:
    """Rank 0 picks the newest intact checkpoint (one warning line per damaged newer one) and
    tells every rank; raises `CheckpointError` on every rank when there is none."""
    found: tuple[str, str] = ("", "")
    if d.main:
        hint = (f" (log.checkpoint_every={cfg.log.checkpoint_every}); start it again without "
                "--resume")
        try:
            path, damaged = ckpt.find_checkpoint(run_dir, hint=hint)
            for line in damaged:
                print(f"warning: {line}; resuming from {path.name} instead", file=sys.stderr)
            found = (str(path), "")
        except ckpt.CheckpointError as e:
            found = ("", str(e))
    path, error = dist.broadcast(d, found)
    if error:
        raise ckpt.CheckpointError(error)
    return Path(path)


def restore(s: State, path: Path) -> dict:
    """Load the checkpoint at ``path`` into the policy, optimizer, EMA, LR schedule and RNG
    after checking it fits the model; writes nothing. Returns its metadata."""
    expected = dict(zip(s.param_names, (torch.Size(p.shape) for p in s.params), strict=True))
    if s.dist.enabled and ckpt.is_dcp(path):
        st = _restore_dcp(s, path, expected)
    else:
        st = ckpt.load_checkpoint(path, check=False)
        ckpt.check_fits(st["policy"], expected, f"checkpoint {path}")
        if st["ema"] is not None:
            ckpt.check_fits(st["ema"], expected, f"the EMA of checkpoint {path}")
        (_restore_full if s.dist.enabled else _restore_single)(s, st, expected)
    s.scheduler.load_state_dict(st["scheduler"])
    ckpt.set_rng_state(st["rng"])
    s.iteration, s.elapsed, s.extra = st["iteration"], st["elapsed"], st["extra"]
    if s.dist.main:
        print(f"resumed from {path} at iteration {s.iteration}", flush=True)
        threads = st.get("threads")
        if threads is not None and threads != torch.get_num_threads():
            print(f"warning: {path.name} was written with {threads} torch threads, this run "
                  f"has {torch.get_num_threads()}: the resumed run is valid, but a bit-exact "
                  f"resume needs the same count (e.g. OMP_NUM_THREADS={threads})",
                  file=sys.stderr)
    return st


def _restore_single(s: State, st: dict, expected: dict[str, torch.Size]) -> None:
    """A checkpoint of any format (as full tensors) into a single-process run."""
    optim = ckpt.optimizer_by_index(st["optimizer"], s.param_names, expected)
    ckpt.load_trainable_state(module_of(s.policy), st["policy"])
    s.optimizer.load_state_dict(optim)
    if st["ema"] is not None and s.ema is not None:
        s.ema = [st["ema"][n].to(s.device) for n in s.param_names]


def _restore_dcp(s: State, path: Path, expected: dict[str, torch.Size]) -> dict:
    """Load a DCP folder into this run's (wrapped or sharded) policy, optimizer and EMA: DCP
    reshards to the current rank count. Returns the metadata (``meta.json``, RNG)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from .checkpoint_dcp import dcp_metadata, load_dcp

    saved = {k[1]: m.size for k, m in dcp_metadata(path).items() if k[0] == "model"}
    ckpt.check_fits(saved, expected, f"checkpoint {path}")
    meta = ckpt.read_meta(path)
    module = module_of(s.policy)
    model, optim = get_state_dict(module, s.optimizer, options=_dcp_options())
    state = {n: {k: v for k, v in st.items() if isinstance(v, torch.Tensor)}
             for n, st in optim["state"].items()}
    tensors = {"model": model, "optim": {"state": state}}
    if s.ema is not None and meta["has_ema"]:
        tensors["ema"] = dict(zip(s.param_names, s.ema, strict=True))
    load_dcp(tensors, path)
    optim = ckpt.join_optimizer(tensors["optim"]["state"], meta["optimizer"])
    set_state_dict(module, s.optimizer, model_state_dict=tensors["model"],
                   optim_state_dict=optim, options=_dcp_options())
    return meta


def _restore_full(s: State, st: dict, expected: dict[str, torch.Size]) -> None:
    """A single-process checkpoint (full tensors on every rank) into a multi-rank run, sharded
    (FSDP) or copied (DDP) by ``set_state_dict``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    ckpt.optimizer_by_index(st["optimizer"], s.param_names, expected)  # check only
    set_state_dict(module_of(s.policy), s.optimizer, model_state_dict=st["policy"],
                   optim_state_dict=st["optimizer"],
                   options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True,
                                            strict=False))
    if st["ema"] is not None and s.ema is not None:
        with torch.no_grad():
            for e, n in zip(s.ema, s.param_names, strict=True):
                full = st["ema"][n].to(e.device, e.dtype)
                if isinstance(e, DTensor):  # FSDP: keep this rank's shard
                    full = distribute_tensor(full, e.device_mesh, e.placements)
                e.copy_(full)


def _dcp_options() -> Any:
    """Trainable weights only (frozen base weights reload from the model); non-strict load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)

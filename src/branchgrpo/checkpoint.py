"""Full training state on disk as data (safetensors + JSON), verified by a manifest.

On disk, one folder per checkpoint, ``checkpoints/iter_NNNNNN/`` (NNNNNN: finished
iterations):

- one process: ``model.safetensors`` (trainable weights by parameter name; base weights reload
  from the model path or the tiny-model cache), ``optimizer.safetensors`` (optimizer state
  tensors as ``<param name>/<key>``), ``ema.safetensors`` (EMA weights by name, when kept);
- torchrun: torch.distributed.checkpoint (DCP) files ``.metadata`` and ``__R_0.distcp``
  (every rank writes its shards of ``model``, ``optim.state`` and ``ema``; DCP reshards on
  load, so a run resumes on any number of ranks, one process included);
- both: ``rng.safetensors`` (torch CPU / CUDA generator states of rank 0), ``meta.json``
  (format version, iteration, elapsed seconds, LR scheduler state, optimizer param groups
  and non-tensor state, numpy / python RNG states as lists, config YAML text, metrics line
  count, ``extra``, torch thread count, parameter names) and, written last, ``manifest.json``
  (format, version, every other file's byte count and sha256).

A checkpoint is written into ``iter_NNNNNN.tmp/``; every file is fsynced, then the manifest
is written atomically, then the folder is renamed. A checkpoint whose manifest is missing or
invalid, or whose files do not match it (missing, truncated, corrupted), is damaged:
`find_checkpoint` skips it, with one warning line, for the newest intact one (`prune` never
deletes the newest intact ones). Nothing is unpickled except DCP's ``.metadata``, through an
allow-list of DCP's own metadata classes (`branchgrpo.checkpoint_dcp`), and old single-file
``iter_NNNNNN.pt`` checkpoints, through ``torch.load(weights_only=True)`` with only numpy's
array globals allowed (for the numpy RNG state): no file can run code. `load_checkpoint`
reads every format into the same plain dict.

A run saves and resumes through `save`, `pick_checkpoint` and `restore`, which map a run's
`Trained` parts (module, optimizer, LR schedule, EMA) onto these files for one process or
torchrun (DDP / FSDP2; the DCP side is `branchgrpo.checkpoint_dcp`). Restoring writes
nothing: the caller opens the run directory only once a checkpoint has loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import dist

FORMAT = "branchgrpo-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
META = "meta.json"
MODEL, OPTIMIZER, EMA, RNG = (f"{n}.safetensors" for n in ("model", "optimizer", "ema", "rng"))
DCP_METADATA = ".metadata"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says which and what to do."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files are missing, truncated, corrupted or not data."""


class NoCheckpoint(CheckpointError):
    """A run directory without any (intact) checkpoint."""


# ----------------------------------------------------------------------------- state
def trainable_state(module: nn.Module) -> dict[str, Tensor]:
    """Parameters that require grad, by name (detached CPU copies)."""
    return {k: p.detach().cpu().clone() for k, p in module.named_parameters() if p.requires_grad}


def check_fits(saved: dict[str, Any], expected: dict[str, torch.Size], what: str) -> None:
    """``saved`` ({name: tensor or shape}) has exactly the names and shapes of ``expected``."""
    if not saved:
        raise CheckpointError(f"{what} holds no trained weights (empty policy); it is not a "
                              "usable checkpoint")
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{what} does not fit the model: {len(missing)} trainable parameters missing "
            f"{missing[:3]}, {len(extra)} unknown {extra[:3]} (was it written for another "
            "model or fine-tuning mode, e.g. model.lora?)")
    bad = [k for k, v in saved.items() if tuple(getattr(v, "shape", v)) != tuple(expected[k])]
    if bad:
        k = bad[0]
        raise CheckpointError(f"{what} does not fit the model: {len(bad)} shapes differ, e.g. "
                              f"{k} {tuple(getattr(saved[k], 'shape', saved[k]))} vs "
                              f"{tuple(expected[k])} (another model size?)")


def load_trainable_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy saved trainable parameters into ``module`` (check them first with `check_fits`)."""
    params = dict(module.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))


def optimizer_by_name(sd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer ``state_dict()`` keyed by parameter name instead of index."""
    return {"state": {names[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                             for g in sd["param_groups"]]}


def optimizer_by_index(sd: dict[str, Any], names: list[str],
                       shapes: dict[str, torch.Size]) -> dict[str, Any]:
    """Inverse of `optimizer_by_name` for this run's parameter ``names``; state tensors must
    have their parameter's shape."""
    saved = [n for g in sd["param_groups"] for n in g["params"]]
    if sorted(saved) != sorted(names):
        raise CheckpointError("the checkpoint's optimizer holds other parameters than the model "
                              f"({len(saved)} vs {len(names)}); another fine-tuning mode?")
    for n, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor) and v.dim() and v.shape != shapes[n]:
                raise CheckpointError(f"optimizer state {n}/{k} has shape {tuple(v.shape)}, "
                                      f"the parameter {tuple(shapes[n])}")
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                             for g in sd["param_groups"]]}


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


def _rng_to_disk(s: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors for ``rng.safetensors``, JSON-safe numpy / python states)."""
    tensors = {"torch": s["torch"]} | {f"cuda.{i}": t for i, t in enumerate(s.get("cuda", []))}
    name, keys, pos, has_gauss, gauss = s["numpy"]
    version, internal, gauss_next = s["python"]
    return tensors, {"numpy": [name, keys.tolist(), pos, has_gauss, gauss],
                     "python": [version, list(internal), gauss_next]}


def _rng_from_disk(tensors: dict[str, Tensor], js: dict[str, Any]) -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = js["numpy"]
    version, internal, gauss_next = js["python"]
    s = {"torch": tensors["torch"], "numpy": (name, np.array(keys, dtype=np.uint32), pos,
                                              has_gauss, gauss),
         "python": (version, tuple(internal), gauss_next)}
    cuda = sorted((int(k.split(".")[1]), t) for k, t in tensors.items() if k.startswith("cuda."))
    if cuda:
        s["cuda"] = [t for _, t in cuda]
    return s


def split_optimizer(sd: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """A name-keyed optimizer state dict as (tensor state {name: {key: tensor}}, JSON part:
    param groups and non-tensor state)."""
    tensors = {n: {k: v for k, v in st.items() if isinstance(v, Tensor)}
               for n, st in sd["state"].items()}
    rest = {n: {k: v for k, v in st.items() if not isinstance(v, Tensor)}
            for n, st in sd["state"].items()}
    return tensors, {"param_groups": sd["param_groups"], "state": {n: v for n, v in rest.items()
                                                                   if v}}


def join_optimizer(tensors: dict[str, dict[str, Tensor]], js: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `split_optimizer` (JSON lists in param groups, e.g. betas, become tuples)."""
    state = {n: {**v, **js["state"].get(n, {})} for n, v in tensors.items()}
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v)
               for k, v in g.items()} for g in js["param_groups"]]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------- writing
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    _fsync(path)


def _write_json(obj: Any, path: Path) -> None:
    """JSON to a temp file, fsync, rename (a reader sees the whole file or none)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_extras(folder: Path, meta: dict[str, Any], optim_js: dict[str, Any]) -> None:
    """``rng.safetensors``, ``meta.json`` and, last, ``manifest.json`` over every file."""
    tensors, rng_js = _rng_to_disk(rng_state())
    _write_tensors(tensors, folder / RNG)
    _write_json({"format": FORMAT, "version": VERSION, **meta, "rng": rng_js,
                 "optimizer": optim_js, "threads": torch.get_num_threads()}, folder / META)
    files = {}
    for p in sorted(f for f in folder.iterdir() if f.is_file()):
        _fsync(p)
        files[p.name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    _write_json({"format": FORMAT, "version": VERSION, "files": files}, folder / MANIFEST)
    _fsync(folder)


def publish(tmp: Path, path: Path, keep_last: int) -> None:
    """Rename the finished temp folder to ``path`` and prune."""
    shutil.rmtree(path, ignore_errors=True)
    if path.with_suffix(".pt").is_file():  # an old-format checkpoint of the same iteration
        path.with_suffix(".pt").unlink()
    os.replace(tmp, path)
    _fsync(path.parent)
    prune(path.parent, keep_last)


def temp_folder(run_dir: Path, iteration: int) -> tuple[Path, Path]:
    folder = Path(run_dir) / "checkpoints"
    return folder / f"iter_{iteration:06d}", folder / f"iter_{iteration:06d}.tmp"


def save_checkpoint(run_dir: Path, iteration: int, meta: dict[str, Any],
                    model: dict[str, Tensor], optimizer: dict[str, Any],
                    ema: dict[str, Tensor] | None, keep_last: int) -> Path:
    """One process: write ``checkpoints/iter_<iteration>/`` (see the module docstring) and
    keep the newest ``keep_last`` intact checkpoints. ``optimizer``: a name-keyed state dict
    (`optimizer_by_name`); ``meta``: JSON-safe (iteration, scheduler, config, ...)."""
    path, tmp = temp_folder(run_dir, iteration)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state, optim_js = split_optimizer(optimizer)
    _write_tensors(model, tmp / MODEL)
    _write_tensors({f"{n}/{k}": v for n, st in state.items() for k, v in st.items()},
                   tmp / OPTIMIZER)
    if ema is not None:
        _write_tensors(ema, tmp / EMA)
    write_extras(tmp, {**meta, "layout": "safetensors", "has_ema": ema is not None}, optim_js)
    publish(tmp, path, keep_last)
    return path


# ----------------------------------------------------------------------------- finding
def iteration_of(path: Path) -> int:
    """The iteration number in ``iter_NNNNNN`` or ``iter_NNNNNN.pt`` (-1 for anything else,
    e.g. a ``.tmp`` folder)."""
    stem = path.name.removesuffix(".pt").removeprefix("iter_")
    return int(stem) if path.name.startswith("iter_") and stem.isdigit() else -1


def checkpoints(folder: Path) -> list[Path]:
    """Every checkpoint in ``folder`` (folders and old ``.pt`` files, intact or not; temp
    folders excluded), oldest first; a folder sorts after a ``.pt`` of the same iteration."""
    found = [p for p in Path(folder).glob("iter_*") if iteration_of(p) >= 0
             and (p.is_dir() or p.suffix == ".pt")]
    return sorted(found, key=lambda p: (iteration_of(p), p.is_dir()))


def _read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The manifest's file table; raises `DamagedCheckpoint` when it is missing or invalid."""
    m = path / MANIFEST
    if not m.is_file():
        raise DamagedCheckpoint(f"damaged checkpoint {path}: no {MANIFEST} (its write did "
                                "not finish)")
    try:
        man = json.loads(m.read_text())
        files = man["files"]
        ok = man["format"] == FORMAT and isinstance(files, dict) and META in files
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise DamagedCheckpoint(f"damaged checkpoint {path}: {MANIFEST} is not a valid "
                                f"{FORMAT} manifest")
    if man["version"] != VERSION:
        raise DamagedCheckpoint(f"checkpoint {path} has format version {man['version']}; this "
                                f"branchgrpo reads version {VERSION} (use the matching release)")
    return files


def verify(path: Path, hashes: bool = True) -> None:
    """Raise `DamagedCheckpoint` unless the folder ``path`` has a valid manifest and every file
    it lists has its byte count (and, with ``hashes``, its sha256)."""
    path = Path(path)
    for name, rec in _read_manifest(path).items():
        f = path / name
        if Path(name).name != name or not f.is_file():
            raise DamagedCheckpoint(f"damaged checkpoint {path}: {name} is missing")
        if f.stat().st_size != rec.get("bytes"):
            raise DamagedCheckpoint(f"damaged checkpoint {path}: {name} has {f.stat().st_size} "
                                    f"bytes, the manifest says {rec.get('bytes')} (truncated?)")
        if hashes and _sha256(f) != rec.get("sha256"):
            raise DamagedCheckpoint(f"damaged checkpoint {path}: {name} does not match its "
                                    "sha256 (corrupted)")


def _check(path: Path) -> None:
    """Raise `DamagedCheckpoint` unless ``path`` is an intact checkpoint of any format."""
    if path.is_dir():
        verify(path)
    else:
        _load_legacy(path)


def find_checkpoint(run_dir: Path, hint: str = "") -> tuple[Path, list[str]]:
    """(the newest intact checkpoint of a run directory, one line per damaged newer one).
    Raises `NoCheckpoint` when there is none; ``hint`` ends its message."""
    folder = Path(run_dir) / "checkpoints"
    found, damaged = checkpoints(folder), []
    for p in reversed(found):
        try:
            _check(p)
        except DamagedCheckpoint as e:
            damaged.append(str(e))
            continue
        return p, damaged
    if not found:
        raise NoCheckpoint(f"no checkpoint in {folder} yet: the run stopped before its first "
                           f"checkpoint{hint}")
    raise NoCheckpoint(f"no intact checkpoint in {folder}: " + "; ".join(damaged) + hint)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint of a run directory, or None."""
    try:
        return find_checkpoint(run_dir)[0]
    except NoCheckpoint:
        return None


def is_checkpoint(path: Path) -> bool:
    """A file (an old ``.pt`` checkpoint) or a checkpoint folder, intact or not: named
    ``iter_NNNNNN`` or holding a manifest, ``meta.json`` or DCP metadata (a run directory
    holds ``checkpoints/`` instead)."""
    p = Path(path)
    return p.is_file() or (p.is_dir() and (iteration_of(p) >= 0 or any(
        (p / f).exists() for f in (MANIFEST, META, DCP_METADATA))))


def _complete(path: Path) -> bool:
    """Cheap intactness for pruning: manifest and byte counts (no hashing)."""
    try:
        verify(path, hashes=False) if path.is_dir() else None
    except DamagedCheckpoint:
        return False
    return True


def prune(folder: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (at least one); delete every other
    checkpoint, damaged ones included, and temp folders left by killed writes."""
    found = checkpoints(folder)
    keep = [p for p in found if _complete(p)][-max(keep_last, 1):]
    if not keep:
        return
    for old in [p for p in found if p not in keep] + list(Path(folder).glob("iter_*.tmp")):
        shutil.rmtree(old) if old.is_dir() else old.unlink()


# ----------------------------------------------------------------------------- loading
def load_checkpoint(path: Path, check: bool = True) -> dict[str, Any]:
    """A checkpoint as one plain dict on the CPU, for every format: `read_meta`'s entries plus
    ``policy`` {name: tensor}, ``ema`` ({name: tensor} or None) and ``optimizer`` (keyed by
    parameter name, see `optimizer_by_name`). ``check``: verify the manifest first (skip only
    right after `find_checkpoint`). Raises `CheckpointError` for anything that is not an
    intact checkpoint."""
    path = Path(path)
    if not path.exists():
        raise NoCheckpoint(f"no checkpoint at {path}")
    if not path.is_dir():
        return _load_legacy(path)
    if check:
        verify(path)
    meta = read_meta(path)
    try:
        if meta["layout"] == "dcp":
            from .checkpoint_dcp import load_dcp_full

            full = load_dcp_full(path)
            model, state, ema = full["model"], full["optim"]["state"], full.get("ema")
        else:
            model, state, ema = _load_folder_tensors(path, meta)
        optimizer = join_optimizer(state, meta["optimizer"])
    except (KeyError, TypeError, ValueError) as e:
        raise DamagedCheckpoint(f"damaged checkpoint {path}: unreadable content "
                                f"({type(e).__name__}: {e})") from None
    return {**meta, "policy": model, "ema": ema, "optimizer": optimizer}


def is_dcp(path: Path) -> bool:
    """A checkpoint folder written by torchrun (DCP files)."""
    return Path(path).is_dir() and (Path(path) / DCP_METADATA).is_file()


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint folder's ``meta.json`` with ``rng`` as `rng_state` gives it (read from
    ``rng.safetensors`` and the JSON lists) and ``path``; no weights."""
    try:
        meta = json.loads((path / META).read_text())
        meta["rng"] = _rng_from_disk(_read_tensors(path / RNG), meta["rng"])
        missing = [k for k in ("iteration", "elapsed", "scheduler", "config", "metrics_lines",
                               "extra", "layout", "optimizer") if k not in meta]
        if missing:
            raise KeyError(f"no {missing}")
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise DamagedCheckpoint(f"damaged checkpoint {path}: unreadable {META} or {RNG} "
                                f"({type(e).__name__}: {e})") from None
    return {**meta, "path": path}


def _read_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _load_folder_tensors(path: Path, meta: dict[str, Any]) -> tuple[dict, dict, dict | None]:
    model = _read_tensors(path / MODEL)
    state: dict[str, dict[str, Tensor]] = {}
    for key, v in _read_tensors(path / OPTIMIZER).items():
        name, _, k = key.rpartition("/")
        state.setdefault(name, {})[k] = v
    ema = _read_tensors(path / EMA) if meta.get("has_ema") else None
    return model, state, ema


def _numpy_globals() -> list[Any]:
    """numpy's array globals an old checkpoint's numpy RNG state needs, and nothing else
    (under both of the names numpy 1 and 2 pickle them with)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct")]


def error_summary(e: Exception) -> str:
    """The informative line of an error (for torch.load: what the unpickler refused)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    for i, x in enumerate(lines):
        if "WeightsUnpickler error" in x:
            rest = x.split("WeightsUnpickler error:", 1)[-1].strip()
            return (rest or (lines[i + 1] if i + 1 < len(lines) else ""))[:200]
    return lines[0][:200] if lines else type(e).__name__


def _load_legacy(path: Path) -> dict[str, Any]:
    """An old single-file ``iter_NNNNNN.pt`` checkpoint, read without running code and
    converted to `load_checkpoint`'s dict."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            st = torch.load(path, map_location="cpu", weights_only=True)
        names = list(st["policy"])
        out = {k: st.get(k) for k in ("iteration", "elapsed", "scheduler", "config",
                                      "metrics_lines", "extra")}
        ema = st.get("ema")
        return {**out, "threads": None, "param_names": names, "policy": st["policy"],
                "ema": None if ema is None else dict(zip(names, ema, strict=True)),
                "optimizer": optimizer_by_name(st["optimizer"], names), "rng": st["rng"],
                "path": path}
    except Exception as e:  # any unpickling / zip / structure error
        raise DamagedCheckpoint(
            f"damaged or foreign checkpoint {path}: it cannot be read as data "
            f"({error_summary(e)}); old .pt checkpoints are read with weights_only=True "
            "(tensors and the numpy RNG state only), nothing else is unpickled") from None


def shapes(tensors: Iterable[tuple[str, Any]]) -> dict[str, torch.Size]:
    """{name: shape} of (name, tensor) pairs (global shapes for DTensors)."""
    return {k: torch.Size(v.shape) for k, v in tensors}


# ----------------------------------------------------------------------------- a run
@dataclass
class Trained:
    """The parts of a run a checkpoint saves and restores: ``module`` (the unwrapped module
    holding the trained parameters, `branchgrpo.models.families.module_of`), the optimizer
    over ``params`` (named ``names``), its LR schedule and the EMA copies of ``params`` (or
    None); ``device``: where the EMA lives."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[Tensor]
    names: list[str]
    ema: list[Tensor] | None
    device: torch.device

    def shapes(self) -> dict[str, torch.Size]:
        return dict(zip(self.names, (torch.Size(p.shape) for p in self.params), strict=True))


def save(run_dir: Path, iteration: int, t: Trained, meta: dict[str, Any], keep_last: int,
         d: dist.Dist) -> Path:
    """Write the checkpoint of ``iteration`` (collective under torchrun: DCP shards, see the
    module docstring); ``meta``: the run's JSON-safe state (clock, config, metrics lines,
    ...), to which the LR schedule and parameter names are added."""
    meta = {"iteration": iteration, **meta, "scheduler": t.scheduler.state_dict(),
            "param_names": t.names}
    ema = None if t.ema is None else dict(zip(t.names, t.ema, strict=True))
    if d.enabled:
        from .checkpoint_dcp import save_distributed

        return save_distributed(run_dir, iteration, meta, t.module, t.optimizer, ema,
                                keep_last, d.main)
    optim = optimizer_by_name(t.optimizer.state_dict(), t.names)
    return save_checkpoint(run_dir, iteration, meta, trainable_state(t.module), optim, ema,
                           keep_last)


def pick_checkpoint(run_dir: Path, d: dist.Dist, checkpoint_every: int) -> Path:
    """Rank 0 picks the newest intact checkpoint (one warning line per damaged newer one) and
    tells every rank; raises `CheckpointError` on every rank when there is none."""
    found: tuple[str, str] = ("", "")
    if d.main:
        hint = (f" (log.checkpoint_every={checkpoint_every}); start it again without "
                "--resume")
        try:
            path, damaged = find_checkpoint(run_dir, hint=hint)
            for line in damaged:
                print(f"warning: {line}; resuming from {path.name} instead", file=sys.stderr)
            found = (str(path), "")
        except CheckpointError as e:
            found = ("", str(e))
    path, error = dist.broadcast(d, found)
    if error:
        raise CheckpointError(error)
    return Path(path)


def restore(path: Path, t: Trained, d: dist.Dist) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``t`` (weights, optimizer, EMA in place, LR
    schedule) and the global RNGs after checking it fits the model; writes nothing. Returns
    its metadata (iteration, elapsed, extra, metrics lines, ...)."""
    expected = t.shapes()
    if d.enabled and is_dcp(path):
        from .checkpoint_dcp import restore_dcp

        st = restore_dcp(path, t, expected)
    else:
        st = load_checkpoint(path, check=False)
        check_fits(st["policy"], expected, f"checkpoint {path}")
        if st["ema"] is not None:
            check_fits(st["ema"], expected, f"the EMA of checkpoint {path}")
        if d.enabled:
            from .checkpoint_dcp import restore_full

            restore_full(st, t, expected)
        else:
            _restore_single(st, t, expected)
    t.scheduler.load_state_dict(st["scheduler"])
    set_rng_state(st["rng"])
    dist.print0(d, f"resumed from {path} at iteration {st['iteration']}")
    threads = st.get("threads")
    if d.main and threads is not None and threads != torch.get_num_threads():
        print(f"warning: {path.name} was written with {threads} torch threads, this run "
              f"has {torch.get_num_threads()}: the resumed run is valid, but a bit-exact "
              f"resume needs the same count (e.g. OMP_NUM_THREADS={threads})", file=sys.stderr)
    return st


def _restore_single(st: dict[str, Any], t: Trained, expected: dict[str, torch.Size]) -> None:
    """A checkpoint of any format (as full tensors) into a single-process run."""
    optim = optimizer_by_index(st["optimizer"], t.names, expected)
    load_trainable_state(t.module, st["policy"])
    t.optimizer.load_state_dict(optim)
    if st["ema"] is not None and t.ema is not None:
        with torch.no_grad():
            for e, n in zip(t.ema, t.names, strict=True):
                e.copy_(st["ema"][n])

"""Checkpoints of torchrun runs: torch.distributed.checkpoint (DCP) folders written by every
rank, restored into a run on any number of ranks, and read without running code.

DCP pickles its ``.metadata`` and would unpickle any non-tensor entry with ``torch.load``
(``weights_only`` off). Here ``.metadata`` is read by an unpickler that allows only DCP's own
metadata classes, ``torch.Size``, dtypes and layouts, and the load planner refuses
non-tensor entries; tensors are read by DCP itself (``torch.load`` with ``weights_only``).
"""

from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ck
from .checkpoint import (
    DCP_METADATA,
    CheckpointError,
    DamagedCheckpoint,
    Trained,
    error_summary,
)

_DCP_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
     ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "Path")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` allowing only its own metadata classes and dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_ALLOWED or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not DCP metadata")


def _safe_reader(path: Path) -> Any:
    """A DCP FileSystemReader whose metadata is read through `_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            try:
                with open(Path(path) / DCP_METADATA, "rb") as fh:
                    md = _MetadataUnpickler(fh).load()
            except Exception as e:  # unpickling / truncation
                raise DamagedCheckpoint(f"damaged checkpoint {path}: {DCP_METADATA} is not "
                                        f"DCP metadata ({e})") from None
            if not isinstance(md, Metadata):
                raise DamagedCheckpoint(f"damaged checkpoint {path}: {DCP_METADATA} is not "
                                        "DCP metadata")
            md.storage_meta = md.storage_meta or StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return Reader(str(path))


def _tensor_planner() -> Any:
    """DCP's default load planner, refusing non-tensor entries (DCP would unpickle them)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            raise DamagedCheckpoint(f"the checkpoint stores {read_item.dest_index.fqn} as a "
                                    "pickled object, not a tensor")

    return Planner()


def dcp_metadata(path: Path) -> dict[tuple, Any]:
    """{unflattened key path, e.g. ("model", name): TensorStorageMetadata} of a DCP folder."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = _safe_reader(path).read_metadata()
    return {tuple(md.planner_data[k]): m for k, m in md.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)}


def load_dcp(tensors: dict[str, Any], path: Path, no_dist: bool = False) -> None:
    """``dcp.load`` of the tensors in ``tensors`` (nested, possibly DTensors) from ``path``,
    in place, through the allow-listed reader; collective unless ``no_dist``."""
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")  # no_dist
            dcp.load(tensors, storage_reader=_safe_reader(path), planner=_tensor_planner(),
                     no_dist=no_dist)
    except CheckpointError:
        raise
    except Exception as e:  # DCP wraps rank errors in its own exception
        raise CheckpointError(f"checkpoint {path} does not load into this run: "
                              f"{error_summary(e)}") from None


def load_dcp_full(path: Path) -> dict[str, Any]:
    """Every tensor of a DCP folder as full CPU tensors, nested as saved (``model``,
    ``optim``/``state``, ``ema``); one process, no process group."""
    flat: dict[str, Any] = {}
    for keys, m in dcp_metadata(path).items():
        d = flat
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = torch.empty(m.size, dtype=m.properties.dtype)
    load_dcp(flat, path, no_dist=True)
    return flat


def save_distributed(run_dir: Path, iteration: int, meta: dict[str, Any], module: nn.Module,
                     optimizer: torch.optim.Optimizer, ema: dict[str, Any] | None,
                     keep_last: int, main: bool) -> Path:
    """Collective: every rank writes its shards of the trained weights of ``module`` and the
    ``optimizer`` state (name-keyed, as `get_state_dict` gives them; DTensors or replicated
    tensors) and of ``ema`` with DCP into ``iter_<iteration>.tmp/``; rank 0 (``main``) adds
    ``rng.safetensors``, ``meta.json`` and the manifest, renames the folder after a barrier and
    prunes; a second barrier makes the result visible to every rank. Only tensors go through
    DCP (it pickles anything else)."""
    import torch.distributed as td
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(module, optimizer, options=_dcp_options())
    path, tmp = ck.temp_folder(run_dir, iteration)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    td.barrier()
    state, optim_js = ck.split_optimizer(optim)
    tensors: dict[str, Any] = {"model": model, "optim": {"state": state}}
    if ema is not None:
        tensors["ema"] = ema
    dcp.save(tensors, checkpoint_id=str(tmp))
    if main:
        ck.write_extras(tmp, {**meta, "layout": "dcp", "has_ema": ema is not None}, optim_js)
    td.barrier()
    if main:
        ck.publish(tmp, path, keep_last)
    td.barrier()
    return path


def restore_dcp(path: Path, t: Trained, expected: dict[str, torch.Size]) -> dict[str, Any]:
    """Load a DCP folder into this run's (wrapped or sharded) module, optimizer and EMA: DCP
    reshards to the current rank count. Returns the metadata (``meta.json``, RNG)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    saved = {k[1]: m.size for k, m in dcp_metadata(path).items() if k[0] == "model"}
    ck.check_fits(saved, expected, f"checkpoint {path}")
    meta = ck.read_meta(path)
    module = t.module
    model, optim = get_state_dict(module, t.optimizer, options=_dcp_options())
    state = {n: {k: v for k, v in st.items() if isinstance(v, torch.Tensor)}
             for n, st in optim["state"].items()}
    tensors = {"model": model, "optim": {"state": state}}
    if t.ema is not None and meta["has_ema"]:
        tensors["ema"] = dict(zip(t.names, t.ema, strict=True))
    load_dcp(tensors, path)
    optim = ck.join_optimizer(tensors["optim"]["state"], meta["optimizer"])
    set_state_dict(module, t.optimizer, model_state_dict=tensors["model"],
                   optim_state_dict=optim, options=_dcp_options())
    return meta


def restore_full(st: dict[str, Any], t: Trained, expected: dict[str, torch.Size]) -> None:
    """A single-process checkpoint (full tensors on every rank) into a multi-rank run, sharded
    (FSDP) or copied (DDP) by ``set_state_dict``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    ck.optimizer_by_index(st["optimizer"], t.names, expected)  # check only
    set_state_dict(t.module, t.optimizer, model_state_dict=st["policy"],
                   optim_state_dict=st["optimizer"],
                   options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True,
                                            strict=False))
    if st["ema"] is not None and t.ema is not None:
        with torch.no_grad():
            for e, n in zip(t.ema, t.names, strict=True):
                full = st["ema"][n].to(e.device, e.dtype)
                if isinstance(e, DTensor):  # FSDP: keep this rank's shard
                    full = distribute_tensor(full, e.device_mesh, e.placements)
                e.copy_(full)


def _dcp_options() -> Any:
    """Trainable weights only (frozen base weights reload from the model); non-strict load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)

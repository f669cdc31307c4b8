"""Reading torch.distributed.checkpoint (DCP) folders without running code.

DCP pickles its ``.metadata`` and would unpickle any non-tensor entry with ``torch.load``
(``weights_only`` off). Here ``.metadata`` is read by an unpickler that allows only DCP's own
metadata classes, ``torch.Size``, dtypes and layouts, and the load planner refuses
non-tensor entries; tensors are read by DCP itself (``torch.load`` with ``weights_only``).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from .checkpoint import DCP_METADATA, CheckpointError, DamagedCheckpoint, error_summary

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

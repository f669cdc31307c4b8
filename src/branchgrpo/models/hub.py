"""Hugging Face Hub resolution: a local folder for a checkpoint id or path, or a
`ModelNotAvailableError` within seconds that says what to do (offline, no network, gated or
unknown repository). Loading the pipeline from that folder is `branchgrpo.models.loading`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


class ModelNotAvailableError(RuntimeError):
    """A checkpoint is neither a local folder nor in the Hugging Face cache, and cannot be
    downloaded now (offline, no network, gated or unknown repository)."""


def _offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    from huggingface_hub import constants

    return env or bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the Hub endpoint (seconds, not the minutes of a stalled download)."""
    from huggingface_hub import constants

    url = urlparse(os.environ.get("HF_ENDPOINT", constants.ENDPOINT))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def advice(model_id: str, why: str) -> str:
    """The message of a `ModelNotAvailableError` for ``model_id``: why, and what to do."""
    return (f"cannot load {model_id!r}: {why}.\nDownload it first on a machine with network "
            f"access: `hf download {model_id}` (older clients: `huggingface-cli download "
            f"{model_id}`; gated models such as FLUX.1-dev also need `hf auth login` and "
            f"accepting the licence on huggingface.co), then run again, or pass the path of a "
            f"local folder in the diffusers layout (model_index.json, transformer/, vae/, ...) "
            f"instead of the id.")


def resolve_checkpoint(
    model_id_or_path: str | os.PathLike, subfolders: Sequence[str] = (),
    cache_dir: str | os.PathLike | None = None, optional: Sequence[str] = (),
    configs_only: Sequence[str] = (),
) -> str:
    """A local folder for ``model_id_or_path``: the folder itself, the cached snapshot, or a
    fresh download of the needed ``subfolders`` when the Hub is reachable. ``optional``
    subfolders are downloaded when the repository has them and not required in a local folder
    (Wan2.2's ``transformer_2``: the A14B checkpoints have it, TI2V-5B does not).
    ``configs_only``: subfolders of which only the JSON files are fetched, not required in a
    local folder (``branchgrpo encode`` builds the transformer and VAE from their configs; it
    reads no weight of theirs).

    Raises `ModelNotAvailableError` within seconds when none of these works (the caller sees
    what to do, not a stack trace after a long network timeout)."""
    p = Path(model_id_or_path).expanduser()
    if p.is_dir():
        missing = [s for s in subfolders if not (p / s).is_dir()]
        if missing:
            raise ModelNotAvailableError(
                f"local checkpoint {str(p)!r} lacks the subfolder(s) {missing}; pass a folder "
                f"in the diffusers layout (as written by `pipeline.save_pretrained`)")
        return str(p)
    repo = str(model_id_or_path)
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise ModelNotAvailableError(advice(repo, "no such local folder, and not a Hub id "
                                                   "of the form 'owner/name'"))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    patterns = (["model_index.json"] + [f"{s}/*" for s in (*subfolders, *optional)]
                + [f"{s}/*.json" for s in configs_only]
                if subfolders or configs_only else None)
    kw: dict[str, Any] = {"cache_dir": cache_dir, "allow_patterns": patterns}
    try:
        return str(snapshot_download(repo, local_files_only=True, **kw))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        pass
    if _offline():
        raise ModelNotAvailableError(advice(repo, "it is not in the local Hugging Face cache "
                                                   "and HF_HUB_OFFLINE is set"))
    if not _hub_reachable():
        raise ModelNotAvailableError(advice(repo, "it is not in the local Hugging Face cache "
                                                   "and the Hub cannot be reached"))
    try:
        return str(snapshot_download(repo, **kw))
    except GatedRepoError as e:
        raise ModelNotAvailableError(advice(repo, "the repository is gated")) from e
    except RepositoryNotFoundError as e:
        raise ModelNotAvailableError(advice(repo, "no such repository on the Hub")) from e
    except OSError as e:
        raise ModelNotAvailableError(advice(repo, f"the download failed ({e})")) from e

"""Model tests run offline on CPU with tiny random components: no Hugging Face downloads
(the root conftest sets offline mode and one thread per test). `replica` builds each complete
replica checkpoint (`branchgrpo.models.testing.write_replica_pipeline`) once per session."""

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def replica(tmp_path_factory) -> Callable[..., Path]:
    """``replica(kind, **scheduler_overrides)`` -> the folder of that replica pipeline, written
    on first use and shared by every test of the session (treat it as read-only)."""
    from branchgrpo.models.testing import write_replica_pipeline

    built: dict[tuple, Path] = {}

    def get(kind: str, **scheduler: float) -> Path:
        key = (kind, *sorted(scheduler.items()))
        if key not in built:
            name = "-".join(f"{k}{v}" for k, v in key[1:])
            folder = tmp_path_factory.mktemp(f"replica-{kind}{'-' + name if name else ''}")
            built[key] = write_replica_pipeline(kind, folder, scheduler or None)
        return built[key]

    return get

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The processes tests start (CLI runs, torchrun ranks, benches) run one thread each unless the
# caller set OMP_NUM_THREADS: beside a second pytest-xdist worker, a subprocess on two OpenMP
# threads spins on a busy core and ran bench credit's CLI test 10x slower (30 s -> 5 min).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and a busy 2-core machine does not thrash."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A model cache holding a quickly trained shapes judge (end-to-end training tests)."""
    from branchgrpo.tasks.shapes_reward import train_judge

    d = tmp_path_factory.mktemp("cache")
    from safetensors.torch import save_model

    save_model(train_judge(steps=10, batch=16), str(d / "shapes_judge.safetensors"))
    return d

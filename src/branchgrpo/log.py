"""Run logging: stdout, ``metrics.jsonl`` (one line per iteration), TensorBoard and, with
``log.wandb=true``, Weights & Biases (`WandbLog`)."""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class Timer:
    """Wall time of named phases (``time/rollout``, ``time/update``, ...)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        import torch

        t0 = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + (
            time.perf_counter() - t0)


class WandbLog:
    """A Weights & Biases run beside ``metrics.jsonl``: the same numeric scalars at the same
    steps (the iteration), the held-out sample grids and, at the end, the report's plots.

    The run lives in ``RUN/wandb/`` and is grouped under the run directory's name; each
    (re)start of the run is a wandb run of its own (``RUN``, ``RUN-resume1``, ...), because a
    resumed run logs again the iterations after its checkpoint, which wandb would drop from
    the first one's history. ``WANDB_MODE=offline`` writes it without a network (``wandb
    sync`` uploads it later)."""

    def __init__(self, run_dir: Path, project: str, config: dict[str, Any]) -> None:
        import wandb

        root = Path(run_dir)
        (root / "wandb").mkdir(parents=True, exist_ok=True)
        starts = len(list((root / "wandb").glob("*run-*")))
        name = root.name if starts == 0 else f"{root.name}-resume{starts}"
        self.run = wandb.init(project=project, dir=str(root), group=root.name, name=name,
                              config=config)

    def log(self, step: int, row: dict[str, Any]) -> None:
        """The numeric values of one ``metrics.jsonl`` row at ``step``."""
        self.run.log({k: v for k, v in row.items() if _scalar(v) and k != "iteration"},
                     step=step)

    def images(self, step: int, images: dict[str, Path]) -> None:
        """PNG files under their keys (``samples/after``, ``plots/heldout``) at ``step``."""
        import wandb

        self.run.log({k: wandb.Image(str(p)) for k, p in images.items() if Path(p).exists()},
                     step=step)

    def close(self) -> None:
        self.run.finish()


class RunLogger:
    """Appends metrics to ``metrics.jsonl``, TensorBoard and wandb (each when enabled).
    ``enabled=False`` (ranks other than 0) writes nothing; ``wandb_project`` (not None) starts
    a `WandbLog` of the run with ``config``."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True,
                 wandb_project: str | None = None, config: dict[str, Any] | None = None,
                 ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        self.wandb = (WandbLog(run_dir, wandb_project, config or {})
                      if enabled and wandb_project is not None else None)
        if tensorboard and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def truncate(self, lines: int) -> None:
        """Keep the first ``lines`` lines (a resumed run drops what followed its checkpoint)."""
        if self.enabled and self.path.exists():
            kept = self.path.read_text().splitlines()[:lines]
            self.path.write_text("".join(x + "\n" for x in kept))

    def lines(self) -> int:
        return len(self.path.read_text().splitlines()) if self.path.exists() else 0

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"iteration": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row, allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if _scalar(v) and k != "iteration":
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(step, row)

    def images(self, step: int, images: dict[str, Path]) -> None:
        """Image files for the loggers that show images (wandb); ``metrics.jsonl`` and
        TensorBoard keep scalars only (the PNGs are in the run directory)."""
        if self.wandb is not None:
            self.wandb.images(step, images)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _plain(v: Any) -> Any:
    """A JSON value: numbers as float (NaN and inf as null, so every line stays strict JSON
    that any parser reads), strings, bools and ints as they are, anything else as text."""
    if isinstance(v, (str, bool, int)):
        return v
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    return x if math.isfinite(x) else None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def split_evals(rows: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out evaluation rows) of ``metrics.jsonl``: evaluations carry
    ``eval/tag``."""
    evals = [r for r in rows if "eval/tag" in r]
    return [r for r in rows if "eval/tag" not in r], evals

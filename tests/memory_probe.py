"""Measure the peak memory of one training iteration in this process (run it as a script:
``python tests/memory_probe.py key=value ...``; `tests/test_memory.py` does, in a subprocess).

Measured: the peak resident set (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) minus the
resident set after the imports (``/proc/self/statm``), i.e. what building the policy and one
iteration (rollout, decode, reward, update with its optimizer states) added. Prints one JSON
object: that delta and `branchgrpo.memory`'s estimate of the same run, in bytes."""

from __future__ import annotations

import json
import os
import resource
import sys


def resident() -> int:
    """The current resident set of this process in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(overrides: list[str]) -> dict[str, float]:
    # imported before the baseline: the libraries' own memory is not the run's
    import diffusers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from branchgrpo.config import load_config
    from branchgrpo.memory import GIB
    from branchgrpo.plan_report import plan_report
    from branchgrpo.train import iteration, setup

    cfg = load_config(None, overrides)
    est = plan_report(cfg)["memory"]
    _import_model_code(cfg.model.kind)
    base = resident()
    s = setup(cfg, None)
    iteration(s)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"measured": peak, "estimated": est["peak_gib"] * GIB,
            "phase": est["phase"], "parts": est["parts_gib"], "phases": est["phases_gib"]}


def _import_model_code(kind: str) -> None:
    """Import the code the run will (peft, the family's module and diffusers pipeline), so
    its modules are in the baseline, not in the measured delta."""
    if kind == "tiny":
        return
    import diffusers
    import peft  # noqa: F401

    from branchgrpo.models.families import family_class, family_module

    family_module(kind)
    getattr(diffusers, family_class(kind).pipeline_name)


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))

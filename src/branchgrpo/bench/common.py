"""What every bench shares: the machine it ran on, Markdown tables, the benchmark policies."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

import torch

from ..models.analytic import GaussianPolicy


def machine() -> dict[str, Any]:
    """CPU model, cores, torch version and threads, accelerator."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}


def markdown(rows: list[dict]) -> str:
    """Rows of dicts as a Markdown table."""
    if not rows:
        return ""
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(out)


def bench_policy(model: str, trees: int, device: torch.device):
    """(policy, cond) for the benchmarks: ``tiny`` (the embedded default's architecture,
    random weights), ``analytic``, or ``flux-dev`` (the FLUX.1-dev transformer with random bf16
    weights at 512x512, LoRA rank 32, gradient checkpointing; no text encoders or VAE)."""
    from ..tasks.shapes import all_specs

    prompts = [all_specs()[i % 64].prompt for i in range(trees)]
    if model == "tiny":
        from ..models.tiny import TinyFluxPolicy

        policy = TinyFluxPolicy().to(device).eval()
    elif model == "analytic":
        policy = GaussianPolicy(dim=48).to(device)
    elif model == "flux-dev":
        from diffusers import FluxTransformer2DModel

        from ..models.flux import flux_dev_config, from_transformer
        from ..models.lora import LoraSpec

        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN attention backward fails (cu130)
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                tr = FluxTransformer2DModel(**flux_dev_config())
        finally:
            torch.set_default_dtype(torch.float32)
        policy = from_transformer(tr, 512, 512, dtype=torch.bfloat16, device=device,
                                  lora=LoraSpec(rank=32, alpha=64), gradient_checkpointing=True)
    else:
        raise ValueError(f"unknown bench model {model!r}; use tiny, analytic or flux-dev")
    return policy, policy.encode(prompts), prompts

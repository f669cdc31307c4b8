"""Using a trained checkpoint: ``branchgrpo sample`` and ``branchgrpo eval``."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .config import Config, ConfigError, load_config
from .evaluate import evaluate, sample, save_grid
from .models.factory import build_policy, load_prompts
from .models.families import module_of
from .preflight import check_prompts, check_rewards
from .spec import model_options


def resolve_checkpoint(target: str | Path) -> Path:
    """A checkpoint (folder or old ``.pt`` file), verified, or the newest intact checkpoint of
    a run directory (one warning line on stderr per damaged newer one). Raises
    `checkpoint.CheckpointError` when there is none."""
    p = Path(target)
    if ckpt.is_checkpoint(p):
        if p.is_dir():
            ckpt.verify(p)
        return p
    if not ((p / "checkpoints").is_dir() or (p / "config.yaml").is_file()):
        raise ckpt.NoCheckpoint(f"{target} is neither a checkpoint nor a run directory with "
                                "checkpoints/iter_*")
    path, damaged = ckpt.find_checkpoint(p, hint=": nothing trained to load yet")
    for line in damaged:
        print(f"warning: {line}; using {path.name} instead", file=sys.stderr)
    return path


def load_trained(target: str | Path, prompts: list[str] | None = None,
                 ) -> tuple[Any, Config, dict, torch.device]:
    """(policy with trained weights (EMA if kept), config, checkpoint state, device). Raises
    `checkpoint.CheckpointError` for a missing, damaged or mismatched checkpoint, and
    `ConfigError` before the model loads when the rewards or ``prompts`` do not fit it (or,
    with ``model.prompt_embeddings``, are not in that file: ``prompts``, else the held-out
    prompts)."""
    path = resolve_checkpoint(target)
    state = ckpt.load_checkpoint(path, check=False)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        fh.write(str(state["config"]))
    try:
        cfg = load_config(fh.name)
    except ConfigError as e:
        raise ckpt.CheckpointError(f"the config stored in {path} does not load: {e}") from None
    finally:
        Path(fh.name).unlink()
    check_rewards(cfg)
    if prompts is not None:
        check_prompts(cfg, prompts, "--prompt {line}", scored=False)
    if cfg.model.prompt_embeddings:  # the prompts to encode must be in the file
        from .encode import check_prompt_embeddings

        todo = prompts if prompts is not None else load_prompts(cfg.data.prompts,
                                                                cfg.data.eval_prompts)[1]
        check_prompt_embeddings(cfg, todo, "--prompt" if prompts is not None
                                else "data.eval_prompts")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = build_policy(model_options(cfg, progress=False), device)
    module = module_of(policy)
    ids = {id(p) for p in policy.trainable_parameters()}
    expected = ckpt.shapes((n, p) for n, p in module.named_parameters() if id(p) in ids)
    weights = state["ema"] if state.get("ema") is not None else state["policy"]
    ckpt.check_fits(weights, expected, f"checkpoint {path}")
    ckpt.load_trainable_state(module, weights)
    module.eval()
    return policy, cfg, state, device


def _load_or_report(target: str, prompts: list[str] | None = None,
                    ) -> tuple[Any, Config, dict, torch.device] | None:
    """`load_trained`, or None after printing its one-line error on stderr."""
    try:
        return load_trained(target, prompts)
    except ckpt.CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return None


def _sigmas(cfg: Config) -> torch.Tensor:
    from .spec import resolve

    return torch.tensor(resolve(cfg).sigmas)


def default_sample_dir(target: str | Path) -> Path:
    """A new ``RUN/samples/sample_NNN`` folder (next free number) for ``target``: a run
    directory (RUN) or a checkpoint inside one (``RUN/checkpoints/iter_*``); a checkpoint
    outside a run directory gets ``samples/sample_NNN`` beside it."""
    p = Path(target).resolve()
    if ckpt.is_checkpoint(p):
        run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    else:
        run = p
    root = run / "samples"
    taken = {int(p.name[7:]) for p in root.glob("sample_*") if p.name[7:].isdigit()}
    return root / f"sample_{max(taken, default=-1) + 1:03d}"


def sample_command(target: str, prompts: list[str], out: str | None, n: int, seed: int) -> int:
    """Write ``n`` PNG images per prompt and a grid into ``out`` (None: `default_sample_dir`
    of the checkpoint, inside its run directory)."""
    from PIL import Image

    loaded = _load_or_report(target, prompts)
    if loaded is None:
        return 2
    policy, cfg, state, device = loaded
    todo = [p for p in prompts for _ in range(n)]
    media = sample(policy, todo, _sigmas(cfg), seed=seed, device=device)
    folder = Path(out) if out is not None else default_sample_dir(target)
    folder.mkdir(parents=True, exist_ok=True)
    frames = media if media.dim() == 4 else media[:, 0]
    for i, (img, p) in enumerate(zip(frames, todo, strict=True)):
        arr = (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
        name = f"{i:03d}_" + "".join(c if c.isalnum() else "_" for c in p)[:60] + ".png"
        Image.fromarray(arr).save(folder / name)
    save_grid(media, todo, folder / "grid.png", n=min(len(todo), 32))
    print(f"wrote {len(todo)} images to {folder} (iteration {state['iteration']})")
    return 0


def eval_command(target: str, samples: int, as_json: bool) -> int:
    """Held-out prompts scored by the judge and every configured reward; prints a table."""
    from . import scoring

    loaded = _load_or_report(target)
    if loaded is None:
        return 2
    policy, cfg, state, device = loaded
    _, held = load_prompts(cfg.data.prompts, cfg.data.eval_prompts)
    n = samples or cfg.data.eval_samples
    prompts = [held[i % len(held)] for i in range(n)]
    scorers: dict[str, Any] = {}
    judge = scoring.judge(cfg)
    if judge is not None:
        scorers["judge"] = judge
    scorers |= scoring.reward_set(cfg).rewards
    metrics, _ = evaluate(policy, prompts, _sigmas(cfg), scorers, seed=cfg.train.seed + 10_000,
                          device=device)
    metrics = {"iteration": state["iteration"], "samples": n, **metrics}
    if as_json:
        print(json.dumps(metrics, indent=2))
    else:
        print("| metric | value |\n|---|---|")
        for k, v in metrics.items():
            print(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return 0

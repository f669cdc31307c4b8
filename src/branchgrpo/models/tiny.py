"""The embedded default's policy: a tiny `diffusers.FluxTransformer2DModel` in pixel space.

Images [3, 16, 16] in [-1, 1] are packed 2x2 into 64 tokens of 12 channels exactly as FLUX
packs its VAE latents, so the default runs the same transformer code path as the real FLUX
backend. The text encoder is a small word-embedding encoder over the task's closed vocabulary,
trained together with the transformer during a brief flow-matching pretraining and frozen for
RL. (A pretrained sentence encoder from PyPI would add ~90 MB and knows nothing the 17-word
grammar needs.) Pretraining is cached by configuration after the first run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from torch import Tensor, nn

from ..tasks import shapes
from .base import Cond

if TYPE_CHECKING:
    from .factory import ModelOptions


@dataclass(frozen=True)
class TinySpec:
    """Architecture and pretraining budget of the tiny policy (part of the cache key)."""

    layers: int = 2
    single_layers: int = 2
    heads: int = 4
    head_dim: int = 16
    text_dim: int = 64
    pretrain_steps: int = 8000
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3
    clutter: float = 0.8
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def pack(img: Tensor) -> Tensor:
    """[N, C, H, W] -> [N, (H/2)(W/2), 4C] (FLUX's 2x2 latent packing)."""
    n, c, h, w = img.shape
    x = img.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(x: Tensor, c: int = 3, h: int = shapes.SIZE, w: int = shapes.SIZE) -> Tensor:
    """Inverse of `pack`: [N, (H/2)(W/2), 4C] -> [N, C, H, W]."""
    n = x.shape[0]
    x = x.reshape(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c, h, w)


def image_ids(h: int = shapes.SIZE // 2, w: int = shapes.SIZE // 2) -> Tensor:
    """FLUX's positional ids of the packed image tokens [h w, 3]: (0, row, col)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


class WordEncoder(nn.Module):
    """Word embeddings + positions over the task vocabulary: ids [B, L] -> ([B, L, D], [B, D])."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(len(shapes.VOCAB), dim)
        self.pos = nn.Parameter(torch.randn(shapes.MAX_WORDS, dim) * 0.02)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        mask = (ids > 0).float()[..., None]
        seq = (self.emb(ids) + self.pos) * mask
        return seq, seq.sum(1) / mask.sum(1).clamp_min(1)


class TinyFluxPolicy(nn.Module):
    """Policy protocol over packed 16x16 images; latents [N, 64, 12]."""

    latent_shape = (64, 12)
    token_period = 2  # pixels per packed token side (2x2 packing)

    def __init__(self, spec: TinySpec = TinySpec()) -> None:
        super().__init__()
        self.spec = spec
        dim = spec.heads * spec.head_dim
        rope = (spec.head_dim - 2 * (spec.head_dim * 3 // 8), spec.head_dim * 3 // 8,
                spec.head_dim * 3 // 8)
        self.transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=12, num_layers=spec.layers,
            num_single_layers=spec.single_layers, attention_head_dim=spec.head_dim,
            num_attention_heads=spec.heads, joint_attention_dim=spec.text_dim,
            pooled_projection_dim=spec.text_dim, guidance_embeds=False, axes_dims_rope=rope)
        assert dim == self.transformer.inner_dim
        self.text = WordEncoder(spec.text_dim)
        self.register_buffer("img_ids", image_ids(), persistent=False)
        self.register_buffer("txt_ids", torch.zeros(shapes.MAX_WORDS, 3), persistent=False)

    def encode(self, prompts: Sequence[str]) -> Cond:
        ids = shapes.tokenize(list(prompts)).to(self.img_ids.device)
        with torch.no_grad():
            seq, pooled = self.text(ids)
        return {"txt": seq, "pooled": pooled}

    def _forward(self, x: Tensor, sigma: Tensor, txt: Tensor, pooled: Tensor) -> Tensor:
        return self.transformer(hidden_states=x, encoder_hidden_states=txt,
                                pooled_projections=pooled, timestep=sigma.to(x.dtype),
                                img_ids=self.img_ids, txt_ids=self.txt_ids,
                                return_dict=False)[0]

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        return self._forward(x.float(), sigma, cond["txt"], cond["pooled"]).float()

    def decode(self, x0: Tensor) -> Tensor:
        return ((unpack(x0.float()) + 1) / 2).clamp(0, 1)

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """The transformer (the text encoder stays frozen during RL)."""
        return self.transformer.parameters()


def pretrain(spec: TinySpec, prompts: list[str], progress: bool = True) -> TinyFluxPolicy:
    """Brief rectified-flow pretraining on rendered images: x_sigma = (1 - sigma) x0 + sigma
    eps, target v = eps - x0, sigma ~ logit-normal; transformer and text encoder together."""
    with torch.random.fork_rng():  # its own seed, without resetting the caller's generator
        torch.manual_seed(spec.seed)
        return _pretrain(spec, prompts, progress)


def _pretrain(spec: TinySpec, prompts: list[str], progress: bool) -> TinyFluxPolicy:
    from tqdm import tqdm

    policy = TinyFluxPolicy(spec)
    opt = torch.optim.AdamW(policy.parameters(), lr=spec.pretrain_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, spec.pretrain_lr, spec.pretrain_steps,
                                                pct_start=0.1)
    rng = np.random.default_rng(spec.seed)
    bar = tqdm(range(spec.pretrain_steps), desc="base model pretraining", disable=not progress)
    for _ in bar:
        img, ps = shapes.sample_batch(spec.pretrain_batch, rng, prompts, spec.clutter)
        x0 = pack(img * 2 - 1)
        eps = torch.randn_like(x0)
        sigma = torch.sigmoid(torch.randn(len(ps)))
        x = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * eps
        seq, pooled = policy.text(shapes.tokenize(ps))
        loss = (policy._forward(x, sigma, seq, pooled) - (eps - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return policy.eval()


SHIPPED = Path(__file__).with_name("tiny_base.safetensors")
"""The base model the package ships (built by ``branchgrpo build-base``): the embedded default
loads it instead of pretraining, so its base is the same file on every machine."""


def shipped_spec(path: Path = SHIPPED) -> TinySpec | None:
    """The `TinySpec` a shipped base file was built with (its safetensors metadata), or None."""
    from safetensors import safe_open

    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return TinySpec(**json.loads(meta["spec"])) if "spec" in meta else None


def save_base(policy: TinyFluxPolicy, path: Path) -> Path:
    """Write ``policy`` as safetensors with its spec in the metadata (atomic rename)."""
    from safetensors.torch import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_model(policy, str(tmp), metadata={"spec": json.dumps(asdict(policy.spec),
                                                              sort_keys=True)})
    tmp.replace(path)
    return path


def load_or_pretrain(spec: TinySpec, cache_dir: Path, prompts: list[str],
                     progress: bool = True) -> TinyFluxPolicy:
    """The pretrained base policy: the shipped file when ``spec`` is the one it was built
    with, else from ``cache_dir`` (pretrained and saved on first use, as safetensors: data,
    not pickle)."""
    from safetensors.torch import load_model

    path = Path(cache_dir) / f"tiny_flux_{spec.key()}.safetensors"
    if spec == shipped_spec():
        path = SHIPPED
    if path.exists():
        policy = TinyFluxPolicy(spec)
        load_model(policy, path)
        return policy.eval()
    policy = pretrain(spec, prompts, progress)
    save_base(policy, path)
    return policy


def build(o: ModelOptions, device: torch.device) -> TinyFluxPolicy:
    """The registry's builder: the pretrained tiny policy of ``o`` (``pretrain_steps``,
    ``clutter``; cached under ``cache_dir``, pretrained on the training prompts of the shapes
    task on first use) on ``device``."""
    spec = TinySpec(pretrain_steps=o.pretrain_steps, clutter=o.clutter)
    policy = load_or_pretrain(spec, Path(o.cache_dir).expanduser(),
                              shapes.split_prompts()[0], o.progress)
    return policy.to(device)


def build_files(base: Path, judge: Path, spec: TinySpec = TinySpec(), judge_steps: int = 600,
                progress: bool = True) -> list[Path]:
    """Pretrain the base model of ``spec`` on the task's training prompts into ``base`` and
    train the judge (`train_judge`) into ``judge``, on one thread (float reductions round by
    thread count, so this makes the files reproducible on one CPU model)."""
    from ..tasks import shapes_reward as sr

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        save_base(pretrain(spec, shapes.split_prompts()[0], progress), Path(base))
        with torch.random.fork_rng():
            sr.save_judge(sr.train_judge(judge_steps, progress=progress), Path(judge))
    finally:
        torch.set_num_threads(threads)
    return [Path(base), Path(judge)]


def differing(new: Sequence[Path], old: Sequence[Path]) -> list[str]:
    """``file:tensor`` names that differ (or exist in one file only) between file pairs."""
    from safetensors.torch import load_file

    out = []
    for n, o in zip(new, old, strict=True):
        a, b = load_file(str(n)), load_file(str(o))
        out += [f"{n.name}:{k}" for k in sorted(set(a) | set(b))
                if k not in a or k not in b or not torch.equal(a[k], b[k])]
    return out


def build_shipped(out: Path | None = None, check: bool = False) -> int:
    """``branchgrpo build-base``: `build_files` where the package loads them (or into
    ``out``). ``check``: build into a temporary folder and report the tensors that differ
    from the shipped files. Returns the exit code (check: 0 when bit-identical)."""
    import tempfile

    from ..tasks.shapes_reward import SHIPPED_JUDGE

    shipped = [SHIPPED, SHIPPED_JUDGE]
    if check and not all(p.exists() for p in shipped):
        print(f"no shipped files to check against ({SHIPPED}, {SHIPPED_JUDGE})")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) if check else Path(out) if out else None
        targets = [folder / p.name for p in shipped] if folder else shipped
        files = build_files(*targets)
        print("wrote " + ", ".join(map(str, files)))
        if not check:
            return 0
        bad = differing(files, shipped)
        print(f"{len(bad)} tensors differ from the shipped files"
              + (f": {bad[:5]}" if bad else " (bit-identical)"))
        return 1 if bad else 0

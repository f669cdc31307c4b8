"""Deterministic user rewards, imported by dotted path in the tests (and by the server process)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torch import Tensor


def mean_pixel(media: Tensor, prompts: Sequence[str]) -> Tensor:
    """Mean intensity per sample plus the prompt length: [B]."""
    b = media.shape[0]
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.float32)
    return media.reshape(b, -1).float().mean(dim=1) + lengths


def nan_reward(media: Tensor, prompts: Sequence[str]) -> Tensor:
    """NaN for every second sample."""
    out = torch.zeros(media.shape[0])
    out[::2] = float("nan")
    return out


def scaled_factory(scale: float = 1.0):
    """A factory: built with kwargs, returns a reward."""

    def scaled(media: Tensor, prompts: Sequence[str]) -> Tensor:
        return scale * media.reshape(media.shape[0], -1).mean(dim=1)

    return scaled


class RankInGroup:
    """Groupwise: the rank (0..n-1) of each member's mean intensity within its group."""

    groupwise = True
    name = "rank"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        self.calls.append(media.shape[0])
        m = media.reshape(media.shape[0], -1).mean(dim=1)
        return torch.argsort(torch.argsort(m)).float()


def _bytes_to_unicode() -> list[str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip_tokenizer():
    """A byte-level CLIP BPE tokenizer: 512 byte tokens, 4 merges, <|startoftext|>=516,
    <|endoftext|>=517 (the highest id, as in CLIP, so argmax pooling finds it)."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    merges = [("h", "e"), ("he", "l"), ("hel", "l"), ("hell", "o</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    try:  # transformers >= 5
        return CLIPTokenizer(vocab=vocab, merges=merges)
    except TypeError:  # transformers 4.x takes files
        import tempfile

        d = tempfile.mkdtemp()
        with open(f"{d}/vocab.json", "w") as f:
            json.dump(vocab, f)
        with open(f"{d}/merges.txt", "w") as f:
            f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        return CLIPTokenizer(f"{d}/vocab.json", f"{d}/merges.txt")


def tiny_clip_config(act: str = "quick_gelu"):
    from transformers import CLIPConfig

    text = dict(
        vocab_size=520,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        hidden_act=act,
        bos_token_id=516,
        eos_token_id=517,
        pad_token_id=517,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        hidden_act=act,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)

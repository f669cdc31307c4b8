"""A prompt-embedding file: every prompt's conditioning, computed once by ``branchgrpo encode``
with the family's own ``encode`` and read back by a run with ``model.prompt_embeddings``, which
then never loads the text encoders (docs/small_gpu.md, "Prompt embeddings computed once").

Format (`FORMAT` 1): one safetensors file (data, not pickle). Tensor ``"{i}/{name}"`` is row
``name`` of prompt ``i`` (``name`` a key of the family's `Cond`, shape without the batch
dimension: e.g. FLUX's ``prompt_embeds`` [512, 4096] and ``pooled_prompt_embeds`` [768]); a
row equal, bit for bit, for every prompt (the negative prompt's: Wan, SD3, Qwen-Image) is
stored once as ``"shared/{name}"``. The safetensors metadata key `META_KEY` holds a JSON
object: ``format``, ``prompts`` (in order: i indexes it), ``names`` (the row names, in the family's
order), ``shared`` (those stored once),
``kind``, ``path``, ``dtype``, ``uncond`` (the file holds unconditional rows: CFG on) and
``text`` (the family's options that change an embedding: `text_options`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT = 1
"""The version of the file layout above; a reader refuses any other."""
META_KEY = "branchgrpo"
"""The safetensors metadata key of the JSON description."""
SHARED = "shared"
"""The key prefix of rows stored once for every prompt."""
TEXT_OPTIONS = ("max_sequence_length", "negative_prompt", "do_cfg")
"""Family attributes an ``encode`` reads (when the family has them): the token length rows are
padded / truncated to, the negative prompt encoded beside each prompt, whether it is."""


class EmbeddingFileError(ValueError):
    """A prompt-embedding file that cannot be used: missing, damaged, another format."""


def text_options(family: Any) -> dict[str, Any]:
    """The options of a configured family (`branchgrpo.models.family.Family`) that change what
    its ``encode`` returns: `TEXT_OPTIONS` it has (``do_cfg`` as a bool)."""
    out = {k: getattr(family, k) for k in TEXT_OPTIONS if hasattr(family, k)}
    if "do_cfg" in out:
        out["do_cfg"] = bool(out["do_cfg"])
    return out


def write(path: str | os.PathLike, prompts: Sequence[str], rows: Sequence[dict[str, Tensor]],
          meta: dict[str, Any]) -> Path:
    """Write ``rows[i]`` (``{name: tensor}``, no batch dimension) of ``prompts[i]`` into the
    safetensors file ``path`` with the description ``meta`` (plus ``format``, ``prompts``,
    ``shared``); rows equal for every prompt are stored once. Atomic: a temporary file beside
    ``path``, then renamed over it."""
    from safetensors.torch import save_file

    if len(prompts) != len(rows) or not prompts:
        raise ValueError(f"{len(prompts)} prompts and {len(rows)} rows: one row set per prompt")
    names = list(rows[0])
    shared = [n for n in names if all(torch.equal(r[n], rows[0][n]) for r in rows[1:])
              and len(rows) > 1]
    tensors = {f"{SHARED}/{n}": rows[0][n].contiguous() for n in shared}
    for i, r in enumerate(rows):
        if list(r) != names:
            raise ValueError(f"prompt {prompts[i]!r} has rows {list(r)}, the first {names}")
        tensors |= {f"{i}/{n}": t.contiguous() for n, t in r.items() if n not in shared}
    desc = {"format": FORMAT, **meta, "prompts": list(prompts), "names": names,
            "shared": shared}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(desc)})
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def read_description(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON description of the file ``path``, after checking its structure without
    reading any tensor: the safetensors header parses, the tensors' byte ranges end exactly at
    the file's end (a truncated or padded copy fails), the description has `FORMAT`.
    `EmbeddingFileError` saying what is wrong otherwise."""
    p = Path(path)
    if not p.is_file():
        raise EmbeddingFileError(f"{path} does not exist")
    size = p.stat().st_size
    try:
        with p.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit the file's {size} bytes")
            header = json.loads(fh.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if 8 + n + max(ends, default=0) != size:
            raise ValueError(f"the tensors end at byte {8 + n + max(ends, default=0)}, the "
                             f"file has {size} (truncated or damaged)")
        desc = json.loads((header.get("__metadata__") or {})[META_KEY])
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise EmbeddingFileError(f"{path} is not a readable prompt-embedding file: "
                                 f"{type(e).__name__}: {e}") from None
    if desc.get("format") != FORMAT:
        raise EmbeddingFileError(f"{path} has format {desc.get('format')!r}; this version "
                                 f"reads format {FORMAT}")
    if absent := [k for k in ("prompts", "names", "shared", "kind", "path") if k not in desc]:
        raise EmbeddingFileError(f"{path}'s description lacks {absent}: not written by "
                                 "branchgrpo encode")
    return desc


class PromptEmbeddings:
    """A prompt-embedding file opened for reading: its description (`read_description`), and
    `rows` of given prompts read from it on demand (memory-mapped; only those prompts' bytes
    are read)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        self.meta = read_description(self.path)
        self.prompts: list[str] = list(self.meta["prompts"])
        self.names: list[str] = list(self.meta["names"])
        self.shared: list[str] = list(self.meta["shared"])
        self.index = {p: i for i, p in enumerate(self.prompts)}

    def missing(self, prompts: Sequence[str]) -> list[str]:
        """The distinct prompts of ``prompts`` the file does not hold, in order."""
        return [p for p in dict.fromkeys(prompts) if p not in self.index]

    def rows(self, prompts: Sequence[str]) -> dict[str, dict[str, Tensor]]:
        """``{prompt: {name: row}}`` (CPU tensors, the dtype they were encoded in) of the
        distinct ``prompts``; KeyError naming the first one the file does not hold."""
        from safetensors import safe_open

        if absent := self.missing(prompts):
            raise KeyError(f"prompt {absent[0]!r} is not in the prompt-embedding file "
                           f"{self.path} (model.prompt_embeddings): {len(absent)} new "
                           "prompt(s); add them to data.prompts or data.eval_prompts (or "
                           "pass --prompt to encode) and write the file again with: "
                           f"branchgrpo encode CONFIG --out {self.path}")
        out: dict[str, dict[str, Tensor]] = {}
        with safe_open(str(self.path), framework="pt") as f:
            shared = {n: f.get_tensor(f"{SHARED}/{n}") for n in self.shared}
            for p in dict.fromkeys(prompts):
                i = self.index[p]
                out[p] = {n: shared[n] if n in shared else f.get_tensor(f"{i}/{n}")
                          for n in self.names}
        return out

"""Reward tests run offline (no Hugging Face downloads) on tiny random models built here."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from rewards_testlib import tiny_clip_config, tiny_clip_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A saved tiny CLIPModel + tokenizer + preprocessor_config.json (crop 32)."""
    from transformers import CLIPModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(tiny_clip_config()).save_pretrained(d)
    tiny_clip_tokenizer().save_pretrained(d)
    with open(d / "preprocessor_config.json", "w") as f:
        json.dump(
            {
                "crop_size": {"height": 32, "width": 32},
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.25, 0.25, 0.25],
            },
            f,
        )
    return str(d)

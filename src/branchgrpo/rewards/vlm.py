"""A VLM judge over an OpenAI-compatible chat-completions API (Unified Reward served by vLLM or
SGLang; MixGRPO and Flow-GRPO use UnifiedReward this way).

Each sample is one request: the image as a base64 PNG ``data:`` URL plus a prompt template
that contains ``{prompt}``; the first match of ``score_pattern`` in the reply (default
``Final Score: X``, else the last number in the reply) is the score. Scale: that of the
template; the default asks for 1-5 (MixGRPO reports UnifiedReward about 3.37-3.42 on FLUX).
Videos: the middle frame is judged (video judges are best served behind the reward server, see
docs/rewards.md; VideoAlign is built in as ``videoalign``).

Start a judge, e.g.::

    vllm serve CodeGoat24/UnifiedReward-qwen-7b --host 127.0.0.1 --port 8080
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from branchgrpo.rewards.base import REWARDS, RewardError
from branchgrpo.rewards.client import request_json
from branchgrpo.rewards.media import to_uint8

DEFAULT_TEMPLATE = (
    "You are given a text caption and an image generated from it. Rate the image on (1) how "
    "well it matches the caption and (2) its overall visual quality. Caption: {prompt}\n"
    "Answer with a short justification and end with 'Final Score: X', where X is a number "
    "from 1 to 5."
)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def parse_score(reply: str, pattern: str = r"Final Score:\s*\**\s*([-+]?\d+(?:\.\d+)?)") -> float:
    """The score in ``reply``: the first ``pattern`` match (case-insensitive), else the last
    number. Raises RewardError when there is none."""
    m = re.search(pattern, reply, flags=re.IGNORECASE)
    if m:
        return float(m.group(1))
    nums = _NUMBER.findall(reply)
    if not nums:
        raise RewardError(f"vlm_judge: no score in the reply {reply[:200]!r}")
    return float(nums[-1])


def png_data_url(image: Tensor) -> str:
    """image ``[C, H, W]`` in [0, 1] -> ``data:image/png;base64,...``."""
    from PIL import Image

    arr = to_uint8(image[None])[0]
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class VlmJudge:
    """media ``[B, C, H, W]`` (or videos: middle frame), B prompts -> fp32 ``[B]``."""

    groupwise = False

    def __init__(
        self,
        url: str,
        model: str,
        template: str = DEFAULT_TEMPLATE,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 2,
        backoff: float = 1.0,
        max_tokens: int = 512,
        temperature: float = 0.0,
        workers: int = 8,
        score_pattern: str | None = None,
        name: str = "vlm_judge",
    ) -> None:
        if "{prompt}" not in template:
            raise ValueError("vlm_judge: the template must contain '{prompt}'")
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.template, self.api_key = model, template, api_key
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_tokens, self.temperature, self.workers = max_tokens, temperature, workers
        self.score_pattern, self.name = score_pattern, name

    def ask(self, image: Tensor, prompt: str) -> float:
        """Judge one image ``[C, H, W]``; returns the parsed score."""
        body = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": png_data_url(image)}},
                        {"type": "text", "text": self.template.format(prompt=prompt)},
                    ],
                }
            ],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        resp = request_json(
            "POST",
            self.url,
            json.dumps(body).encode(),
            headers,
            self.timeout,
            self.retries,
            self.backoff,
            "vlm judge",
        )
        try:
            reply = resp["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RewardError(
                f"vlm_judge: {self.url} answered without choices[0].message"
                f".content: {str(resp)[:200]}"
            ) from None
        if self.score_pattern:
            return parse_score(reply, self.score_pattern)
        return parse_score(reply)

    def __call__(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        images = media[:, media.shape[1] // 2] if media.dim() == 5 else media
        images = images.detach().float().cpu()
        with ThreadPoolExecutor(max(1, min(self.workers, len(images)))) as pool:
            scores = list(pool.map(self.ask, images, prompts))
        return torch.tensor(scores, dtype=torch.float32)


@REWARDS.register("vlm_judge")
def vlm_judge(url: str, model: str = "UnifiedReward", **kwargs: object) -> VlmJudge:
    """VLM judge at ``url`` (``http://127.0.0.1:8080/v1`` or the full ``.../chat/completions``);
    ``model`` is the served model name; other keyword arguments as :class:`VlmJudge`
    (``device``/``dtype`` are ignored)."""
    kwargs.pop("device", None)
    kwargs.pop("dtype", None)
    return VlmJudge(url, model, **kwargs)  # type: ignore[arg-type]

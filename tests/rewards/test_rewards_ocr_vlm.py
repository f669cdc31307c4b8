"""OCR text-match reward on text rendered with PIL, and the VLM judge against a fake
OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from branchgrpo.rewards import RewardError, build_reward
from branchgrpo.rewards.ocr import levenshtein, quoted_text, text_match
from branchgrpo.rewards.vlm import parse_score


def test_text_match_by_hand():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert quoted_text('a neon sign saying "Open Late" at night') == "Open Late"
    assert quoted_text("no quotes") == "no quotes"
    assert text_match("OPEN LATE tonight", "Open Late") == 1.0  # substring -> distance 0
    assert text_match("Opem Late", "Open Late") == pytest.approx(1 - 1 / 8)  # spaces removed
    assert text_match("", "Open") == 0.0
    assert text_match("completely unrelated words", "Hi") == 0.0  # clamped to |target|


def _render(text: str) -> torch.Tensor:
    img = Image.new("RGB", (320, 96), "white")
    ImageDraw.Draw(img).text((12, 24), text, fill="black", font=ImageFont.load_default(size=40))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def test_ocr_reads_rendered_text():
    pytest.importorskip("rapidocr_onnxruntime", reason="pip install rapidocr-onnxruntime")
    r = build_reward("ocr")
    media = torch.stack([_render("Hello World"), _render("Hello Wor"), torch.ones(3, 96, 320)])
    prompt = 'a sign that says "Hello World"'
    s = r(media, [prompt] * 3)
    assert s.dtype == torch.float32 and s.shape == (3,)
    assert s[0] == 1.0  # read exactly
    assert s[1] == pytest.approx(1 - 2 / 10)  # two letters missing
    assert s[2] == 0.0  # blank image


def test_ocr_missing_engine_is_a_clear_error():
    import shutil

    if shutil.which("tesseract"):
        pytest.skip("tesseract is installed here")
    with pytest.raises(RewardError, match="apt-get install -y tesseract-ocr"):
        build_reward("ocr", engine="tesseract")


class _Judge(BaseHTTPRequestHandler):
    """Replies 'Final Score: <5 * mean intensity of the image>' (or misbehaves on request)."""

    mode = "ok"
    seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        url = content[0]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        arr = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
        type(self).seen.append(
            (self.path, body["model"], content[1]["text"], self.headers.get("Authorization"))
        )
        if type(self).mode == "slow":
            time.sleep(1.0)
        text = (
            "I cannot judge."
            if type(self).mode == "garbage"
            else (f"Looks fine. **Final Score: {5 * arr.mean() / 255:.4f}**")
        )
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out.encode())


@pytest.fixture()
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Judge.mode, _Judge.seen = "ok", []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_parse_score():
    assert parse_score("blah\nFinal Score: 4.5") == 4.5
    assert parse_score("final score:**3**") == 3.0
    assert parse_score("I'd say 2 or maybe 3") == 3.0
    with pytest.raises(RewardError, match="no score"):
        parse_score("no digits here")


def test_vlm_judge_round_trip(judge_url):
    r = build_reward(
        "vlm_judge",
        url=judge_url,
        model="unified",
        api_key="k",
        device="cpu",
        template="Rate: {prompt}",
    )
    media = torch.stack([torch.full((3, 8, 8), v) for v in (0.0, 0.2, 1.0)])
    s = r(media, ["a", "b", "c"])
    u8 = torch.tensor([0.0, 51.0, 255.0])  # round(255 * v)
    assert torch.allclose(s, torch.round(5 * u8 / 255 * 1e4) / 1e4, atol=1e-6)
    assert sorted(x[2] for x in _Judge.seen) == ["Rate: a", "Rate: b", "Rate: c"]
    assert all(
        x[0] == "/v1/chat/completions" and x[1] == "unified" and x[3] == "Bearer k"
        for x in _Judge.seen
    )
    video = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8), torch.zeros(3, 8, 8)])[None]
    assert r(video, ["v"]).tolist() == [5.0]  # the middle frame


def test_vlm_judge_fails_loud(judge_url):
    _Judge.mode = "garbage"
    r = build_reward("vlm_judge", url=judge_url, retries=0)
    with pytest.raises(RewardError, match="no score in the reply"):
        r(torch.zeros(1, 3, 8, 8), ["x"])
    _Judge.mode = "slow"
    r = build_reward("vlm_judge", url=judge_url, timeout=0.2, retries=1, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(RewardError, match=r"failed after 2 tries; last error: .*timed out"):
        r(torch.zeros(1, 3, 8, 8), ["x"])
    assert time.monotonic() - t0 < 2.0

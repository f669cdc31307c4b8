"""Reward server in a real subprocess + the remote client (rewards/server.py, client.py)."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from server_testlib import launch, picky, start_server, stop

from branchgrpo.rewards import RewardError, RewardSet, build_reward
from branchgrpo.rewards.client import RemoteClient

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def server():
    proc, url = start_server(
        "jpeg_compressibility",
        "mean=rewards_testlib:mean_pixel",
        "--token",
        TOKEN,
        "--max-bytes",
        "200000",
        "--batch-size",
        "3",
    )
    yield proc, url
    proc.kill()
    proc.wait()


def post(url: str, body: bytes, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + "/score", body, headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.loads(r.read())


def test_roundtrip_matches_in_process(server):
    _, url = server
    h = health(url)
    assert h["status"] == "ok" and h["rewards"] == ["jpeg_compressibility", "mean"]
    torch.manual_seed(0)
    media = (torch.rand(5, 3, 16, 16) * 255).round() / 255  # exactly representable in uint8
    prompts = ["a", "bb", "ccc", "", "eeeee"]
    local = RewardSet(
        {"jpeg_compressibility": 1.0, "mean": 1.0},
        {"mean": {"source": "rewards_testlib:mean_pixel"}},
    ).score(media, prompts)
    for fmt, dtype in [("array", "uint8"), ("array", "float32"), ("png", "uint8")]:
        client = RemoteClient(url, TOKEN, timeout=10, retries=0, fmt=fmt, dtype=dtype)
        remote = client.score(media, prompts)
        assert set(remote) == {"jpeg_compressibility", "mean"}
        assert torch.equal(remote["jpeg_compressibility"], local["jpeg_compressibility"])
        assert torch.allclose(remote["mean"], local["mean"], atol=1e-6)
    # remote rewards inside a RewardSet behave like local ones; one request for both names
    spec = {"source": "remote", "url": url, "token": TOKEN, "retries": 0}
    rs = RewardSet(
        {"jpeg_compressibility": 1.0, "mean": 2.0},
        {"jpeg_compressibility": dict(spec), "mean": dict(spec)},
        batch_size=8,
    )
    s = rs.score(media, prompts)
    assert torch.equal(s["jpeg_compressibility"], local["jpeg_compressibility"])
    assert torch.allclose(rs.weighted(s), rs.weighted(local), atol=1e-5)
    video = media.reshape(1, 5, 3, 16, 16)
    v = RemoteClient(url, TOKEN, retries=0, fmt="png").score(video, ["v"], ["jpeg_compressibility"])
    assert torch.allclose(v["jpeg_compressibility"], local["jpeg_compressibility"].mean().view(1))


def test_bad_requests_get_4xx_and_server_survives(server):
    _, url = server
    good = {
        "media": {
            "format": "array",
            "data": {
                "dtype": "uint8",
                "shape": [1, 3, 2, 2],
                "b64": base64.b64encode(bytes(12)).decode(),
            },
        },
        "prompts": ["x"],
    }
    assert post(url, json.dumps(good).encode())[0] == 200
    cases = {
        "not json": (b"{nope", 400),
        "not an object": (b"[1, 2]", 400),
        "no prompts": (json.dumps({"media": good["media"]}).encode(), 400),
        "wrong byte count": (
            json.dumps(
                {
                    **good,
                    "media": {
                        "format": "array",
                        "data": {**good["media"]["data"], "shape": [1, 3, 4, 4]},
                    },
                }
            ).encode(),
            400,
        ),
        "prompt count": (json.dumps({**good, "prompts": ["a", "b"]}).encode(), 400),
        "unknown reward": (json.dumps({**good, "rewards": ["hps"]}).encode(), 400),
        "bad png": (
            json.dumps({**good, "media": {"format": "png", "data": ["aGVsbG8="]}}).encode(),
            400,
        ),
        "oversized": (b" " * 300_000, 413),
    }
    for what, (body, code) in cases.items():
        status, obj = post(url, body)
        assert status == code, (what, obj)
        assert isinstance(obj.get("error"), str) and obj["error"], what
    assert post(url, json.dumps(good).encode(), token=None)[0] == 401
    assert post(url, json.dumps(good).encode(), token="wrong")[0] == 401
    assert health(url)["status"] == "ok"
    assert post(url, json.dumps(good).encode())[0] == 200
    with pytest.raises(RewardError, match="rejected the request: HTTP 401"):
        RemoteClient(url, "wrong", retries=3).score(torch.zeros(1, 3, 2, 2), ["x"])


def test_server_nan_is_500_and_client_fails_loud():
    proc, url = start_server("bad=rewards_testlib:nan_reward")
    try:
        client = RemoteClient(url, retries=1, backoff=0.01)
        with pytest.raises(RewardError, match=r"2 tries.*HTTP 500.*'bad' returned 1 non-finite"):
            client.score(torch.zeros(2, 3, 4, 4), ["a", "b"])
    finally:
        proc.kill()
        proc.wait()


def test_client_raises_after_retries_when_server_is_dead():
    proc, url = start_server("jpeg_compressibility")
    r = build_reward(
        "remote", url=url, names=["jpeg_compressibility"], retries=2, backoff=0.05, timeout=1.0
    )
    assert r(torch.zeros(1, 3, 4, 4), ["x"]).shape == (1,)
    proc.kill()
    proc.wait()
    t0 = time.monotonic()
    with pytest.raises(
        RewardError, match=rf"{url}/score failed after 3 tries; last error: URLError"
    ):
        r(torch.ones(1, 3, 4, 4), ["x"])
    assert time.monotonic() - t0 < 2.0  # backoff 0.05 + 0.1


def test_50_concurrent_clients_all_get_their_own_scores(server):
    _, url = server
    torch.manual_seed(2)
    media = [(torch.rand(2, 3, 8, 8) * 255).round() / 255 for _ in range(50)]
    local = RewardSet(
        {"jpeg_compressibility": 1.0, "mean": 1.0},
        {"mean": {"source": "rewards_testlib:mean_pixel"}},
    )

    def one(i: int) -> dict[str, torch.Tensor]:
        return RemoteClient(url, TOKEN, timeout=30, retries=0).score(media[i], [f"p{i}", "q"])

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    for i, r in enumerate(results):
        expected = local.score(media[i], [f"p{i}", "q"])
        assert torch.equal(r["jpeg_compressibility"], expected["jpeg_compressibility"])
        assert torch.allclose(r["mean"], expected["mean"], atol=1e-6)


BATCHING_REWARDS = (
    "slow=server_testlib:slow_mean",
    "rank=rewards_testlib:RankInGroup",
    "jpeg_compressibility",
)


def _concurrent_requests(url: str, n: int) -> tuple[list[dict], list[dict], dict]:
    """n concurrent requests of 3 images (two image sizes, arbitrary group ids) -> (remote
    scores, the same requests scored alone in this process, /health batching counters)."""
    torch.manual_seed(3)
    sizes = [8 if i % 3 else 16 for i in range(n)]
    media = [(torch.rand(3, 3, s, s) * 255).round() / 255 for s in sizes]
    groups = [torch.tensor([7 + i, 7 + i, 1000 * i]) for i in range(n)]
    prompts = [[f"a{i}", "b", "c"] for i in range(n)]

    def one(i: int) -> dict[str, torch.Tensor]:
        client = RemoteClient(url, timeout=60, retries=0)
        return client.score(media[i], prompts[i], ["slow", "rank", "jpeg_compressibility"],
                            groups[i])

    with ThreadPoolExecutor(n) as pool:
        remote = list(pool.map(one, range(n)))
    local_set = RewardSet(
        dict.fromkeys(["slow", "rank", "jpeg_compressibility"], 1.0),
        {"slow": {"source": "server_testlib:slow_mean"},
         "rank": {"source": "rewards_testlib:RankInGroup"}},
    )
    local = [local_set.score(media[i], prompts[i], groups[i]) for i in range(n)]
    stats = RemoteClient(url, retries=0).health()["batching"]
    return remote, local, stats


def test_batching_merges_concurrent_requests_and_matches_scoring_alone():
    # a long --max-wait-ms: the worker waits only while more requests are being read/decoded
    proc, url = start_server(*BATCHING_REWARDS, "picky=server_testlib:picky", "--max-wait-ms",
                             "2000", "--max-batch", "64", "--batch-size", "64")
    try:
        remote, local, stats = _concurrent_requests(url, 12)
        for r, loc in zip(remote, local, strict=True):
            assert r.keys() == loc.keys() and all(torch.equal(r[k], loc[k]) for k in r)
        assert stats["requests"] == 12 and stats["images"] == 36
        # requests that queued behind a 0.1 s reward call were merged (two image sizes are
        # never merged with each other, so at least 2 batches)
        assert 2 <= stats["batches"] <= 8 and stats["largest_batch"] >= 6, stats
        t0 = time.monotonic()  # so a lone request does not wait for company
        RemoteClient(url, retries=0).score(torch.rand(1, 3, 4, 4), ["alone"], ["picky"])
        assert time.monotonic() - t0 < 1.0
        # a request that breaks the reward gets 500; the one merged with it still gets scores
        client = RemoteClient(url, timeout=30, retries=0)
        x = (torch.rand(2, 3, 4, 4) * 255).round() / 255
        with ThreadPoolExecutor(2) as pool:
            bad = pool.submit(client.score, x, ["boom", "x"], ["picky"])
            good = pool.submit(RemoteClient(url, retries=0).score, x, ["ok", "x"], ["picky"])
            assert torch.allclose(good.result()["picky"], picky(x, ["ok", "x"]), atol=1e-6)
            with pytest.raises(RewardError, match="HTTP 500.*refuses the prompt 'boom'"):
                bad.result()
    finally:
        stop(proc)


def test_no_batching_scores_one_request_per_batch():
    proc, url = start_server(*BATCHING_REWARDS, "--no-batching")
    try:
        remote, local, stats = _concurrent_requests(url, 6)
        for r, loc in zip(remote, local, strict=True):
            assert all(torch.equal(r[k], loc[k]) for k in r)
        assert stats == {"merging": False, "requests": 6, "batches": 6, "images": 18,
                         "largest_batch": 3}
    finally:
        stop(proc)


def test_reuse_port_lets_two_servers_share_a_port():
    first, url = start_server("jpeg_compressibility", "--reuse-port")
    port = url.rsplit(":", 1)[1]
    try:
        second, url2 = launch("-m", "branchgrpo.rewards.server", "jpeg_compressibility",
                              "--reuse-port", "--port", port)
        try:
            assert url2 == url
            x = torch.rand(1, 3, 4, 4)
            for _ in range(4):
                assert RemoteClient(url, retries=0).score(x, ["x"])["jpeg_compressibility"].shape
        finally:
            stop(second)
    finally:
        stop(first)

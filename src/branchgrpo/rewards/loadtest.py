"""Bounded load test for a reward server (loopback only; stops after ``--requests``).

    python -m branchgrpo.rewards.loadtest --url http://127.0.0.1:8900 --requests 200 \\
        --concurrency 4 --batch 8 --size 512

Sends random images ``[batch, 3, size, size]`` and reports throughput (images/s, requests/s)
and latency percentiles p50/p95/p99 in ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from branchgrpo.rewards.client import RemoteClient

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` in [0, 100] of ``values``."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


def run(
    url: str,
    requests: int = 200,
    concurrency: int = 4,
    batch: int = 8,
    size: int = 512,
    token: str | None = None,
    fmt: str = "array",
    names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Run the load test; returns the report as a dict."""
    host = urllib.parse.urlparse(url).hostname
    if host not in _LOOPBACK:
        raise ValueError(f"loadtest only targets loopback servers, got host {host!r}")
    if requests < 1 or concurrency < 1 or batch < 1:
        raise ValueError("requests, concurrency and batch must be >= 1")
    torch.manual_seed(0)
    media = torch.rand(batch, 3, size, size)
    prompts = [f"prompt {i}" for i in range(batch)]
    client = RemoteClient(url, token, timeout=120, retries=0, fmt=fmt)
    client.score(media[:1], prompts[:1], names)  # warm up

    def one(i: int) -> float:
        t = time.perf_counter()
        # perturb one pixel so no cache can answer
        m = media.clone()
        m[0, 0, 0, 0] = (i % 255) / 255
        client.score(m, prompts, names)
        return time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    return {
        "requests": requests,
        "concurrency": concurrency,
        "batch": batch,
        "size": size,
        "wall_s": wall,
        "requests_per_s": requests / wall,
        "images_per_s": requests * batch / wall,
        "p50_ms": 1000 * percentile(lat, 50),
        "p95_ms": 1000 * percentile(lat, 95),
        "p99_ms": 1000 * percentile(lat, 99),
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="branchgrpo.rewards.loadtest", description=__doc__.split("\n")[0]
    )
    p.add_argument("--url", required=True)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--token", default=None)
    p.add_argument("--format", default="array", choices=["array", "png"])
    p.add_argument("--rewards", nargs="*", default=None, help="subset of served rewards")
    a = p.parse_args(argv)
    r = run(a.url, a.requests, a.concurrency, a.batch, a.size, a.token, a.format, a.rewards)
    print(json.dumps(r, indent=1))
    print(
        f"{r['requests_per_s']:.1f} req/s, {r['images_per_s']:.1f} images/s; latency ms "
        f"p50 {r['p50_ms']:.1f} p95 {r['p95_ms']:.1f} p99 {r['p99_ms']:.1f}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])

"""Bounded load and fault tests for the reward server (loopback only; each stops by itself).

    # throughput of a running server
    branchgrpo bench reward-server --url http://127.0.0.1:8900 --requests 200 \\
        --concurrency 4 --batch 8 --size 512
    # dynamic batching vs one request at a time (--no-batching), at 1, 4 and 16 clients;
    # starts its own servers with the TinyCNN reward below
    branchgrpo bench reward-server --compare --requests 96 --batch 4 --size 64
    # hostile clients against a fresh server, with its RSS before and after each
    branchgrpo bench reward-server --faults

Throughput runs send random images ``[batch, 3, size, size]`` and report images/s, requests/s
and latency percentiles p50/p95/p99 in ms. The raw-socket helpers here (``post_head``,
``read_response``, ``png_bomb``, ``memory_kb``) are also what the server's tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor, nn

from branchgrpo.rewards.client import RemoteClient

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` in [0, 100] of ``values``."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


class TinyCNN(nn.Module):
    """The benchmark reward: a fixed random CNN (seed 0), ``[B, 3, H, W] -> [B]``.

    A real model forward, so a call has the per-call cost (kernel launches, thread start-up)
    that batching amortises: on 2 CPU cores, 64 x 64 images cost about 0.26 ms each one at a
    time and 0.07 ms each in a batch of 64."""

    name = "tiny_cnn"
    groupwise = False

    def __init__(self, width: int = 32, **_: object) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        layers: list[nn.Module] = []
        for c_in, c_out in [(3, width), (width, 2 * width), (2 * width, 2 * width)]:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(2 * width, 1))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.eval()

    def __call__(self, media: Tensor, prompts: Sequence[str]) -> Tensor:  # type: ignore[override]
        with torch.no_grad():
            return self.net(media.float())[:, 0]


class FixedCostReward:
    """A stand-in for a GPU model forward: each call sleeps ``call_ms`` (whatever the batch
    size, as a GPU forward below its capacity), then returns each image's mean intensity.
    Sleeping uses no CPU, so on a small machine the cores stay with transport and decoding."""

    name = "fixed_cost"
    groupwise = False

    def __init__(self, call_ms: float = 20.0, **_: object) -> None:
        self.call_s = call_ms / 1000

    def __call__(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        time.sleep(self.call_s)
        return media.reshape(media.shape[0], -1).float().mean(dim=1)


def run(
    url: str,
    requests: int = 200,
    concurrency: int = 4,
    batch: int = 8,
    size: int = 512,
    token: str | None = None,
    fmt: str = "array",
    names: Sequence[str] | None = None,
    warmup: bool = True,
) -> dict[str, float]:
    """Run the load test against a server at ``url`` (after one warm-up request of one image
    unless ``warmup=False``); returns the report as a dict."""
    host = urllib.parse.urlparse(url).hostname
    if host not in _LOOPBACK:
        raise ValueError(f"loadtest only targets loopback servers, got host {host!r}")
    if requests < 1 or concurrency < 1 or batch < 1:
        raise ValueError("requests, concurrency and batch must be >= 1")
    torch.manual_seed(0)
    media = torch.rand(batch, 3, size, size)
    prompts = [f"prompt {i}" for i in range(batch)]
    client = RemoteClient(url, token, timeout=120, retries=0, fmt=fmt)
    if warmup:
        client.score(media[:1], prompts[:1], names)

    def one(i: int) -> float:
        t = time.perf_counter()
        m = media.clone()  # perturb one pixel so no cache can answer
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


# --- a local server and raw loopback HTTP ---------------------------------------------------


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """Start ``python -m branchgrpo.rewards.server *args --port 0`` on 127.0.0.1 and wait until
    it listens -> (process, url)."""
    cmd = [sys.executable, "-m", "branchgrpo.rewards.server", *args, "--host", "127.0.0.1",
           "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if "http://" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line}")
    return proc, line.strip().rsplit(" ", 1)[1]


def memory_kb(pid: int, field: str = "VmRSS") -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak so far) of process ``pid`` in kB, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def post_head(length: int | None, token: str | None = None, chunked: bool = False) -> bytes:
    """Request line and headers of a ``POST /score`` (``length=None``: no Content-Length)."""
    lines = ["POST /score HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict]:
    """Read one HTTP response with a Content-Length body -> (status, JSON body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response; got {buf[:200]!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), json.loads(rest[:n] or b"{}")


def png_bomb(width: int, height: int) -> bytes:
    """A valid all-black 8-bit RGB PNG of ``width x height``: a few hundred kB at most that
    decode to ``3 * width * height`` bytes (and 4x that as float32)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    comp, row = zlib.compressobj(9), b"\x00" + bytes(3 * width)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --- batching vs one at a time ---------------------------------------------------------------


def compare(
    requests: int = 96,
    batch: int = 4,
    size: int = 64,
    concurrencies: Sequence[int] = (1, 4, 16),
    rewards: Sequence[str] = ("TinyCNN", "FixedCostReward"),
    max_wait_ms: float = 10.0,
    repeats: int = 3,
) -> list[dict[str, float | str]]:
    """Images/s at each concurrency for a server with dynamic batching and the same server with
    ``--no-batching`` (one request at a time, as under the old global lock). Both servers run
    at once (loopback, started here, stopped after) and their runs alternate, so load from
    elsewhere on a shared machine hits both alike; each row is the best of ``repeats`` runs.
    ``rewards`` are classes of this module."""
    modes = {"batching": ["--max-wait-ms", str(max_wait_ms)], "no-batching": ["--no-batching"]}
    rows: list[dict[str, float | str]] = []
    for reward in rewards:
        servers = {}
        try:
            for mode, flags in modes.items():
                servers[mode] = start_server(f"r=branchgrpo.rewards.loadtest:{reward}",
                                             "--batch-size", "64", *flags)
            best: dict[tuple[str, int], dict[str, float]] = {}
            for c in concurrencies:
                for _, url in servers.values():
                    run(url, c, c, batch, size, warmup=False)  # warm up
                for _ in range(repeats):
                    for mode, (_, url) in servers.items():
                        r = _measured_run(url, requests, c, batch, size)
                        if r["images_per_s"] > best.get((mode, c), {}).get("images_per_s", 0):
                            best[mode, c] = r
            rows += [{"reward": reward, "mode": m, "clients": c, **best[m, c]}
                     for m in modes for c in concurrencies]
        finally:
            for proc, _ in servers.values():
                proc.kill()
                proc.wait()
    return rows


def _measured_run(url: str, requests: int, clients: int, batch: int, size: int) -> dict:
    before = RemoteClient(url, retries=0).health()["batching"]
    r = run(url, requests, clients, batch, size, warmup=False)
    after = RemoteClient(url, retries=0).health()["batching"]
    batches = max(after["batches"] - before["batches"], 1)
    return {"images_per_s": round(r["images_per_s"], 1),
            "mean_batch_images": round((after["images"] - before["images"]) / batches, 1),
            "p50_ms": round(r["p50_ms"], 1), "p95_ms": round(r["p95_ms"], 1)}


# --- the fault suite ---------------------------------------------------------------------------

FAULT_TOKEN = "loadtest-token"
_MB = 1024 * 1024


def _connect(port: int, timeout: float = 60.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _post(port: int, body: bytes, token: str | None = FAULT_TOKEN) -> int:
    with _connect(port) as s:
        s.sendall(post_head(len(body), token) + body)
        return read_response(s)[0]


def _statuses(codes: Sequence[int | str]) -> str:
    counts: dict[str, int] = {}
    for c in codes:
        counts[str(c)] = counts.get(str(c), 0) + 1
    return ", ".join(f"{n}x {c}" for c, n in sorted(counts.items()))


def _closed(s: socket.socket) -> bool:
    """Whether the peer closed ``s`` (EOF or reset), without blocking."""
    import select

    if not select.select([s], [], [], 0)[0]:
        return False
    try:
        return s.recv(1) == b""
    except OSError:
        return True


def _slowloris(port: int, n: int = 100, limit_s: float = 60.0) -> str:
    """n connections sending their headers one byte per 0.5 s; when did the server close them?"""
    head = post_head(100, FAULT_TOKEN)
    sent = {_connect(port): 0 for _ in range(n)}
    t0, closed_at = time.monotonic(), []
    while sent and time.monotonic() - t0 < limit_s:
        for s in list(sent):
            try:
                if _closed(s):
                    raise ConnectionError
                s.send(head[sent[s] : sent[s] + 1])
                sent[s] += 1
            except OSError:
                closed_at.append(time.monotonic() - t0)
                sent.pop(s)
                s.close()
        time.sleep(0.5)
    for s in sent:
        s.close()
    last = max(closed_at, default=0.0)
    return f"{len(closed_at)}/{n} closed by the server, the last after {last:.1f} s"


def _slow_body(port: int, n: int = 30) -> str:
    socks = [_connect(port) for _ in range(n)]
    t0 = time.monotonic()
    for s in socks:
        s.sendall(post_head(1_000_000, FAULT_TOKEN) + b'{"media": ')
    codes: list[int | str] = []
    for s in socks:
        try:
            codes.append(read_response(s)[0])
        except OSError as e:
            codes.append(type(e).__name__)
        s.close()
    return f"{_statuses(codes)} after {time.monotonic() - t0:.1f} s"


def _unauthenticated(port: int, n: int = 20, size: int = int(7.5 * _MB)) -> str:
    def one(_: int) -> int | str:
        with _connect(port) as s:
            try:
                s.sendall(post_head(size, "wrong") + b"x" * size)
            except OSError:
                pass
            try:
                return read_response(s)[0]
            except OSError as e:
                return type(e).__name__

    with ThreadPoolExecutor(n) as pool:
        return _statuses(list(pool.map(one, range(n))))


def _timed_post(port: int, body: bytes) -> str:
    t0 = time.perf_counter()
    code = _post(port, body)
    return f"{code} in {1000 * (time.perf_counter() - t0):.0f} ms"


def _pixel_bomb(port: int) -> str:
    import base64

    png = png_bomb(10_000, 10_000)
    media = {"format": "png", "data": [base64.b64encode(png).decode()]}
    return f"{len(png) // 1000} kB PNG: " + _timed_post(
        port, json.dumps({"media": media, "prompts": ["x"]}).encode()
    )


def _nested_json(port: int, depth: int = 1_000_000) -> str:
    return _timed_post(port, b"[" * depth + b"]" * depth)


def _bool_dims(port: int) -> str:
    media = {"format": "array", "data": {"dtype": "uint8", "shape": [True, 3, 2, 2],
                                         "b64": "AAAAAAAAAAAAAAAA"}}
    return _timed_post(port, json.dumps({"media": media, "prompts": ["x"]}).encode())


def _many_clients(url: str, n: int = 50) -> str:
    torch.manual_seed(1)
    media = [(torch.rand(4, 3, 64, 64) * 255).round() / 255 for _ in range(n)]
    local = TinyCNN()

    def one(i: int) -> bool:
        client = RemoteClient(url, FAULT_TOKEN, timeout=120, retries=0)
        got = client.score(media[i], ["p"] * 4)["r"]
        return bool(torch.allclose(got, local(media[i], ["p"] * 4), atol=1e-5))

    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        ok = sum(pool.map(one, range(n)))
    return f"{ok}/{n} correct scores in {time.monotonic() - t0:.1f} s"


def faults(read_timeout: float = 5.0) -> list[dict[str, str | float]]:
    """Each hostile client in turn against one fresh server (TinyCNN reward, token, default
    limits but ``--read-timeout``), with its RSS before and after and its peak RSS so far."""
    proc, url = start_server("r=branchgrpo.rewards.loadtest:TinyCNN", "--token", FAULT_TOKEN,
                             "--read-timeout", str(read_timeout))
    port = int(url.rsplit(":", 1)[1])
    suite = [
        ("slowloris: 100 connections, headers at 2 B/s", lambda: _slowloris(port)),
        ("slow body: 30 bodies that never finish", lambda: _slow_body(port)),
        ("20 unauthenticated 7.5 MB bodies at once", lambda: _unauthenticated(port)),
        ("pixel bomb: 10000x10000 RGB PNG", lambda: _pixel_bomb(port)),
        ("JSON nested 1,000,000 deep", lambda: _nested_json(port)),
        ("boolean image dimension", lambda: _bool_dims(port)),
        ("50 concurrent clients, 4 images each", lambda: _many_clients(url)),
    ]
    rows: list[dict[str, str | float]] = []
    try:
        RemoteClient(url, FAULT_TOKEN, retries=0).score(torch.zeros(1, 3, 8, 8), ["warm-up"])
        for what, fn in suite:
            before = memory_kb(proc.pid)
            answer = fn()
            time.sleep(0.5)
            healthy = RemoteClient(url, retries=0).health()["status"] == "ok"
            rows.append({"fault": what, "answer": answer, "health_after": healthy,
                         "rss_before_mb": round(before / 1024, 1),
                         "rss_after_mb": round(memory_kb(proc.pid) / 1024, 1),
                         "peak_rss_so_far_mb": round(memory_kb(proc.pid, "VmHWM") / 1024, 1)})
    finally:
        proc.kill()
        proc.wait()
    return rows


def markdown(rows: Sequence[dict[str, object]]) -> str:
    """Rows of equal keys as a Markdown table."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "branchgrpo.rewards.loadtest") -> int:
    """Command line entry point (``branchgrpo bench reward-server`` calls this)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--url", help="load-test a running loopback server")
    mode.add_argument("--compare", action="store_true",
                      help="batching vs --no-batching at 1, 4 and 16 clients (own servers)")
    mode.add_argument("--faults", action="store_true", help="the hostile-client suite")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="images per request")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--token", default=None)
    p.add_argument("--format", default="array", choices=["array", "png"])
    p.add_argument("--rewards", nargs="*", default=None, help="subset of served rewards")
    p.add_argument("--repeats", type=int, default=3, help="--compare: best of this many runs")
    a = p.parse_args(argv)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}", flush=True)
    if a.compare:
        print(markdown(compare(a.requests, a.batch, a.size, repeats=a.repeats)))
    elif a.faults:
        print(markdown(faults()))
    else:
        r = run(a.url, a.requests, a.concurrency, a.batch, a.size, a.token, a.format, a.rewards)
        print(json.dumps(r, indent=1))
        print(
            f"{r['requests_per_s']:.1f} req/s, {r['images_per_s']:.1f} images/s; latency ms "
            f"p50 {r['p50_ms']:.1f} p95 {r['p95_ms']:.1f} p99 {r['p99_ms']:.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

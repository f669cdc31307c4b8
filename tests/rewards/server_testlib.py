"""Helpers for the reward server tests: start a server subprocess, raw HTTP over loopback, the
server's memory, crafted hostile inputs, and rewards the server process imports by path."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

HERE = Path(__file__).parent


def launch(*argv: str) -> tuple[subprocess.Popen, str]:
    """Run ``python *argv`` (a server) and wait for its ``serving ... on http://...`` line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env,
    )
    line = proc.stdout.readline()  # "serving [...] on http://127.0.0.1:PORT"
    if "http://" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line}{proc.stdout.read()}")
    return proc, line.strip().rsplit(" ", 1)[1]


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """``python -m branchgrpo.rewards.server *args --port 0``."""
    return launch("-m", "branchgrpo.rewards.server", *args, "--port", "0")


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def memory_kb(pid: int, field: str = "VmHWM") -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak so far) of process ``pid`` in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def post_head(length: int | None, token: str | None = None, chunked: bool = False) -> bytes:
    """Request line and headers of a ``POST /score``."""
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
            raise ConnectionError(f"connection closed before a response; got {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, json.loads(rest[:n] or b"{}")


def closed_by_peer(sock: socket.socket) -> bool:
    """True when the peer closed (EOF or reset); False while it is still open (timeout)."""
    try:
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def array_media(shape: Sequence[object], b64: str = "") -> dict:
    return {"format": "array", "data": {"dtype": "uint8", "shape": list(shape), "b64": b64}}


def good_request(n: int = 1) -> dict:
    return {
        "media": array_media([n, 3, 2, 2], base64.b64encode(bytes(12 * n)).decode()),
        "prompts": ["x"] * n,
    }


def png_bomb(width: int, height: int) -> bytes:
    """A valid all-black RGB PNG of ``width x height``: a few hundred kB that decode to
    ``3 * width * height`` bytes (and 4x that as float32)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    comp, row = zlib.compressobj(9), b"\x00" + bytes(3 * width)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def wait_until(cond, timeout: float, every: float = 0.05) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        time.sleep(every)
    return cond()


def slow_mean(media: Tensor, prompts: Sequence[str]) -> Tensor:
    """Mean intensity per sample, after sleeping 0.1 s per call (so concurrent requests queue up
    behind a call in progress, as behind a GPU forward)."""
    time.sleep(0.1)
    return media.reshape(media.shape[0], -1).float().mean(dim=1)


def picky(media: Tensor, prompts: Sequence[str]) -> Tensor:
    """Mean intensity, but raises on the prompt "boom" (a reward that fails for one request)."""
    if "boom" in prompts:
        raise ValueError("picky reward refuses the prompt 'boom'")
    return media.reshape(media.shape[0], -1).float().mean(dim=1)

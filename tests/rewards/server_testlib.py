"""Helpers for the reward server tests: start a server subprocess, raw loopback sockets, and
rewards the server process imports by path. The hostile-client helpers (``post_head``,
``read_response``, ``png_bomb``, ``memory_kb``) live in :mod:`branchgrpo.rewards.loadtest`."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
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


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


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

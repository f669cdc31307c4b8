"""A reward server: score media over HTTP with rewards that live in another process/venv.

    python -m branchgrpo.rewards.server jpeg_compressibility hps=hpsv2 \\
        --host 127.0.0.1 --port 8900 --token SECRET --max-bytes 67108864 --batch-size 16

Each NAME is a registered reward, a dotted path ``pkg.mod:fn``, or ``alias=source`` (served
under ``alias``). ``--kwargs '{"hps": {"device": "cuda"}}'`` passes constructor arguments.

Protocol (JSON only, no pickle; see docs/rewards.md):

- ``GET /health`` -> ``{"status": "ok", "rewards": [names]}`` (no token needed).
- ``POST /score`` with ``{"media": <encoded media>, "prompts": [str], "rewards": [subset]?,
  "group": [int]?}`` -> ``{"scores": {name: [float]}}``. Media encodings: see
  :func:`branchgrpo.rewards.media.decode_media`.
- Errors are JSON ``{"error": message}``: 400 malformed request / unknown reward, 401 missing or
  wrong bearer token, 404 unknown path, 411 no length, 413 body over ``--max-bytes``, 500 when a
  reward fails. The server keeps serving after any of them. Requests are scored one at a time
  (a lock), so a GPU reward never sees two batches at once.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from branchgrpo.rewards.base import REWARDS, RewardError, RewardSet
from branchgrpo.rewards.media import decode_media

DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class BadRequest(ValueError):
    """A client error: answered with HTTP 400 and the message."""


def parse_names(names: Sequence[str]) -> dict[str, str]:
    """``["jpeg_compressibility", "t=pkg.mod:fn"]`` -> ``{served name: source}``."""
    out: dict[str, str] = {}
    for n in names:
        alias, sep, source = n.partition("=")
        if not sep:
            alias, source = (n.rpartition(":")[2] if ":" in n else n), n
        if alias in out:
            raise ValueError(f"reward name {alias!r} given twice")
        out[alias] = source
    return out


class RewardService:
    """The transport-independent part: validate a request dict and score it under a lock."""

    def __init__(self, reward_set: RewardSet) -> None:
        self.reward_set = reward_set
        self.lock = threading.Lock()

    def score(self, req: Any) -> dict[str, Any]:
        if not isinstance(req, dict):
            raise BadRequest("request body must be a JSON object")
        if "media" not in req or "prompts" not in req:
            raise BadRequest('request needs "media" and "prompts"')
        prompts = req["prompts"]
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise BadRequest('"prompts" must be a list of strings')
        try:
            media = decode_media(req["media"])
        except ValueError as e:
            raise BadRequest(str(e)) from e
        if media.shape[0] != len(prompts):
            raise BadRequest(f"got {media.shape[0]} media but {len(prompts)} prompts")
        names = req.get("rewards")
        if names is None:
            names = self.reward_set.names
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadRequest('"rewards" must be a list of reward names')
        unknown = [n for n in names if n not in self.reward_set.rewards]
        if unknown:
            raise BadRequest(f"unknown reward(s) {unknown}; served: {self.reward_set.names}")
        group = req.get("group")
        group_t = None
        if group is not None:
            if not isinstance(group, list) or not all(
                isinstance(g, int) and not isinstance(g, bool) for g in group
            ):
                raise BadRequest('"group" must be a list of ints')
            if len(group) != len(prompts):
                raise BadRequest(f'"group" has {len(group)} ids for {len(prompts)} prompts')
            group_t = torch.tensor(group, dtype=torch.long)
        with self.lock, torch.no_grad():
            scores = self.reward_set.score(media, prompts, group_t, names=names)
        return {"scores": {k: v.tolist() for k, v in scores.items()}}


def make_handler(
    service: RewardService, token: str | None, max_bytes: int
) -> type[BaseHTTPRequestHandler]:
    """The request handler class bound to a service, token and size limit."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "branchgrpo-reward/1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet by default
            if os.environ.get("BRANCHGRPO_REWARD_LOG"):
                super().log_message(format, *args)

        def _send(self, code: int, obj: Mapping[str, Any], close: bool = False) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok", "rewards": service.reward_set.names})
            else:
                self._send(404, {"error": f"unknown path {self.path!r}; use /health or /score"})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/score":
                self._send(404, {"error": f"unknown path {self.path!r}; POST /score"}, close=True)
                return
            length_s = self.headers.get("Content-Length")
            try:
                length = int(length_s) if length_s is not None else -1
            except ValueError:
                length = -1
            if length < 0:
                self._send(411, {"error": "a valid Content-Length header is required"}, True)
                return
            if length > max_bytes:
                msg = f"request body of {length} bytes exceeds the limit of {max_bytes} bytes"
                self._send(413, {"error": msg}, close=True)
                return
            body = self.rfile.read(length)
            if token is not None:
                auth = self.headers.get("Authorization", "")
                if not hmac.compare_digest(auth.encode(), f"Bearer {token}".encode()):
                    self._send(401, {"error": "missing or wrong bearer token"})
                    return
            try:
                req = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                self._send(400, {"error": f"body is not valid JSON: {e}"})
                return
            try:
                self._send(200, service.score(req))
            except BadRequest as e:
                self._send(400, {"error": str(e)})
            except (RewardError, Exception) as e:  # keep serving whatever a reward does
                self._send(500, {"error": f"{type(e).__name__}: {e}"})

    return Handler


def build_server(
    names: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    batch_size: int = 32,
    kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> ThreadingHTTPServer:
    """Build the rewards and a bound (not yet serving) HTTP server; ``port=0`` picks a free
    port, read it back from ``server.server_address``."""
    sources = parse_names(names)
    kw = {k: dict(v) for k, v in (kwargs or {}).items()}
    for alias, source in sources.items():
        kw.setdefault(alias, {})["source"] = source
    reward_set = RewardSet(dict.fromkeys(sources, 1.0), kw, batch_size=batch_size)
    handler = make_handler(RewardService(reward_set), token, max_bytes)
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(
    names: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 8900,
    token: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    batch_size: int = 32,
    kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Serve until interrupted. Prints ``serving <names> on http://host:port`` once bound."""
    server = build_server(names, host, port, token, max_bytes, batch_size, kwargs)
    h, p = server.server_address[:2]
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: reward server bound to {host}, reachable beyond loopback", flush=True)
    print(f"serving {list(parse_names(names))} on http://{h}:{p}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point (``branchgrpo serve-reward`` may call this)."""
    p = argparse.ArgumentParser(
        prog="branchgrpo.rewards.server", description=__doc__.split("\n")[0]
    )
    p.add_argument("names", nargs="+", help="rewards: NAME, pkg.mod:fn, or alias=source")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8900, help="port; 0 picks a free one")
    p.add_argument(
        "--token",
        default=os.environ.get("BRANCHGRPO_REWARD_TOKEN"),
        help="bearer token required on /score (default $BRANCHGRPO_REWARD_TOKEN)",
    )
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="request size limit")
    p.add_argument("--batch-size", type=int, default=32, help="pointwise reward chunk size")
    p.add_argument("--kwargs", default="{}", help='JSON {"name": {kwarg: value}} for the rewards')
    p.add_argument("--device", default=None, help="device for every model reward (e.g. cuda)")
    a = p.parse_args(argv)
    try:
        kwargs = json.loads(a.kwargs)
    except json.JSONDecodeError as e:
        p.error(f"--kwargs is not valid JSON: {e}")
    if a.device:
        for alias, source in parse_names(a.names).items():
            if source in REWARDS:  # registered model rewards take device=; user paths may not
                kwargs.setdefault(alias, {}).setdefault("device", a.device)
    serve(a.names, a.host, a.port, a.token, a.max_bytes, a.batch_size, kwargs)


if __name__ == "__main__":
    main(sys.argv[1:])

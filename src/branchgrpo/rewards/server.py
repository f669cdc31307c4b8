"""A reward server: score media over HTTP with rewards that live in another process/venv.

    branchgrpo serve-reward jpeg_compressibility hps=hpsv2 --port 8900 --token SECRET

Each NAME is a registered reward, a dotted path ``pkg.mod:fn``, or ``alias=source`` (served
under ``alias``). ``--kwargs '{"hps": {"device": "cuda"}}'`` passes constructor arguments.

Protocol (JSON only, no pickle; see docs/rewards.md):

- ``GET /health`` -> ``{"status": "ok", "rewards": [names], "batching": {counters}}``.
- ``POST /score`` with ``{"media": <see media.decode_media>, "prompts": [str], "rewards":
  [subset]?, "group": [int]?}`` -> ``{"scores": {name: [float]}}``.
- Errors are ``{"error": message}``: 400 malformed, 401 token, 404/405 path or method, 408 body
  too slow, 413 too many bytes or pixels, 500 a reward failed, 503 (uvicorn) too many
  connections. The server keeps serving after any of them.

Starlette + uvicorn, not ``http.server`` (docs/rewards.md): the body is an async stream, checked
against token and limits before and while it is read; `guarded_h11` adds the deadlines uvicorn
lacks.

Scoring uses dynamic batching (:class:`Batcher`): requests from several clients are queued, and
one worker merges compatible ones (same media shape and reward subset, up to ``--max-batch``
images, waiting at most ``--max-wait-ms`` for more), scores them in one call on one thread (a
reward never sees two batches at once) and splits the scores back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

try:
    import h11
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"the reward server needs starlette and uvicorn ({e}); pip install "
                      "'branchgrpo[serve]'") from e

from branchgrpo.rewards.base import REWARDS, RewardSet
from branchgrpo.rewards.media import MediaTooLarge, decode_media

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
MAX_JSON_DEPTH = 32
"""The protocol nests 4 deep; anything deeper than this is refused before ``json.loads``."""

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_MAX_GROUP_ID = 2**62


class ClientError(ValueError):
    """A request the client must change: answered with ``status`` (4xx) and the message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request and one connection may cost (see ``--help`` for each)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    read_timeout: float = 30.0
    keep_alive: float = 5.0
    max_connections: int = 128

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.read_timeout <= 0 or self.keep_alive <= 0:
            raise ValueError("read_timeout and keep_alive must be > 0 seconds")


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


# --- request parsing (runs in a worker thread) -------------------------------------------------


def check_json_depth(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Raise :class:`ClientError` if ``body`` nests arrays/objects deeper than ``max_depth``.

    Strings are blanked first (brackets inside them do not count); the depth is a running sum
    over 1 MiB chunks, so the check costs O(len) time and O(1 MiB) memory whatever the input."""
    structural = np.frombuffer(_JSON_STRING.sub(b'""', body), dtype=np.uint8)
    depth, step = 0, 1 << 20
    for start in range(0, len(structural), step):
        c = structural[start : start + step]
        delta = (c == ord("[")).view(np.int8) + (c == ord("{")).view(np.int8)
        delta -= (c == ord("]")).view(np.int8) + (c == ord("}")).view(np.int8)
        run = np.cumsum(delta, dtype=np.int32) + depth
        if int(run.max()) > max_depth:
            raise ClientError(f"JSON nests deeper than {max_depth} levels; the protocol needs 4")
        depth = int(run[-1])


@dataclass
class Job:
    """One validated request: media ``[B, ...]``, B prompts, the reward subset, group ids."""

    media: Tensor
    prompts: list[str]
    names: tuple[str, ...]
    group: Tensor | None = None

    @property
    def size(self) -> int:
        return len(self.prompts)

    @property
    def key(self) -> tuple[Any, ...]:
        """Requests with equal keys can be scored in one batch."""
        return (tuple(self.media.shape[1:]), self.names)


def _group_ids(group: Any, n: int) -> Tensor:
    if not isinstance(group, list) or not all(
        isinstance(g, int) and not isinstance(g, bool) and 0 <= g < _MAX_GROUP_ID for g in group
    ):
        raise ClientError(f'"group" must be a list of ints in [0, 2^62), got {str(group)[:80]}')
    if len(group) != n:
        raise ClientError(f'"group" has {len(group)} ids for {n} prompts')
    return torch.tensor(group, dtype=torch.long)


def parse_request(body: bytes, served: Sequence[str], max_pixels: int) -> Job:
    """Validate a ``POST /score`` body into a :class:`Job`; :class:`ClientError` otherwise."""
    check_json_depth(body)
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ClientError(f"body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise ClientError("request body must be a JSON object")
    if "media" not in req or "prompts" not in req:
        raise ClientError('request needs "media" and "prompts"')
    prompts = req["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ClientError('"prompts" must be a list of strings')
    names = list(served) if req.get("rewards") is None else req["rewards"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ClientError('"rewards" must be a list of reward names')
    unknown = [n for n in names if n not in served]
    if unknown:
        raise ClientError(f"unknown reward(s) {unknown}; served: {list(served)}")
    group = None if req.get("group") is None else _group_ids(req["group"], len(prompts))
    try:
        media = decode_media(req["media"], max_pixels=max_pixels)
    except MediaTooLarge as e:
        raise ClientError(str(e), 413) from None
    except ValueError as e:
        raise ClientError(str(e)) from None
    if media.shape[0] != len(prompts):
        raise ClientError(f"got {media.shape[0]} media but {len(prompts)} prompts")
    return Job(media, prompts, tuple(names), group)


# --- dynamic batching ---------------------------------------------------------------------------


def score_jobs(reward_set: RewardSet, jobs: Sequence[Job]) -> list[dict[str, list[float]]]:
    """Score compatible jobs in one ``RewardSet.score`` call and split the scores per job.

    Group ids are made dense per job and offset, so a groupwise reward sees each job's groups
    separately (a job without ids is one group, as when scored alone)."""
    if len(jobs) == 1:
        media, prompts, group = jobs[0].media, jobs[0].prompts, jobs[0].group
    else:
        media = torch.cat([j.media for j in jobs])
        prompts = [p for j in jobs for p in j.prompts]
        groups, offset = [], 0
        for j in jobs:
            dense = (
                torch.zeros(j.size, dtype=torch.long)
                if j.group is None
                else torch.unique(j.group, return_inverse=True)[1]
            )
            groups.append(dense + offset)
            offset += int(dense.max()) + 1
        group = torch.cat(groups)
    with torch.no_grad():
        scores = reward_set.score(media, prompts, group, names=list(jobs[0].names))
    sizes = [j.size for j in jobs]
    parts = {name: s.split(sizes) for name, s in scores.items()}
    return [{name: p[i].tolist() for name, p in parts.items()} for i in range(len(jobs))]


@dataclass
class _Pending:
    job: Job
    future: asyncio.Future[dict[str, list[float]]]


@dataclass
class Batcher:
    """Queue requests and score them in merged batches on one worker thread.

    ``max_batch``: images per merged batch (a larger request is scored alone). ``max_wait_s``:
    how long the worker may wait for more requests when the queue runs dry; it waits only while
    some request is still arriving (inside :meth:`arriving`: body being read or decoded), so a
    lone client adds no latency. ``merge=False``
    scores one request at a time (for rewards whose scores depend on the batch composition).
    If a merged batch fails, each of its requests is rescored alone, so only the request that
    breaks the reward gets the error."""

    reward_set: RewardSet
    max_batch: int = 64
    max_wait_s: float = 0.01
    merge: bool = True
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_wait_s < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_s >= 0")
        self.stats.update(merging=self.merge, requests=0, batches=0, images=0, largest_batch=0)
        self._pending: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="reward-score")
        self._task: asyncio.Task[None] | None = None
        self._arriving = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way (read and decode it inside this block)."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._wake.set()

    async def score(self, job: Job) -> dict[str, list[float]]:
        """Queue ``job``; returns its scores (or raises what scoring it raised)."""
        fut: asyncio.Future[dict[str, list[float]]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(job, fut))
        self._wake.set()
        return await fut

    async def _take(self) -> list[_Pending]:
        while not self._pending:
            self._wake.clear()
            await self._wake.wait()
        taken = [self._pending.popleft()]
        if not self.merge:
            return taken
        n, loop = taken[0].job.size, asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while n < self.max_batch:
            if self._pending:
                if n + self._pending[0].job.size > self.max_batch:
                    break
                taken.append(self._pending.popleft())
                n += taken[-1].job.size
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or not self._arriving:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return taken

    async def _run(self) -> None:
        loop, st = asyncio.get_running_loop(), self.stats
        while True:
            by_key: dict[tuple[Any, ...], list[_Pending]] = {}
            for p in await self._take():
                by_key.setdefault(p.job.key, []).append(p)
            for part in by_key.values():
                jobs = [p.job for p in part]
                results = await loop.run_in_executor(self._pool, self._score_isolated, jobs)
                n = sum(j.size for j in jobs)
                st["requests"] += len(jobs)
                st["batches"] += 1
                st["images"] += n
                st["largest_batch"] = max(st["largest_batch"], n)
                for p, r in zip(part, results, strict=True):
                    if p.future.done():
                        continue
                    if isinstance(r, Exception):
                        p.future.set_exception(r)
                    else:
                        p.future.set_result(r)

    def _score_isolated(self, jobs: list[Job]) -> list[dict[str, list[float]] | Exception]:
        try:
            return list(score_jobs(self.reward_set, jobs))
        except Exception as e:  # keep serving whatever a reward does
            if len(jobs) == 1:
                return [e]
        return [self._score_isolated([j])[0] for j in jobs]


# --- HTTP -----------------------------------------------------------------------------------


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_body(receive: AsyncIterator[bytes], max_bytes: int) -> bytes:
    parts, n = [], 0
    async for chunk in receive:
        n += len(chunk)
        if n > max_bytes:
            raise ClientError(f"request body exceeds the limit of {max_bytes} bytes", 413)
        parts.append(chunk)
    return b"".join(parts)


def build_app(
    reward_set: RewardSet, batcher: Batcher, token: str | None = None, limits: Limits = Limits()
) -> Starlette:
    """The Starlette app: ``GET /health`` and ``POST /score`` (see the module docstring)."""
    expected = f"Bearer {token}".encode() if token is not None else None
    decode_pool = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="decode")

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {"status": "ok", "rewards": reward_set.names, "batching": dict(batcher.stats)}
        )

    async def score(request: Request) -> JSONResponse:
        # everything from the headers first: no byte of the body is read for a refused request
        auth = request.headers.get("authorization", "").encode("latin-1")
        if expected is not None and not hmac.compare_digest(auth, expected):
            return _error(401, "missing or wrong bearer token (send 'Authorization: Bearer "
                          "<the server's --token>')")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_bytes:
            return _error(413, f"request body of {declared} bytes exceeds the limit of "
                          f"{limits.max_bytes} bytes (the server's --max-bytes)")
        try:
            with batcher.arriving():
                body = await asyncio.wait_for(
                    _read_body(request.stream(), limits.max_bytes), limits.read_timeout
                )
                job = await asyncio.get_running_loop().run_in_executor(
                    decode_pool, parse_request, body, reward_set.names, limits.max_pixels
                )
        except asyncio.TimeoutError:
            return _error(408, f"request body not received within {limits.read_timeout} s "
                          "(the server's --read-timeout)")
        except ClientError as e:
            return _error(e.status, str(e))
        except ClientDisconnect:
            return _error(400, "client disconnected before the body was complete")
        del body
        try:
            scores = await batcher.score(job)
        except Exception as e:  # a reward failed: the request was fine
            return _error(500, f"{type(e).__name__}: {e}")
        return JSONResponse({"scores": scores})

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        code = getattr(exc, "status_code", 404)
        return _error(code, f"no {request.method} {request.url.path}; use GET /health or "
                      "POST /score")

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            decode_pool.shutdown(wait=False, cancel_futures=True)

    routes = [Route("/health", health, methods=["GET"]), Route("/score", score, methods=["POST"])]
    return Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: not_found}
    )


def guarded_h11(read_timeout: float, idle_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the two deadlines uvicorn lacks.

    - A new or idle connection that sends nothing for ``idle_timeout`` s is closed (uvicorn
      only times out idle keep-alive connections after a first response).
    - Once a request's first byte arrives, the whole request (headers and body, or the unread
      rest of a refused body, which uvicorn discards) must arrive within ``read_timeout`` s.
      While the app works on a fully received request no deadline runs."""

    class GuardedH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _reading = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm(idle_timeout, reading=False)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.DONE:
                self._disarm()
            elif not self._reading:
                self._arm(read_timeout, reading=True)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self._reading:
                self._arm(idle_timeout, reading=False)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, seconds: float, reading: bool) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expire)
            self._reading = reading

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline, self._reading = None, False

        def _expire(self) -> None:
            self._deadline, self._reading = None, False
            if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11


# --- serving and the command line -------------------------------------------------------------


@dataclass
class RewardServer:
    """A bound, listening socket and the uvicorn server that will serve on it."""

    server: uvicorn.Server
    sock: socket.socket

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM (uvicorn's handlers), then close the socket."""
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()


def build_server(
    names: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    limits: Limits = Limits(),
    batch_size: int = 32,
    kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    max_batch: int = 64,
    max_wait_ms: float = 10.0,
    merge: bool = True,
    reuse_port: bool = False,
) -> RewardServer:
    """Build the rewards, bind and listen (``port=0`` picks a free port, see ``.address``);
    ``reuse_port`` sets ``SO_REUSEPORT`` so several server processes can share one port."""
    sources = parse_names(names)
    kw = {k: dict(v) for k, v in (kwargs or {}).items()}
    for alias, source in sources.items():
        kw.setdefault(alias, {})["source"] = source
    reward_set = RewardSet(dict.fromkeys(sources, 1.0), kw, batch_size=batch_size)
    batcher = Batcher(reward_set, max_batch, max_wait_ms / 1000, merge)
    app = build_app(reward_set, batcher, token, limits)
    verbose = bool(os.environ.get("BRANCHGRPO_REWARD_LOG"))
    config = uvicorn.Config(
        app,
        http=guarded_h11(limits.read_timeout + 1.0, limits.keep_alive),
        lifespan="on",
        # uvicorn answers 503 once this many connections *including the new one* are open
        limit_concurrency=limits.max_connections + 1,
        timeout_keep_alive=limits.keep_alive,
        log_level=logging.INFO if verbose else logging.WARNING,
        access_log=verbose,
    )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048, reuse_port=reuse_port)
    return RewardServer(uvicorn.Server(config), sock)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The server's options (``python -m`` and ``branchgrpo serve-reward`` both use them)."""
    lim = Limits()
    p.add_argument("names", nargs="+", help="rewards: NAME, pkg.mod:fn, or alias=source")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8900, help="port; 0 picks a free one")
    p.add_argument("--token", default=os.environ.get("BRANCHGRPO_REWARD_TOKEN"),
                   help="bearer token required on /score (default $BRANCHGRPO_REWARD_TOKEN)")
    p.add_argument("--reuse-port", action="store_true",
                   help="set SO_REUSEPORT: several server processes share one port (Linux)")
    g = p.add_argument_group("limits (per request / per connection)")
    g.add_argument("--max-bytes", type=int, default=lim.max_bytes,
                   help="request body limit in bytes (413 above; default 64 MiB)")
    g.add_argument("--max-pixels", type=int, default=lim.max_pixels,
                   help="decoded pixels per request, images x frames x H x W, checked before "
                   "decoding (413 above; default 64 Mi)")
    g.add_argument("--read-timeout", type=float, default=lim.read_timeout,
                   help="seconds for a whole request body to arrive (408 after; default 30)")
    g.add_argument("--keep-alive", type=float, default=lim.keep_alive,
                   help="seconds an idle connection stays open (default 5)")
    g.add_argument("--max-connections", type=int, default=lim.max_connections,
                   help="open connections served at once; more get 503 (default 128)")
    b = p.add_argument_group("batching")
    b.add_argument("--max-batch", type=int, default=64,
                   help="images per merged batch of concurrent requests (default 64)")
    b.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long to wait for more requests to merge (default 10 ms)")
    b.add_argument("--no-batching", action="store_true", help="score one request at a time "
                   "(for rewards whose scores depend on the batch composition)")
    b.add_argument("--batch-size", type=int, default=32,
                   help="chunk size a pointwise reward is called with (default 32)")
    p.add_argument("--kwargs", default="{}", help='JSON {"name": {kwarg: value}} for the rewards')
    p.add_argument("--device", default=None, help="device for every model reward (e.g. cuda)")


def main(argv: Sequence[str] | None = None, prog: str = "branchgrpo.rewards.server") -> int:
    """Command line entry point (``branchgrpo serve-reward`` calls this). Prints ``serving
    <names> on http://host:port`` once listening, then serves until interrupted."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add_arguments(p)
    a = p.parse_args(argv)
    try:
        kwargs = json.loads(a.kwargs)
    except json.JSONDecodeError as e:
        p.error(f"--kwargs is not valid JSON: {e}")
    if a.device:
        for alias, source in parse_names(a.names).items():
            if source in REWARDS:  # registered model rewards take device=; user paths may not
                kwargs.setdefault(alias, {}).setdefault("device", a.device)
    try:
        limits = Limits(a.max_bytes, a.max_pixels, a.read_timeout, a.keep_alive,
                        a.max_connections)
        server = build_server(a.names, a.host, a.port, a.token, limits, a.batch_size, kwargs,
                              a.max_batch, a.max_wait_ms, not a.no_batching, a.reuse_port)
    except ValueError as e:
        p.error(str(e))
    (h, port), names = server.address, list(parse_names(a.names))
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: reward server bound to {a.host}, reachable beyond loopback", flush=True)
    print(f"serving {names} on http://{f'[{h}]' if ':' in h else h}:{port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Client for the reward server (:mod:`branchgrpo.rewards.server`), and the ``remote`` reward.

``build_reward("remote", url=..., name="hps")`` returns one :class:`RemoteReward` per remote
reward name, so a :class:`~branchgrpo.rewards.base.RewardSet` treats it like a local reward::

    RewardSet({"hps": 0.7, "clip": 1.4},
              {"hps": {"source": "remote", "url": URL}, "clip": {"source": "remote", "url": URL}})

Remote rewards built with the same url/token/timeouts share one :class:`RemoteClient`, which asks
the server for *all* the names its rewards need in one request and keeps the last answer, so
scoring the same batch with several remote rewards uploads it once.

Failures: connection errors, timeouts and HTTP 5xx are retried ``retries`` times with
exponential backoff (``backoff * 2**k`` seconds); HTTP 4xx is not retried. Then
:class:`~branchgrpo.rewards.base.RewardError` names the URL, the number of tries and the last
error. NaN, inf or missing scores also raise RewardError.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from branchgrpo.rewards.base import REWARDS, RewardError, check_scores
from branchgrpo.rewards.media import encode_media


def request_json(
    method: str,
    url: str,
    body: bytes | None,
    headers: dict[str, str],
    timeout: float,
    retries: int,
    backoff: float,
    what: str = "server",
) -> Any:
    """One JSON HTTP call with bounded retries: ``retries + 1`` tries, sleeping
    ``backoff * 2**k`` between them; HTTP 4xx is not retried. Raises RewardError naming the URL,
    the number of tries and the last error."""
    last = ""
    tries = retries + 1
    for k in range(tries):
        req = urllib.request.Request(url, body, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            last = f"HTTP {e.code}: {detail}"
            if 400 <= e.code < 500:  # the request itself is wrong: retrying cannot help
                raise RewardError(f"{what} {url} rejected the request: {last}") from None
        except (OSError, json.JSONDecodeError) as e:  # URLError, timeouts, resets
            last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        if k + 1 < tries:
            time.sleep(backoff * 2**k)
    raise RewardError(f"{what} {url} failed after {tries} tries; last error: {last}")


class RemoteClient:
    """HTTP client for one reward server.

    ``fmt``/``dtype``: media encoding on the wire (``"array"`` + ``"uint8"`` by default: values
    ``round(255 x)``, the same quantisation a PNG has, without PNG encoding cost).
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        fmt: str = "array",
        dtype: str = "uint8",
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.url = url.rstrip("/")
        self.token, self.timeout, self.retries, self.backoff = token, timeout, retries, backoff
        self.fmt, self.dtype = fmt, dtype
        self.wanted: dict[str, bool] = {}  # name -> groupwise, registered by RemoteReward
        self._lock = threading.Lock()
        self._cache: tuple[str, dict[str, Tensor]] | None = None

    def _request(self, method: str, path: str, body: bytes | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return request_json(
            method,
            self.url + path,
            body,
            headers,
            self.timeout,
            self.retries,
            self.backoff,
            "reward server",
        )

    def health(self) -> dict[str, Any]:
        """``GET /health`` -> ``{"status": "ok", "rewards": [...]}``."""
        return self._request("GET", "/health")

    def score(
        self,
        media: Tensor,
        prompts: Sequence[str],
        names: Sequence[str] | None = None,
        group: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Score media ``[B, ...]`` remotely -> name -> fp32 ``[B]`` (all names the server has,
        or ``names``). Scores are validated with ``check_scores``."""
        b = media.shape[0]
        req: dict[str, Any] = {
            "media": encode_media(media, self.fmt, self.dtype),
            "prompts": list(prompts),
        }
        if names is not None:
            req["rewards"] = list(names)
        if group is not None:
            req["group"] = [int(g) for g in group.tolist()]
        body = json.dumps(req).encode()
        key = hashlib.sha256(body).hexdigest()
        with self._lock:
            if self._cache is not None and self._cache[0] == key:
                return dict(self._cache[1])
        resp = self._request("POST", "/score", body)
        raw = resp.get("scores") if isinstance(resp, dict) else None
        if not isinstance(raw, dict):
            raise RewardError(f"reward server {self.url} answered without a 'scores' object")
        expected = list(names) if names is not None else list(raw)
        missing = [n for n in expected if n not in raw]
        if missing:
            raise RewardError(f"reward server {self.url} returned no scores for {missing}")
        out = {n: check_scores(f"remote:{n}", raw[n], b) for n in expected}
        with self._lock:
            self._cache = (key, out)
        return dict(out)


class RemoteReward:
    """One reward computed by a server: ``__call__(media, prompts) -> [B]``."""

    def __init__(self, name: str, client: RemoteClient, groupwise: bool = False) -> None:
        self.name, self.client, self.groupwise = name, client, groupwise
        client.wanted[name] = groupwise

    def __call__(self, media: Tensor, prompts: Sequence[str]) -> Tensor:
        # ask for every name of this client with the same calling pattern in one request
        names = [n for n, g in self.client.wanted.items() if g == self.groupwise]
        return self.client.score(media, prompts, names=names)[self.name]


_CLIENTS: dict[tuple[Any, ...], RemoteClient] = {}
_CLIENTS_LOCK = threading.Lock()


@REWARDS.register("remote")
def remote(
    url: str,
    name: str | None = None,
    names: Sequence[str] | None = None,
    token: str | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 0.5,
    wire_format: str = "array",
    wire_dtype: str = "uint8",
    groupwise: bool = False,
    **_: object,
) -> RemoteReward:
    """The remote reward ``name`` (or ``names=[name]``) served at ``url``.

    ``groupwise=True`` marks it groupwise, so a RewardSet sends one group per request. Other
    keyword arguments (``device``, ``dtype`` of local rewards) are ignored. ``wire_format`` /
    ``wire_dtype``: the media encoding (see :class:`RemoteClient`)."""
    if names is not None:
        if name is not None or len(names) != 1:
            raise ValueError(
                "remote: give one name per reward (name='hps'); build one remote reward per "
                f"served name, they share a client and one request. Got name={name!r}, "
                f"names={list(names)!r}"
            )
        name = names[0]
    if not name:
        raise ValueError("remote: the remote reward name is required (name='hps')")
    key = (url.rstrip("/"), token, timeout, retries, backoff, wire_format, wire_dtype)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = RemoteClient(url, token, timeout, retries, backoff, wire_format, wire_dtype)
            _CLIENTS[key] = client
    return RemoteReward(name, client, groupwise)

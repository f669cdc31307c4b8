"""The reward server against hostile or broken clients (loopback only, seconds each): slow
bodies and headers, unauthenticated big bodies, pixel bombs, deep JSON, bad ints. Each test
checks the server still answers afterwards, and memory tests read its peak RSS (VmHWM)."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.request

import pytest
from server_testlib import (
    array_media,
    closed_by_peer,
    connect,
    good_request,
    launch,
    port_of,
    stop,
)

from branchgrpo.rewards.loadtest import memory_kb, png_bomb, post_head, read_response

TOKEN = "t0ken"
MB = 1024 * 1024


@pytest.fixture(scope="module")
def server():
    # started through the CLI with every option before the reward name (this used to fail)
    proc, url = launch(
        "-c", "import sys; from branchgrpo.cli import main; sys.exit(main(sys.argv[1:]))",
        "serve-reward", "--port", "0", "--token", TOKEN, "--read-timeout", "1",
        "--keep-alive", "1", "--max-pixels", "1000000", "--max-bytes", str(64 * MB),
        "jpeg_compressibility",
    )
    yield proc, url
    stop(proc)


def post(url: str, obj: object, token: str | None = TOKEN) -> tuple[int, dict]:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    with connect(port_of(url)) as s:
        s.sendall(post_head(len(body), token) + body)
        return read_response(s)


def healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.loads(r.read())["status"] == "ok"


def test_slow_body_gets_408_at_the_read_deadline_and_others_are_served(server):
    _, url = server
    port = port_of(url)
    slow = [connect(port) for _ in range(40)]
    t0 = time.monotonic()
    for s in slow:  # a body that never completes
        s.sendall(post_head(1000, TOKEN) + b'{"media": ')
    assert healthy(url) and post(url, good_request())[0] == 200  # served meanwhile
    for s in slow:
        status, obj = read_response(s)
        assert status == 408 and "--read-timeout" in obj["error"]
    assert time.monotonic() - t0 < 4.0  # deadline 1 s
    for s in slow:  # and the connection is then closed, not left to trickle
        assert closed_by_peer(s)
        s.close()
    assert healthy(url)


def test_slow_headers_and_idle_connections_are_closed(server):
    _, url = server
    port = port_of(url)
    idle, loris = connect(port, timeout=5), connect(port, timeout=5)
    t0 = time.monotonic()
    head = post_head(10, TOKEN)
    for i in range(40):  # trickle header bytes: the deadline is from the first byte
        try:
            loris.sendall(head[i : i + 1])
        except OSError:
            break
        time.sleep(0.1)
    assert closed_by_peer(loris), "slow headers must not hold a connection"
    assert closed_by_peer(idle), "a connection that sends nothing is closed after --keep-alive"
    assert time.monotonic() - t0 < 5.0
    idle.close()
    loris.close()
    assert healthy(url)


def test_unauthenticated_big_bodies_get_401_before_the_body_is_read(server):
    proc, url = server
    port, n, size = port_of(url), 10, 16 * MB
    peak0 = memory_kb(proc.pid, "VmHWM")
    socks = [connect(port) for _ in range(n)]
    for s in socks:  # the headers and a first slice only: the 401 must not wait for the rest
        s.sendall(post_head(size, token="wrong") + b"x" * 65536)
    for s in socks:
        status, obj = read_response(s)
        assert status == 401 and "token" in obj["error"]

    def send_rest(s):  # then push the whole bodies anyway; the server discards them
        try:
            s.sendall(b"x" * (size - 65536))
        except OSError:
            pass

    threads = [threading.Thread(target=send_rest, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for s in socks:
        s.close()
    assert healthy(url)
    grown_mb = (memory_kb(proc.pid, "VmHWM") - peak0) / 1024
    assert grown_mb < size / MB, f"peak RSS grew {grown_mb:.0f} MB for refused bodies"


def test_oversized_and_chunked_bodies_get_413(server):
    _, url = server
    with connect(port_of(url)) as s:  # declared too large: refused from the header
        s.sendall(post_head(65 * MB, TOKEN))
        status, obj = read_response(s)
        assert status == 413 and "--max-bytes" in obj["error"]
    with connect(port_of(url)) as s:  # chunked, no length: the limit holds while streaming
        s.sendall(post_head(None, TOKEN, chunked=True))
        piece = b"%x\r\n%s\r\n" % (MB, b" " * MB)
        status = None
        try:
            for _ in range(70):
                s.sendall(piece)
        except OSError:
            pass
        status, obj = read_response(s)
        assert status == 413 and "exceeds the limit" in obj["error"]
    assert healthy(url)


def test_pixel_bomb_is_refused_from_the_header(server):
    proc, url = server
    bomb = png_bomb(4096, 4096)  # ~50 MB of RGB, 200 MB as float32
    assert len(bomb) < 200_000
    peak0 = memory_kb(proc.pid, "VmHWM")
    t0 = time.monotonic()
    status, obj = post(url, {"media": {"format": "png", "data": [base64.b64encode(bomb).decode()]},
                             "prompts": ["x"]})
    assert status == 413 and "--max-pixels" in obj["error"], obj
    assert time.monotonic() - t0 < 2.0
    assert (memory_kb(proc.pid, "VmHWM") - peak0) / 1024 < 30
    # the limit is per request: two images of 0.64 Mpx each are over 1 Mpx, one is fine
    one = base64.b64encode(png_bomb(800, 800)).decode()
    assert post(url, {"media": {"format": "png", "data": [one, one]}, "prompts": ["a", "b"]})[
        0
    ] == 413
    assert post(url, {"media": {"format": "png", "data": [one]}, "prompts": ["a"]})[0] == 200
    # an array's declared shape is checked before its bytes
    status, obj = post(url, {"media": array_media([1000, 3, 100, 100]), "prompts": ["x"] * 1000})
    assert status == 413 and "10000000 pixels" in obj["error"]
    assert healthy(url)


@pytest.mark.parametrize(
    "body",
    [b"[" * 200_000 + b"]" * 200_000, b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
     b'{"media": ' + b"[" * 40 + b"]" * 40 + b', "prompts": []}'],
    ids=["arrays", "objects", "just-over-the-limit"],
)
def test_deeply_nested_json_is_400(server, body):
    _, url = server
    t0 = time.monotonic()
    status, obj = post(url, body)
    assert status == 400 and "nests deeper than" in obj["error"]
    assert time.monotonic() - t0 < 2.0
    assert healthy(url)


def test_brackets_inside_strings_do_not_count_as_nesting(server):
    _, url = server
    req = good_request()
    req["prompts"] = ['[[[[{{{{"' * 50]
    assert post(url, req)[0] == 200
    assert post(url, {**req, "rewards": None})[0] == 200  # null: every reward, as before


@pytest.mark.parametrize(
    "change",
    [
        {"media": array_media([True, 3, 2, 2], base64.b64encode(bytes(12)).decode())},
        {"media": array_media([1, 3, 2.0, 2], base64.b64encode(bytes(12)).decode())},
        {"media": array_media([1, 3, -2, -2], base64.b64encode(bytes(12)).decode())},
        {"media": array_media([1, 3, 2, 2], 12345)},
        {"media": {"format": "png", "data": ["aGVsbG8="], "frames": True}},
        {"group": [True]},
        {"group": [-1]},
        {"group": [1.5]},
        {"group": [10**30]},
        {"group": "0"},
        {"prompts": [1]},
        {"rewards": "jpeg_compressibility"},
    ],
    ids=["bool-dim", "float-dim", "negative-dims", "b64-not-str", "bool-frames", "bool-group",
         "negative-group", "float-group", "huge-group", "group-not-list", "int-prompt",
         "rewards-not-list"],
)
def test_wrong_types_are_400_not_500(server, change):
    _, url = server
    status, obj = post(url, {**good_request(), **change})
    assert status == 400 and obj["error"], obj
    assert post(url, good_request())[0] == 200


def test_unknown_paths_and_methods_are_json_4xx(server):
    _, url = server
    for method, path, code in [("GET", "/nope", 404), ("GET", "/score", 405)]:
        with connect(port_of(url)) as s:
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, obj = read_response(s)
        assert status == code and "POST /score" in obj["error"]


def test_serve_reward_help_exits_0(capsys):
    from testlib import cli

    out = cli(capsys, "serve-reward", "--help")[1]  # asserts exit 0
    assert "--max-pixels" in out and "--read-timeout" in out


def test_connections_over_the_cap_get_503_and_are_served_again_after():
    proc, url = launch("-m", "branchgrpo.rewards.server", "jpeg_compressibility", "--port", "0",
                       "--max-connections", "2", "--read-timeout", "2")
    try:
        port = port_of(url)
        busy = [connect(port) for _ in range(2)]
        for s in busy:  # two requests in progress hold both slots
            s.sendall(post_head(1000) + b"{")
        time.sleep(0.2)
        with connect(port) as s:
            s.sendall(post_head(2) + b"{}")
            assert read_response_status(s) == 503
        for s in busy:
            assert read_response(s)[0] == 408
            s.close()
        assert post(url, good_request(), token=None)[0] == 200
    finally:
        stop(proc)


def read_response_status(sock) -> int:
    """The status of a response whose body may not be JSON (uvicorn's 503 is plain text)."""
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed before a status line; got {buf!r}")
        buf += chunk
    return int(buf.split(b" ", 2)[1])

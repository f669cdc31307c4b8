"""``log.wandb=true``: a run under ``WANDB_MODE=offline`` writes a wandb run whose history holds
every numeric value of ``metrics.jsonl`` at the same step, the held-out sample grids and the
report's plots; a resumed run is a second wandb run in the same group; without the package
or a login the run stops before any model loads, saying what to do."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from branchgrpo.config import ConfigError, load_config
from branchgrpo.preflight import _check_wandb
from testlib import cli, cli_env, metrics, run_cli, small_args

pytestmark = pytest.mark.slow


def wandb_history(run_file: Path) -> dict[int, dict]:
    """{step: the values logged at it} of a ``run-*.wandb`` file: its records are protobufs
    in the leveldb log format (a 7-byte file header, 32 KiB blocks, each chunk a 7-byte
    header of crc32, length and type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos = run_file.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    chunks, records = b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunks += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            records.append(chunks)
            chunks = b""
    out: dict[int, dict] = {}
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                   for i in rec.history.item}
            out.setdefault(row["_step"], {}).update(row)
    return out


def test_offline_wandb_run_has_the_metrics_the_grids_and_the_plots(tmp_path, cache_dir):
    run = tmp_path / "run"
    env = {**cli_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    run_cli("train", *small_args(cache_dir, run, "train.iterations=1", "log.wandb=true",
                                 "log.checkpoint_every=1"), env=env)
    (first,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    hist = wandb_history(first)
    want: dict[int, dict] = {}
    for row in metrics(run):
        want.setdefault(row["iteration"], {}).update(
            {k: v for k, v in row.items() if isinstance(v, (int, float))
             and not isinstance(v, bool) and k != "iteration"})
    assert sorted(hist) == sorted(want) == [0, 1]
    for step, values in want.items():
        assert {k: hist[step][k] for k in values} == values, step
    images = {k.removesuffix("/_type"): step for step, row in hist.items() for k, v in row.items()
              if k.endswith("/_type") and v == "image-file"}
    assert images == {"samples/before": 0, "samples/after": 1, "plots/heldout": 1,
                      "plots/monitors": 1, "plots/phase_times": 1,
                      "plots/reward_per_iteration": 1, "plots/reward_per_second": 1}
    for key, step in images.items():
        assert (first.parent / "files" / hist[step][f"{key}/path"]).is_file()

    run_cli("train", "--resume", str(run), "train.iterations=2", env=env)
    runs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2
    (second,) = [r for r in runs if r != first]
    assert sorted(wandb_history(second)) == [2]


def test_wandb_refused_before_models_load_without_package_or_login(tmp_path, monkeypatch,
                                                                   capsys):
    import importlib.util

    cfg = load_config(None, ["log.wandb=true"])
    for k in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(ConfigError, match="wandb login.*WANDB_MODE=offline"):
        _check_wandb(cfg)
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    _check_wandb(cfg)
    monkeypatch.setenv("WANDB_MODE", "offline")
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else find(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'branchgrpo\[wandb\]'"):
        _check_wandb(cfg)
    with pytest.raises(ConfigError, match="log.wandb_project is empty"):
        load_config(None, ["log.wandb=true", "log.wandb_project=''"])
    monkeypatch.undo()  # the real find_spec and environment, then no login:
    for k, v in {"WANDB_MODE": "online", "NETRC": str(tmp_path / "none"),
                 "WANDB_API_KEY": ""}.items():
        monkeypatch.setenv(k, v)
    rc, _, err = cli(capsys, "train", f"log.run_dir={tmp_path / 'r'}", "log.wandb=true",
                     code=None)
    assert rc != 0 and "wandb login" in err
    assert not (tmp_path / "r").exists()

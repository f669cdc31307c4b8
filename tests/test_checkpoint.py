"""Checkpoints as data: round trip of the full state, the manifest, fallback past damaged
checkpoints, and files that would run code when unpickled."""

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import branchgrpo
from branchgrpo import checkpoint as ckpt


def _trained():
    """A small model, AdamW after two steps, a stepped LR schedule and an EMA."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    names = [n for n, _ in model.named_parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 3)).square().sum().backward()
        opt.step()
        sched.step()
    ema = {n: p.detach() * 0.5 for n, p in model.named_parameters()}
    return model, names, opt, sched, ema


def _save(run, iteration, model, names, opt, sched, ema, keep_last=10):
    meta = {"iteration": iteration, "elapsed": 1.25, "scheduler": sched.state_dict(),
            "metrics_lines": 3, "config": "train:\n  lr: 0.01\n", "extra": {"e": 0.5},
            "param_names": names}
    return ckpt.save_checkpoint(run, iteration, meta, ckpt.trainable_state(model),
                                ckpt.optimizer_by_name(opt.state_dict(), names), ema, keep_last)


def _draws():
    return torch.rand(4).tolist(), np.random.rand(3).tolist(), [random.random() for _ in "ab"]


def test_round_trip_restores_weights_optimizer_schedule_ema_and_rng(tmp_path):
    model, names, opt, sched, ema = _trained()
    path = _save(tmp_path, 7, model, names, opt, sched, ema)
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors", "manifest.json", "meta.json", "model.safetensors",
        "optimizer.safetensors", "rng.safetensors"]
    expected = _draws()  # the draws that follow the checkpoint
    torch.manual_seed(123), np.random.seed(123), random.seed(123)

    st = ckpt.load_checkpoint(path)
    ckpt.set_rng_state(st["rng"])
    assert _draws() == expected
    assert (st["iteration"], st["elapsed"], st["metrics_lines"], st["extra"]) == (7, 1.25, 3,
                                                                                  {"e": 0.5})
    assert st["threads"] == torch.get_num_threads()
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    shapes = ckpt.shapes(fresh.named_parameters())
    ckpt.check_fits(st["policy"], shapes, "test")
    ckpt.load_trainable_state(fresh, st["policy"])
    for (n, a), b in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(st["ema"][n], ema[n]), n
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1 / (s + 1))
    opt2.load_state_dict(ckpt.optimizer_by_index(st["optimizer"], names, shapes))
    sched2.load_state_dict(st["scheduler"])
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, s in a["state"].items():
        assert all(torch.equal(v, b["state"][i][k]) for k, v in s.items()), i
    assert sched2.state_dict() == sched.state_dict()


def test_damaged_newest_is_skipped_for_the_previous_intact_one(tmp_path):
    model, names, opt, sched, ema = _trained()
    for it in (1, 2, 3):
        _save(tmp_path, it, model, names, opt, sched, None)
    folder = tmp_path / "checkpoints"
    weights = folder / "iter_000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated
    bits = bytearray((folder / "iter_000002" / "optimizer.safetensors").read_bytes())
    bits[-1] ^= 1  # one flipped bit, same size
    (folder / "iter_000002" / "optimizer.safetensors").write_bytes(bytes(bits))
    path, damaged = ckpt.find_checkpoint(tmp_path)
    assert path.name == "iter_000001"
    assert "iter_000003: model.safetensors has" in damaged[0] and "(truncated?)" in damaged[0]
    assert "iter_000002: optimizer.safetensors does not match its sha256" in damaged[1]
    with pytest.raises(ckpt.DamagedCheckpoint, match="truncated"):
        ckpt.load_checkpoint(folder / "iter_000003")


def test_a_write_killed_midway_is_detected_skipped_and_cleaned_up(tmp_path):
    model, names, opt, sched, ema = _trained()
    _save(tmp_path, 1, model, names, opt, sched, ema)
    folder = tmp_path / "checkpoints"
    (folder / "iter_000002.tmp").mkdir()  # killed before the rename
    (folder / "iter_000002.tmp" / "model.safetensors").write_bytes(b"partial")
    (folder / "iter_000003").mkdir()  # a folder without manifest (e.g. a partial copy)
    (folder / "iter_000003" / "meta.json").write_text("{}")
    path, damaged = ckpt.find_checkpoint(tmp_path)
    assert path.name == "iter_000001"
    assert damaged == [f"damaged checkpoint {folder / 'iter_000003'}: no manifest.json (its "
                       "write did not finish)"]
    _save(tmp_path, 4, model, names, opt, sched, ema, keep_last=2)
    assert sorted(p.name for p in folder.iterdir()) == ["iter_000001", "iter_000004"]


def test_pruning_keeps_the_last_intact_checkpoints_only(tmp_path):
    model, names, opt, sched, ema = _trained()
    for it in (1, 2, 3):
        _save(tmp_path, it, model, names, opt, sched, None, keep_last=1)
    assert [p.name for p in ckpt.checkpoints(tmp_path / "checkpoints")] == ["iter_000003"]


def test_no_checkpoint_and_no_intact_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(ckpt.NoCheckpoint, match="yet: the run stopped before its first"):
        ckpt.find_checkpoint(tmp_path, hint="!")
    (tmp_path / "checkpoints" / "iter_000001").mkdir(parents=True)
    with pytest.raises(ckpt.NoCheckpoint, match="no intact checkpoint in .*no manifest.json"):
        ckpt.find_checkpoint(tmp_path)


def test_a_checkpoint_that_does_not_fit_the_model_is_an_error():
    shapes = {"w": torch.Size([2, 3])}
    with pytest.raises(ckpt.CheckpointError, match="holds no trained weights"):
        ckpt.check_fits({}, shapes, "ckpt")
    with pytest.raises(ckpt.CheckpointError, match="1 trainable parameters missing"):
        ckpt.check_fits({"v": torch.zeros(2, 3)}, shapes, "ckpt")
    with pytest.raises(ckpt.CheckpointError, match=r"w \(3, 2\) vs \(2, 3\)"):
        ckpt.check_fits({"w": torch.zeros(3, 2)}, shapes, "ckpt")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "iter_000001.pt"
    torch.save({"policy": {}, "payload": _Evil(marker)}, evil)
    (tmp_path / "checkpoints").mkdir()
    evil.rename(tmp_path / "checkpoints" / evil.name)
    with pytest.raises(ckpt.DamagedCheckpoint, match="cannot be read as data"):
        ckpt.load_checkpoint(tmp_path / "checkpoints" / evil.name)
    with pytest.raises(ckpt.NoCheckpoint, match="no intact checkpoint"):
        ckpt.find_checkpoint(tmp_path)
    assert not marker.exists()


def test_a_crafted_dcp_metadata_runs_no_code(tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    from branchgrpo.checkpoint_dcp import load_dcp_full

    folder = tmp_path / "iter_000001"
    dcp.save({"model": {"w": torch.ones(2)}}, checkpoint_id=str(folder), no_dist=True)
    assert load_dcp_full(folder)["model"]["w"].tolist() == [1.0, 1.0]
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(ckpt.DamagedCheckpoint, match="posix.system is not DCP metadata"):
        load_dcp_full(folder)
    assert not marker.exists()


def test_an_old_pt_checkpoint_is_converted_without_running_code(tmp_path):
    model, names, opt, sched, ema = _trained()
    rng = ckpt.rng_state()
    old = {"iteration": 2, "elapsed": 3.0, "policy": ckpt.trainable_state(model),
           "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng,
           "ema": list(ema.values()), "metrics_lines": 2, "config": "a: 1\n", "extra": {}}
    torch.save(old, tmp_path / "iter_000002.pt")
    st = ckpt.load_checkpoint(tmp_path / "iter_000002.pt")
    assert st["iteration"] == 2 and st["threads"] is None and set(st["ema"]) == set(names)
    assert np.array_equal(st["rng"]["numpy"][1], rng["numpy"][1])
    assert list(st["optimizer"]["state"]) == names


def test_no_weights_only_false_in_the_package():
    hits = [str(p) for p in Path(branchgrpo.__file__).parent.rglob("*.py")
            if "weights_only=False" in p.read_text()]
    assert hits == []


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    import hashlib

    model, names, opt, sched, ema = _trained()
    path = _save(tmp_path, 1, model, names, opt, sched, ema)
    man = json.loads((path / "manifest.json").read_text())
    assert (man["format"], man["version"]) == ("branchgrpo-checkpoint", 1)
    assert set(man["files"]) == {p.name for p in path.iterdir()} - {"manifest.json"}
    for name, rec in man["files"].items():
        data = (path / name).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "manifest.json").write_text("{not json"),
     "manifest.json is not a valid branchgrpo-checkpoint manifest"),
    (lambda f: (f / "manifest.json").write_text(json.dumps(
        {**json.loads((f / "manifest.json").read_text()), "format": "other"})),
     "manifest.json is not a valid branchgrpo-checkpoint manifest"),
    (lambda f: (f / "manifest.json").write_text(json.dumps(
        {**json.loads((f / "manifest.json").read_text()), "version": 2})),
     "has format version 2; this branchgrpo reads version 1"),
    (lambda f: (f / "ema.safetensors").unlink(), "ema.safetensors is missing"),
    (lambda f: (f / "meta.json").write_text((f / "meta.json").read_text().replace(
        '"iteration": 2', '"iteration": 9')), "meta.json does not match its sha256"),
])
def test_a_manifest_mismatch_skips_the_checkpoint_with_one_line(tmp_path, damage, message):
    model, names, opt, sched, ema = _trained()
    for it in (1, 2):
        _save(tmp_path, it, model, names, opt, sched, ema)
    newest = tmp_path / "checkpoints" / "iter_000002"
    damage(newest)
    path, damaged = ckpt.find_checkpoint(tmp_path)
    assert path.name == "iter_000001" and len(damaged) == 1
    assert str(newest) in damaged[0] and message in damaged[0], damaged
    assert ckpt.latest_checkpoint(tmp_path) == path
    with pytest.raises(ckpt.DamagedCheckpoint, match=re.escape(message)):
        ckpt.load_checkpoint(newest)


def test_saving_and_loading_a_folder_never_pickles(tmp_path, monkeypatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("pickle used")

    for mod, name in [(pickle, "dump"), (pickle, "dumps"), (pickle, "load"), (pickle, "loads"),
                      (torch, "save"), (torch, "load")]:
        monkeypatch.setattr(mod, name, refuse)
    model, names, opt, sched, ema = _trained()
    path = _save(tmp_path, 3, model, names, opt, sched, ema)
    st = ckpt.load_checkpoint(path)
    assert st["iteration"] == 3 and set(st["policy"]) == set(names)
    from safetensors.torch import load_file

    for f in path.iterdir():  # every file is safetensors or JSON
        if f.suffix == ".safetensors":
            load_file(str(f))
        else:
            assert f.suffix == ".json" and isinstance(json.loads(f.read_text()), dict), f


def test_round_trip_is_bit_exact_for_every_dtype(tmp_path):
    torch.manual_seed(1)
    model = {"a": torch.randn(3, 2), "b": torch.randn(4).to(torch.bfloat16),
             "c": torch.randn(2, 2).to(torch.float16), "d": torch.randn(5).double()}
    opt = {"state": {n: {"step": torch.tensor(3.0), "exp_avg": v * 2} for n, v in model.items()},
           "param_groups": [{"lr": 0.5, "betas": (0.9, 0.99), "params": list(model)}]}
    meta = {"iteration": 1, "elapsed": 0.0, "scheduler": {}, "metrics_lines": 0, "config": "",
            "extra": {}, "param_names": list(model)}
    path = ckpt.save_checkpoint(tmp_path, 1, meta, model, opt, None, 1)
    st = ckpt.load_checkpoint(path)
    assert st["ema"] is None and st["optimizer"]["param_groups"] == opt["param_groups"]
    for n, v in model.items():
        got = st["policy"][n]
        assert got.dtype == v.dtype and torch.equal(got.view(torch.uint8), v.view(torch.uint8))
        for k, x in opt["state"][n].items():
            assert torch.equal(st["optimizer"]["state"][n][k], x), (n, k)

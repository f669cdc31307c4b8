"""torchrun --nproc_per_node 2 on CPU (gloo): DDP and FSDP2 runs, 2 ranks x 1 prompt equal to
1 rank x 2 prompts, kill and resume on 2 and on 1 rank, refused geometry."""

import json
import shutil

import pytest
import torch

from branchgrpo import checkpoint as ckpt
from branchgrpo.config import ConfigError, load_config
from branchgrpo.preflight import check_geometry, check_run

from .conftest import run, run_until, small_args


def _iters(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["iteration"] for r in rows if "eval/tag" not in r]


def _weights(run_dir, iteration=3):
    path = ckpt.latest_checkpoint(run_dir)
    st = ckpt.load_checkpoint(path)
    assert st["iteration"] == iteration, path
    return st["policy"]


def _max_diff(a, b):
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, cache_dir):
    d = tmp_path_factory.mktemp("ddp") / "run"
    out = run(2, "train", *small_args(cache_dir, d, "dist.strategy=ddp", "dist.verify_sync=1"))
    assert "2 ranks, ddp, 1 prompts per rank" in out.stdout
    return d


def test_ddp_run_writes_one_run_directory_from_rank_0(ddp_run):
    assert _iters(ddp_run) == [1, 2, 3]
    folder = ckpt.latest_checkpoint(ddp_run)
    assert folder.is_dir() and folder.name == "iter_000003"
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert {".metadata", "meta.json", "rng.safetensors", "manifest.json"} <= {
        p.name for p in folder.iterdir()} and not (folder / "meta.pt").exists()
    assert [p.name for p in ckpt.checkpoints(ddp_run / "checkpoints")] == [
        "iter_000001", "iter_000002", "iter_000003"]
    assert not list((ddp_run / "checkpoints").glob("*.tmp"))
    for f in ("config.yaml", "report.md", "samples/after.png"):
        assert (ddp_run / f).exists(), f


def test_two_ranks_one_prompt_equal_one_rank_two_prompts(ddp_run, tmp_path, cache_dir):
    single = tmp_path / "single"
    run(1, "train", *small_args(cache_dir, single))
    a, b = _weights(ddp_run), _weights(single)
    assert _max_diff(a, b) < 1e-5
    base = ckpt.load_checkpoint(ckpt.checkpoints(single / "checkpoints")[0])["policy"]
    assert _max_diff(a, base) > 1e-5  # the runs did train
    ra = [json.loads(x) for x in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(ra, rb, strict=True):  # rank 0 logs the mean over ranks
        if "reward/total" in x:
            assert x["reward/total"] == pytest.approx(y["reward/total"], abs=1e-5)


def test_fsdp2_run_matches_ddp(ddp_run, tmp_path, cache_dir):
    d = tmp_path / "fsdp"
    out = run(2, "train", *small_args(cache_dir, d, "dist.strategy=fsdp",
                                      "train.iterations=2"))
    assert "2 ranks, fsdp" in out.stdout
    ref = ckpt.load_checkpoint(ddp_run / "checkpoints" / "iter_000002")["policy"]
    assert _max_diff(_weights(d, 2), ref) < 1e-5


def test_kill_and_resume_on_two_and_on_one_rank(ddp_run, tmp_path, cache_dir):
    killed = tmp_path / "killed"
    args = small_args(cache_dir, killed, "dist.strategy=ddp")
    run_until(2, killed / "checkpoints" / "iter_000002" / "manifest.json", "train", *args)
    assert ckpt.iteration_of(ckpt.latest_checkpoint(killed)) in (2, 3)
    shutil.rmtree(killed / "checkpoints" / "iter_000003", ignore_errors=True)
    on_one = tmp_path / "on_one"
    shutil.copytree(killed, on_one)
    out = run(2, "train", "--resume", str(killed))
    assert "resumed from" in out.stdout and "at iteration 2" in out.stdout
    a, b = _weights(ddp_run), _weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _iters(killed) == [1, 2, 3]
    out = run(1, "train", "--resume", str(on_one))  # the 2-rank checkpoint on one process
    assert "at iteration 2" in out.stdout
    assert _iters(on_one) == [1, 2, 3]
    assert ckpt.latest_checkpoint(on_one).name == "iter_000003"
    assert _max_diff(_weights(on_one), a) < 1e-5


def test_impossible_geometry_is_refused_at_start(tmp_path, cache_dir):
    prompts = tmp_path / "one.txt"
    prompts.write_text("one red circle on the left\n")
    out = run(2, "train", *small_args(cache_dir, tmp_path / "r", f"data.prompts={prompts}"),
              check=False)
    assert out.returncode != 0
    assert "2 ranks > 1 training prompts" in out.stderr
    assert "use at most 1 ranks or give more prompts in data.prompts" in out.stderr


@pytest.mark.parametrize("over,world,prompts,message", [
    (["dist.global_prompts=0", "train.prompts_per_iteration=4"], 8, 16,
     "8 ranks x 4 prompts = 32 > 16 training prompts: lower train.prompts_per_iteration to 2"),
    (["dist.global_prompts=32"], 8, 16,
     "8 ranks x 4 prompts = 32 > 16 training prompts: lower dist.global_prompts to 16"),
    (["dist.global_prompts=6"], 4, 16,
     "dist.global_prompts=6 does not divide over 4 ranks: set it to a multiple of 4 "
     r"\(e.g. 8 or 4\) or run on 1, 2, 3, 6 ranks"),
    ([], 20, 16, "20 ranks > 16 training prompts"),
])
def test_geometry_messages_say_what_to_change(monkeypatch, over, world, prompts, message):
    cfg = load_config(None, ["model.pretrain_steps=1", *over])
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError, match=message):
        if over and over[0].startswith("dist.global_prompts=6"):
            check_run(cfg)  # the pre-flight check knows the world from WORLD_SIZE
        else:
            check_geometry(cfg, world, prompts)


def test_updates_that_the_per_rank_edges_cannot_feed_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="on each of 2 ranks.*cannot feed train.updates_per"):
        check_run(load_config(None, ["rollout.num_steps=4", "rollout.split_steps=[0,1]",
                                     "dist.global_prompts=2", "train.updates_per_rollout=100"]))

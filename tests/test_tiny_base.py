"""The embedded default's shipped base model and judge: the default config loads them (no
pretraining), and `branchgrpo build-base` rebuilds them reproducibly."""

from dataclasses import replace

import torch

from branchgrpo.config import load_config
from branchgrpo.models import tiny
from branchgrpo.models.tiny import TinySpec, build_files, differing, shipped_spec
from branchgrpo.tasks import shapes_reward


def test_the_default_config_is_the_shipped_base():
    m = load_config().model
    assert tiny.SHIPPED.exists() and shapes_reward.SHIPPED_JUDGE.exists()
    assert shipped_spec() == TinySpec(pretrain_steps=m.pretrain_steps, clutter=m.clutter)
    assert shipped_spec() == TinySpec()  # what build-base builds


def test_a_spec_other_than_the_shipped_one_pretrains_into_the_cache(tmp_path, monkeypatch):
    calls = []
    real = tiny.pretrain

    def spy(spec, prompts, progress=True):
        calls.append(spec)
        return real(spec, prompts, progress)

    monkeypatch.setattr(tiny, "pretrain", spy)
    tiny.load_or_pretrain(TinySpec(), tmp_path, [], progress=False)
    assert calls == [] and not list(tmp_path.iterdir())  # the shipped file, no pretraining
    small = TinySpec(pretrain_steps=2)
    tiny.load_or_pretrain(small, tmp_path, ["one red circle on the left"], progress=False)
    assert calls == [small]
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny_flux_{small.key()}.safetensors"]
    assert shipped_spec(tmp_path / f"tiny_flux_{small.key()}.safetensors") == small


def test_build_files_are_reproducible_and_differences_are_named(tmp_path):
    spec = replace(TinySpec(), pretrain_steps=3, pretrain_batch=4)
    a, b = (build_files(tmp_path / d / "base.safetensors", tmp_path / d / "judge.safetensors",
                        spec, 2, False) for d in ("a", "b"))
    assert differing(a, b) == []
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(b[1]))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-6
    save_file(tensors, str(b[1]))
    assert differing(a, b) == [f"{b[1].name}:{name}"]


def test_build_shipped_check_without_shipped_files_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(tiny, "SHIPPED", tmp_path / "none.safetensors")
    assert tiny.build_shipped(check=True) == 2
    assert "no shipped files" in capsys.readouterr().out


def test_build_files_runs_on_one_thread_and_restores_the_count(tmp_path, monkeypatch):
    seen = []
    real = tiny.pretrain
    monkeypatch.setattr(tiny, "pretrain", lambda *a, **k: seen.append(
        torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    build_files(tmp_path / "b.safetensors", tmp_path / "j.safetensors",
                replace(TinySpec(), pretrain_steps=1, pretrain_batch=2), 1, False)
    assert seen == [1] and torch.get_num_threads() == before

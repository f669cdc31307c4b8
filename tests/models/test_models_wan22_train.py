"""One BranchGRPO iteration of Wan2.2 through ``branchgrpo train`` on the replicas (TI2V-5B;
T2V-A14B with its two experts), LoRA and full fine-tuning: exit 0, a finite loss, the trained
weights changed and only those of the experts ``model.experts`` names; the LoRA run's
``RUN/lora/`` (and ``RUN/lora/transformer_2/`` for the low-noise expert) loads into
WanPipeline with ``load_lora_weights`` (``load_into_transformer_2=True``) and makes its
guided outputs at every step what our trained policy computes; a resumed run restores both
experts; offline, the real Hub ids fail fast and ``branchgrpo plan`` prints their grid."""

from __future__ import annotations

import json
import time

import pytest
import torch
from models_testlib import PROMPTS, RECIPES, REPLICA_SIZE, SMALL_RUN
from safetensors.torch import load_file
from test_models_replica_train import train_cli
from test_models_wan22 import check_steps, run_pipeline

from branchgrpo.cli import main
from branchgrpo.inference import load_trained
from branchgrpo.models.hub import ModelNotAvailableError
from branchgrpo.spec import resolve

A14B = ("model.height=32", "model.width=32")
"""The A14B replica's size (Wan2.1 VAE, factor 8); at 2 steps (timesteps 999, 750) each
expert runs one step."""


@pytest.fixture
def prompts(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    return f


def _checkpoint(run) -> dict[str, torch.Tensor]:
    *_, last = sorted((run / "checkpoints").iterdir())
    return load_file(last / "model.safetensors")


def _base(path) -> dict[str, torch.Tensor]:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(path)
    out = {f"transformer.{k}": p.detach() for k, p in pipe.transformer.named_parameters()}
    if pipe.transformer_2 is not None:
        out |= {f"transformer_2.{k}": p.detach()
                for k, p in pipe.transformer_2.named_parameters()}
    return out


def _lora_matches_policy(run, path) -> None:
    """Load RUN/lora into WanPipeline as diffusers documents it; its guided outputs at every
    step equal our trained policy's velocities there."""
    from diffusers import WanPipeline

    policy, cfg, _, _ = load_trained(run)
    spec = resolve(cfg)
    x_T = torch.randn(len(PROMPTS), *policy.latent_shape,
                      generator=torch.Generator().manual_seed(1))
    steps = len(spec.sigmas) - 1
    pipe = WanPipeline.from_pretrained(path)
    _, base = run_pipeline(pipe, cfg, x_T, steps)
    pipe = WanPipeline.from_pretrained(path)
    pipe.load_lora_weights(run / "lora")
    if (run / "lora" / "transformer_2").is_dir():
        pipe.load_lora_weights(run / "lora" / "transformer_2", load_into_transformer_2=True)
    before, tuned = run_pipeline(pipe, cfg, x_T, steps)
    for (_, _, b), (_, _, t) in zip(base, tuned, strict=True):
        assert (t - b).abs().max() > 1e-4  # every step's expert was tuned
    check_steps(policy, spec, before, tuned)


def test_ti2v_5b_full_and_lora(replica, prompts, tmp_path):
    path = replica("wan22")
    train_cli("wan22", path, tmp_path / "full", prompts, "model.finetune=full", "train.lr=1e-3")
    state, base = _checkpoint(tmp_path / "full"), _base(path)
    assert {f"transformer.{k}" for k in state} == set(base)
    assert sum(not torch.equal(v, base[f"transformer.{k}"]) for k, v in state.items()) > \
        len(state) // 2
    run = tmp_path / "lora"
    train_cli("wan22", path, run, prompts, "model.finetune=lora", "model.lora_rank=4",
              "model.lora_alpha=8", "train.lr=1e-2")
    assert all("lora_" in k for k in _checkpoint(run))
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not (run / "lora" / "transformer_2").exists()
    _lora_matches_policy(run, path)


def test_a14b_lora_on_both_experts_loads_into_pipeline(replica, prompts, tmp_path):
    path, run = replica("wan22_a14b"), tmp_path / "run"
    train_cli("wan22", path, run, prompts, *A14B, "model.finetune=lora", "model.lora_rank=4",
              "model.lora_alpha=8", "train.lr=1e-2")
    state = _checkpoint(run)
    assert {k.split(".")[0] for k in state} == {"transformer", "transformer_2"}
    assert (run / "lora" / "transformer_2" / "pytorch_lora_weights.safetensors").is_file()
    _lora_matches_policy(run, path)


@pytest.mark.parametrize("experts", ["low", "high"])
def test_a14b_one_expert_trains_the_other_stays_frozen(experts, replica, prompts, tmp_path):
    path, run = replica("wan22_a14b"), tmp_path / "run"
    train_cli("wan22", path, run, prompts, *A14B, "model.finetune=full", "train.lr=1e-3",
              f"model.experts={experts}")
    state, base = _checkpoint(run), _base(path)
    name = "transformer_2" if experts == "low" else "transformer"
    assert {k for k in base if k.split(".")[0] == name} == set(state)
    assert sum(not torch.equal(v, base[k]) for k, v in state.items()) > len(state) // 2


def test_a14b_resume_restores_both_experts(replica, prompts, tmp_path):
    """2 iterations straight == the same run resumed from its first checkpoint for the
    second: both experts' weights (and so the optimizer states behind them) come back."""
    import shutil

    path = replica("wan22_a14b")
    args = (*A14B, "model.finetune=lora", "model.lora_rank=4", "model.lora_alpha=8",
            "train.lr=1e-2", "log.checkpoint_every=1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _cli("train", *_cli_args(path, straight, prompts), *args, "train.iterations=2")
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "iter_000002")  # back to the end of iteration 1
    _cli("train", "--resume", str(resumed), "train.iterations=2")
    a, b = _checkpoint(straight), _checkpoint(resumed)
    assert {k.split(".")[0] for k in a} == {"transformer", "transformer_2"}
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def _cli(*args: str) -> None:
    """``branchgrpo ARGS`` (`branchgrpo.cli.main`, in this process: offline, one thread);
    asserts exit 0."""
    assert main(list(args)) == 0


def _cli_args(path, run, prompts) -> list[str]:
    """`train_cli`'s arguments for the wan22 replica at ``path`` (`SMALL_RUN`'s one iteration
    unless the caller sets ``train.iterations``)."""
    from test_models_replica_train import SMALL

    return [*SMALL_RUN, f"data.prompts={prompts}", f"data.eval_prompts={prompts}",
            f"log.run_dir={run}", "model.kind=wan22", f"model.path={path}", "model.guidance=5.0",
            *(f"{k}={v}" for k, v in REPLICA_SIZE["wan22"].items()), *RECIPES["wan22"],
            *SMALL["wan22"]]


@pytest.mark.parametrize("repo", ["Wan-AI/Wan2.2-TI2V-5B-Diffusers",
                                  "Wan-AI/Wan2.2-T2V-A14B-Diffusers"])
def test_offline_hub_id_fails_fast_and_plans(repo, tmp_path, monkeypatch, capsys):
    from branchgrpo.models.factory import ModelOptions, build_policy

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    start = time.monotonic()
    with pytest.raises(ModelNotAvailableError) as err:
        build_policy(ModelOptions(kind="wan22", path=repo), torch.device("cpu"))
    assert time.monotonic() - start < 10
    assert repo in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    assert main(["plan", "configs/wan22_branchgrpo.yaml", f"model.path={repo}", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    shift = 5.0 if "TI2V" in repo else 3.0
    from branchgrpo.engine.schedule import flow_sigmas

    assert r["shift"] == shift and "defaults" in r["model_config"]
    torch.testing.assert_close(torch.tensor(r["sigmas"][1:]),
                               flow_sigmas(r["num_steps"], shift)[1:].float(), atol=1e-6,
                               rtol=0)

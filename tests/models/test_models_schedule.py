"""The resolved schedule (`branchgrpo.spec`) against each diffusers pipeline's own scheduler,
on replica checkpoints (config files only), through ``branchgrpo plan --json``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from branchgrpo.cli import main
from branchgrpo.config import load_config
from branchgrpo.engine.schedule import diffusers_static, transformer_timesteps
from branchgrpo.models.testing import write_replica
from branchgrpo.spec import resolve, schedule_rule


def plan_json(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def close(ours, theirs, atol: float = 1e-6) -> None:
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64),
                               torch.as_tensor(theirs).double().cpu(), atol=atol, rtol=0)


def test_flux_dynamic_matches_flux_pipeline(tmp_path, capsys):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    path = write_replica("flux", tmp_path / "flux")
    r = plan_json(capsys, "configs/flux_branchgrpo.yaml", f"model.path={path}",
                  "rollout.schedule=flux_dynamic", "rollout.shift=null",
                  "rollout.quantize_timestep=false")
    t = r["num_steps"]
    sch = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    c = sch.config
    mu = calculate_shift(2025, c.base_image_seq_len, c.max_image_seq_len, c.base_shift,
                         c.max_shift)
    sch.set_timesteps(t, sigmas=np.linspace(1.0, 1 / t, t), mu=mu)
    assert r["image_seq_len"] == 2025 and r["mu"] == pytest.approx(mu)
    close(r["sigmas"], sch.sigmas)
    close(r["timesteps"], sch.timesteps / 1000)  # FluxPipeline passes timestep / 1000
    assert r["level"] == 0.3 and r["kernel"] == "dance"


def test_flux_branchgrpo_recipe_is_fastvideo(tmp_path, capsys):
    path = write_replica("flux", tmp_path / "flux")
    r = plan_json(capsys, "configs/flux_branchgrpo.yaml", f"model.path={path}")
    assert r["schedule"] == "shifted" and r["shift"] == 3.0 and r["quantize_timestep"]
    close(r["timesteps"], np.floor(np.float32(r["sigmas"][:-1]) * np.float32(1000)) / 1000)
    assert (r["forwards"], r["edges"], r["trained_edges"], r["leaves"]) == (203, 218, 218, 16)


@pytest.mark.parametrize("replica", ["sd3", "sd3_large"])
def test_sd35_flow_grpo_matches_sd3_pipeline(tmp_path, capsys, replica):
    from diffusers import FlowMatchEulerDiscreteScheduler

    path = write_replica(replica, tmp_path / replica)
    r = plan_json(capsys, "configs/sd35_flow_grpo.yaml", f"model.path={path}")
    sch = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    sch.set_timesteps(r["num_steps"])  # what StableDiffusion3Pipeline calls
    close(r["sigmas"], sch.sigmas)
    close(r["timesteps"], sch.timesteps, atol=1e-3)
    assert r["level"] == 0.7 and r["kernel"] == "flow" and not r["quantize_timestep"]
    plain = plan_json(capsys, f"model.path={path}", "model.kind=sd3", "rollout.method=flow_grpo",
                      "rollout.level=0.5")
    assert plain["level"] == 0.5


def test_sd3_grid_at_six_steps():
    close(diffusers_static(6, 3.0).tolist(), [1, .92, .82, .67, .43, .009, 0], atol=5e-3)


@pytest.mark.parametrize("replica,shift", [("wan", 5.0), ("wan", 3.0), ("wan_14b", 3.0)])
def test_wan_matches_unipc_flow_sigmas(tmp_path, capsys, replica, shift):
    from diffusers import UniPCMultistepScheduler

    path = write_replica(replica, tmp_path / replica, scheduler={"flow_shift": shift})
    r = plan_json(capsys, "configs/wan_branchgrpo.yaml", f"model.path={path}")
    sch = UniPCMultistepScheduler.from_pretrained(path, subfolder="scheduler")
    sch.set_timesteps(r["num_steps"])  # what WanPipeline calls
    assert r["shift"] == shift
    close(r["sigmas"][1:], sch.sigmas[1:])
    # UniPC lowers sigma_0 = 1 by 1e-6 for its solver; the SDE steps need 1 exactly
    assert r["sigmas"][0] == 1.0 and abs(float(sch.sigmas[0]) - 1.0) < 2e-6
    assert r["level"] == 0.3


def test_rule_table():
    for plan in ("dance", "branch", "branch_mix", "mix", "mix_flash", "g2rpo"):
        assert schedule_rule(plan, "flux") == ("shifted", True)
    assert schedule_rule("flow_grpo", "flux") == ("diffusers", False)
    for fam, integer_timesteps in (("sd3", False), ("wan", True)):
        assert schedule_rule("flow_grpo", fam) == schedule_rule("branch", fam) == (
            "diffusers", integer_timesteps)
    assert schedule_rule("branch", "tiny") == ("shifted", False)


def test_hub_id_without_files_uses_documented_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    cfg = load_config(None, ["model.kind=flux", "model.path=nobody/not-a-model",
                             "rollout.method=flow_grpo", "model.height=720", "model.width=720"])
    spec = resolve(cfg)
    assert "defaults" in spec.model_source and spec.image_seq_len == 2025
    assert spec.level == 0.7 and spec.kernel == "flow"


def test_tiny_default_keeps_level_one_and_quantize_is_explicit():
    spec = resolve(load_config(None, []))
    assert spec.level == 1.0 and spec.schedule == "shifted" and not spec.quantize_timestep
    q = transformer_timesteps(torch.tensor([0.9876]), 1000.0, quantize=True)
    assert q.item() == 987.0


@pytest.mark.parametrize("args,msg", [
    (["rollout.quantize_timestep=true"], "needs a diffusers model"),
    (["rollout.schedule=diffusers"], "needs a diffusers checkpoint"),
    (["rollout.schedule=bogus"], "is not one of"),
])
def test_plan_bad_input_exit_2(capsys, args, msg):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


def test_wrong_family_for_folder(tmp_path, capsys):
    path = write_replica("wan", tmp_path / "wan")
    assert main(["plan", "model.kind=sd3", f"model.path={path}"]) == 2
    assert "set model.kind=wan" in capsys.readouterr().err

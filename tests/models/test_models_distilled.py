"""Distilled few-step checkpoints (FLUX.1-schnell, Z-Image-Turbo), recognised from their config
files alone (replicas without weights): the schedule keeps their own sampler (its step count,
its pipeline's grid), and `branchgrpo.preflight` refuses, before any model loads, what they
cannot do: CFG on a guidance-free model, more steps than the distilled schedule has, another
grid. Non-distilled checkpoints of the same families (FLUX.1-dev, the base Z-Image) are not
touched (docs/algorithms.md §1.10)."""

from __future__ import annotations

import pytest
import torch

from branchgrpo.config import ConfigError, load_config
from branchgrpo.engine.schedule import flux_pipeline
from branchgrpo.models.testing import write_replica
from branchgrpo.preflight import check_plan
from branchgrpo.spec import distilled
from testlib import cli


def _cfg(replica: str, path, *extra: str):
    kind = {"flux_schnell": "flux", "flux": "flux"}.get(replica, "zimage")
    return load_config(None, [f"model.kind={kind}", f"model.path={path}", "model.height=512",
                              "model.width=512", "rollout.method=dance", *extra])


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("distilled")
    return {k: write_replica(k, root / k) for k in ("flux_schnell", "flux", "zimage_turbo",
                                                    "zimage")}


def test_detection_from_config_files(replicas):
    got = {k: distilled(_cfg(k, p)) for k, p in replicas.items()}
    assert got["flux"] is None and got["zimage"] is None
    assert (got["flux_schnell"].name, got["flux_schnell"].steps) == ("FLUX.1-schnell", 4)
    assert (got["zimage_turbo"].name, got["zimage_turbo"].steps) == ("Z-Image-Turbo", 8)
    assert got["zimage_turbo"].guidance_free and got["flux_schnell"].guidance_free


@pytest.mark.parametrize("replica,steps,shift", [("flux_schnell", 4, 1.0),
                                                 ("zimage_turbo", 8, 3.0)])
def test_default_plan_is_the_distilled_sampler(replica, steps, shift, replicas):
    """rollout.num_steps null: the distilled step count on the pipeline's own grid (schnell:
    FluxPipeline's linspace at its static shift 1, not the FastVideo shift-3 rule of FLUX.1)."""
    spec = check_plan(_cfg(replica, replicas[replica], "model.guidance=0"))
    assert spec.schedule == "diffusers" and "distilled" in spec.rule
    assert not spec.quantize_timestep and len(spec.sigmas) == steps + 1
    torch.testing.assert_close(torch.tensor(spec.sigmas), flux_pipeline(steps, shift=shift))


@pytest.mark.parametrize("replica,extra,match", [
    ("zimage_turbo", ["model.guidance=3.5"], "model.guidance=0"),
    ("zimage_turbo", ["model.guidance=0", "rollout.num_steps=20"], "num_steps<=8"),
    ("flux_schnell", ["rollout.num_steps=16"], "num_steps<=4"),
    ("flux_schnell", ["rollout.schedule=shifted"], "rollout.schedule"),
    ("zimage_turbo", ["model.guidance=0", "rollout.shift=6.0"], "rollout.shift"),
])
def test_refusals_name_the_key_and_the_fix(replica, extra, match, replicas):
    with pytest.raises(ConfigError, match=match) as err:
        check_plan(_cfg(replica, replicas[replica], *extra))
    assert "distilled" in str(err.value)


def test_non_distilled_checkpoints_are_not_refused(replicas):
    for replica, extra in (("zimage", ["model.guidance=5.0", "rollout.num_steps=20"]),
                           ("flux", ["rollout.num_steps=16", "rollout.schedule=shifted"])):
        assert len(check_plan(_cfg(replica, replicas[replica], *extra)).sigmas) > 9


def test_train_refuses_before_any_model_loads(replicas, capsys):
    """The Turbo replica has config files only: a model load would fail differently."""
    code, _, err = cli(capsys, "train", "model.kind=zimage",
                       f"model.path={replicas['zimage_turbo']}", "model.guidance=5.0",
                       "train.device=cpu", code=None)
    assert code != 0
    assert "Z-Image-Turbo" in err and "set model.guidance=0" in err


def test_plan_reports_the_guidance_the_run_gets(replicas, capsys):
    """``branchgrpo plan``: schnell's guidance value is unused (no embedding); Z-Image's CFG is
    on for any scale above 0, so 0.5 is CFG there (not SD3's 'off below 1')."""
    import json

    from branchgrpo.cli import main

    def guidance(*args: str) -> str:
        assert main(["plan", *args, "rollout.method=dance", "--json"]) == 0
        return json.loads(capsys.readouterr().out)["guidance"]

    assert guidance("model.kind=flux", f"model.path={replicas['flux_schnell']}").startswith(
        "none (FLUX.1-schnell")
    assert guidance("model.kind=flux", f"model.path={replicas['flux']}") == (
        "guidance embedding 3.5")
    assert guidance("model.kind=zimage", f"model.path={replicas['zimage']}",
                    "model.guidance=0.5").startswith("classifier-free, scale 0.5")

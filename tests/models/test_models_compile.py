"""``model.compile=true`` (regional compilation of the transformer's repeated blocks) is exact
up to float rounding: the compiled tiny policy's velocities, in the rollout's no-grad mode and
in the update's grad mode, agree with eager ones and with each other, so the importance ratio
before the first update stays 1 (its log-prob gap is that rounding over the step's std); its
gradients agree too. Lossy attention kernels are refused before any model loads, CUDA-only
ones on the CPU; ``bench iteration --compile`` reports eager / compiled per method."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from branchgrpo.config import ConfigError, load_config
from branchgrpo.engine.sde import dance_sde, log_prob
from branchgrpo.models.factory import ModelOptions, speed_up
from branchgrpo.models.tiny import TinyFluxPolicy, TinySpec
from branchgrpo.preflight import check_run
from branchgrpo.tasks.shapes import split_prompts

ATOL = 1e-5
"""Compiled vs eager velocity (fp32, |v| up to 2): inductor fuses and reorders the blocks'
reductions; measured 3.6e-7 in both grad modes on this policy (gradients: 1.5e-8). A wrong
kernel (a dropped block, a wrong scale) moves v by ~1."""
RATIO_TOL = 1e-4
"""|ratio - 1| of a compiled rollout's edge scored by the compiled update forward: measured 0
(the two grad modes' forward kernels give the same bits here)."""


def test_compiled_tiny_policy_matches_eager_in_both_grad_modes():
    torch.manual_seed(0)
    eager = TinyFluxPolicy(TinySpec(layers=1, single_layers=1)).eval()
    comp = speed_up(copy.deepcopy(eager), ModelOptions(compile=True))
    cond = eager.encode(split_prompts()[0][:4])
    x, sigma = torch.randn(4, *eager.latent_shape), torch.rand(4)
    with torch.no_grad():
        v_roll, v_ref = comp.velocity(x, sigma, cond), eager.velocity(x, sigma, cond)
    v_upd = comp.velocity(x, sigma, cond)
    torch.testing.assert_close(v_roll, v_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(v_upd.detach(), v_ref, atol=ATOL, rtol=0)
    # the ratio before the first update: the rollout's stored log-prob of a step against the
    # update forward's, both compiled (Dance-SDE step at sigma 0.9 -> 0.8, eta 0.3)
    s, s_next = torch.full((4,), 0.9), torch.full((4,), 0.8)
    with torch.no_grad():
        mean, std = dance_sde(comp.velocity(x, s, cond), x, s, s_next)
    x_next = mean + std.view(-1, 1, 1) * torch.randn_like(x)
    lp_old = log_prob(x_next, mean, std)
    lp_new = log_prob(x_next, dance_sde(comp.velocity(x, s, cond), x, s, s_next)[0], std)
    assert (lp_new - lp_old).exp().sub(1).abs().max() < RATIO_TOL
    # gradients through the compiled blocks
    v_upd.square().mean().backward()
    eager.velocity(x, sigma, cond).square().mean().backward()
    for (name, a), b in zip(comp.transformer.named_parameters(), eager.transformer.parameters(),
                            strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert [n for n, _ in comp.transformer.named_parameters()] == [
        n for n, _ in eager.transformer.named_parameters()]  # checkpoints keep their names


def test_lossy_and_cuda_only_attention_refused_before_models_load():
    with pytest.raises(ConfigError, match="sage.*quantises Q, K.*log-probs"):
        load_config(None, ["model.attention_backend=sage"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config(None, ["model.attention_backend=teacache"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA kernel.*attention_backend=native"):
            check_run(load_config(None, ["model.attention_backend=flash",
                                         "train.device=cpu"]))


def test_bench_iteration_compile_reports_eager_over_compiled(monkeypatch, capsys):
    import branchgrpo.bench.iteration as bench_iteration
    import branchgrpo.models.factory as factory
    from branchgrpo.cli import main

    compiled = []
    monkeypatch.setattr(factory, "speed_up", lambda p, o: compiled.append(o.compile) or p)
    assert main(["bench", "iteration", "--json", "--compile", "--no-batch1",
                 "--methods", "dance"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert compiled == [True]
    assert row["speedup_compiled"] == round(row["total_s"] / row["compiled_total_s"], 3)
    eager = [{"method": "a", "total_s": 2.0}, {"method": "a (batch 1)", "total_s": 8.0}]
    assert bench_iteration.with_compiled(eager, [{"method": "a", "total_s": 0.5}]) == [
        {"method": "a", "total_s": 2.0, "compiled_total_s": 0.5, "speedup_compiled": 4.0},
        {"method": "a (batch 1)", "total_s": 8.0, "compiled_total_s": "",
         "speedup_compiled": ""}]

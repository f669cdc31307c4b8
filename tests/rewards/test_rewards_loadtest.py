"""The load test module: loopback only, and its batching comparison (a tiny run)."""

from __future__ import annotations

import pytest
import torch

from branchgrpo.rewards.loadtest import TinyCNN, compare, run


def test_run_refuses_non_loopback_servers():
    with pytest.raises(ValueError, match="only targets loopback"):
        run("http://10.0.0.1:8900", requests=1)


def test_tiny_cnn_is_fixed_and_batch_independent():
    x = torch.rand(6, 3, 16, 16)
    a, b = TinyCNN(), TinyCNN()
    whole = a(x, [""] * 6)
    assert torch.equal(whole, b(x, [""] * 6))  # same seed, same weights
    parts = torch.cat([a(x[:2], [""] * 2), a(x[2:], [""] * 4)])
    assert torch.allclose(whole, parts, atol=1e-5)


def test_compare_reports_both_modes_and_batching_merges():
    rows = compare(requests=8, batch=2, size=8, concurrencies=(4,),
                   rewards=("FixedCostReward",), repeats=1)
    by_mode = {r["mode"]: r for r in rows}
    assert set(by_mode) == {"batching", "no-batching"}
    assert by_mode["no-batching"]["mean_batch_images"] == 2.0
    assert by_mode["batching"]["mean_batch_images"] > 2.0  # 4 clients behind 20 ms calls
    assert all(r["images_per_s"] > 0 for r in rows)

"""The ``monitor/grid`` artefact monitor (`grid_energy`), token periods and sample grids."""


import numpy as np
import pytest
import torch

from branchgrpo.evaluate import grid_energy, image_stats, save_grid, token_period
from branchgrpo.tasks.shapes import sample_batch


def _checker(h: int = 16, w: int = 16) -> torch.Tensor:
    i, j = torch.arange(h)[:, None], torch.arange(w)[None]
    return ((i + j) % 2).float()


def test_checkerboard_has_all_its_energy_at_period_2():
    img = _checker().expand(2, 3, 16, 16)
    assert grid_energy(img, 2) == pytest.approx(1.0)
    assert grid_energy(img[:, None].expand(2, 3, 3, 16, 16), 2) == pytest.approx(1.0)  # video


def test_hand_computed_share_on_a_4x4_image():
    # g = 0.5 + 0.2 c + 0.2 cos(2 pi j / 4), c = +-1 checkerboard. Parseval: the checkerboard
    # holds 16 * 16 * 0.04 at (2, 2), the cosine 16 * 16 * 0.02 at (0, 1) and (0, 3); only the
    # first is on the Nyquist row/column, so the share is 0.04 / 0.06 = 2/3.
    j = torch.arange(4)[None].float()
    g = 0.5 + 0.2 * (2 * _checker(4, 4) - 1) + 0.2 * torch.cos(2 * torch.pi * j / 4)
    img = g.expand(1, 3, 4, 4)  # equal channels: the grey image is g
    assert grid_energy(img, 2) == pytest.approx(2 / 3, abs=1e-5)
    assert grid_energy(img, 4) == pytest.approx(1.0, abs=1e-5)  # (0, 1), (0, 3) are period 4


def test_flat_images_period_1_and_non_images_read_zero():
    assert grid_energy(torch.full((2, 3, 8, 8), 0.5), 2) == 0.0
    assert grid_energy(_checker().expand(1, 3, 16, 16), 1) == 0.0
    assert grid_energy(torch.rand(4, 2), 2) == 0.0


def test_planted_token_grid_raises_the_monitor_on_rendered_shapes():
    clean, _ = sample_batch(64, np.random.default_rng(0))
    planted = clean.clone()
    planted[:, :, ::2, ::2] += 0.2  # one brighter pixel in every 2x2 token
    low = grid_energy(clean, 2)
    assert low < 0.06  # measured 0.036
    assert grid_energy(planted.clamp(0, 1), 2) > 3 * low  # measured 0.353
    stats = image_stats(clean, 2)
    assert stats["monitor/grid"] == pytest.approx(low)
    assert image_stats(clean)["monitor/grid"] == 0.0  # no period given: no token grid


def test_token_periods_of_the_policies():
    from branchgrpo.models.tiny import TinyFluxPolicy

    assert TinyFluxPolicy.token_period == 2
    assert token_period(object()) == 1


def test_base_model_samples_read_low(tmp_path):
    """The shipped base model (no cache needed): clean samples, monitor near rendered shapes'."""
    from branchgrpo.config import load_config
    from branchgrpo.evaluate import sample
    from branchgrpo.models.factory import build_policy
    from branchgrpo.spec import model_options, resolve
    from branchgrpo.tasks.shapes import split_prompts

    cfg = load_config(None, [f"model.cache_dir={tmp_path}"])
    policy = build_policy(model_options(cfg, progress=False), torch.device("cpu"))
    held = split_prompts()[1]
    media = sample(policy, held, torch.tensor(resolve(cfg).sigmas), seed=10_000)
    assert media.shape[-2:] == (16, 16)
    assert grid_energy(media, token_period(policy)) < 0.06  # measured 0.029 (16 held-out prompts)


def test_save_grid_upscales_with_nearest_neighbour(tmp_path):
    from PIL import Image

    imgs, prompts = sample_batch(10, np.random.default_rng(1))
    path = save_grid(imgs, prompts, tmp_path / "g.png", title="t")
    w, h = Image.open(path).size
    assert w >= 8 * 128 and h >= 2 * 128  # 8 columns, 2 rows of 128-pixel cells


def test_saturation_reads_visible_pixels_only():
    img = torch.zeros(1, 3, 4, 4)
    img[0, :, 0, 0] = torch.tensor([0.8, 0.2, 0.2])  # saturation (0.8 - 0.2) / 0.8 = 0.75
    img[0, :, 0, 1] = torch.tensor([0.5, 0.5, 0.5])  # grey: 0
    img[0, :, 1, :] = torch.tensor([0.05, 0.0, 0.0])[:, None]  # near black, saturation 1: unseen
    assert image_stats(img)["monitor/saturation"] == pytest.approx(0.375)
    assert image_stats(torch.zeros(1, 3, 4, 4))["monitor/saturation"] == 0.0


def test_grid_warning_needs_both_the_ratio_and_the_margin():
    from branchgrpo.evaluate import grid_alert_level, grid_warning

    assert grid_alert_level(0.03) == pytest.approx(0.05)  # 0.03 + 0.02 beats 1.5 x 0.03
    assert grid_alert_level(0.1) == pytest.approx(0.15)  # 1.5 x 0.1 beats 0.1 + 0.02
    assert grid_warning(0.049, 0.03, "iter_0010") is None  # 1.6x, but within 64-sample noise
    message = grid_warning(0.06, 0.03, "iter_0010")
    assert message and "iter_0010" in message and "2.0x" in message and "train.kl_coef" in message
    assert grid_warning(0.14, 0.1, "after") is None and grid_warning(0.16, 0.1, "after")

"""The embedded task: rendered images satisfy their prompts, and clutter is what the reward
penalises (the flaw of the default base model that RL removes)."""

import numpy as np
import pytest
import torch

from branchgrpo.tasks.shapes import all_specs, parse, sample_batch, split_prompts
from branchgrpo.tasks.shapes_reward import ShapesReward


def test_prompt_round_trip_and_split():
    specs = all_specs()
    assert len(specs) == 64 and all(parse(s.prompt) == s for s in specs)
    train, held = split_prompts()
    assert len(train) == 48 and len(held) == 16 and not set(train) & set(held)
    with pytest.raises(ValueError, match="not a shapes-task prompt"):
        parse("three red circles on the left")


def test_clean_renders_score_high_and_clutter_is_penalised():
    reward = ShapesReward()
    clean, prompts = sample_batch(64, np.random.default_rng(0))
    cluttered, prompts2 = sample_batch(64, np.random.default_rng(0), clutter=1.0)
    assert prompts == prompts2  # the same prompts; only the extra objects differ
    r_clean, r_clut = reward(clean, prompts), reward(cluttered, prompts)
    assert r_clean.mean() > 0.85
    assert r_clut.mean() < r_clean.mean() - 0.1
    assert (cluttered != clean).flatten(1).any(1).float().mean() > 0.8  # an object was added


def test_a_stray_object_of_another_colour_costs_one_miscount():
    from branchgrpo.tasks.shapes import COLOURS, _stamp

    img = np.zeros((16, 16, 3), dtype=np.float32)
    _stamp(img, 7, 4, "circle", COLOURS["red"])  # what "one red circle on the left" asks
    clean = torch.from_numpy(img.copy()).permute(2, 0, 1)[None]
    _stamp(img, 12, 12, "square", COLOURS["green"])  # a stray object
    stray = torch.from_numpy(img).permute(2, 0, 1)[None]
    prompt = ["one red circle on the left"]
    purity, count, clean_position, shape = ShapesReward().components(clean, prompt)[0].tolist()
    assert (purity, count, shape) == (1.0, 1.0, 1.0)
    assert clean_position == pytest.approx(1 / (1 + np.exp(-2 * (3.5 - 0.5))))  # (-0.5, -3.5)
    purity, count, position, _ = ShapesReward().components(stray, prompt)[0].tolist()
    assert count == pytest.approx(np.exp(-1.0))  # exp(-(|1 - 1| + 1 stray))
    assert purity == pytest.approx(21 / 30)  # the circle: 21 of 21 + 9 foreground pixels
    assert position == clean_position  # position and shape read the prompt colour only


def _one(shape: str, r: int, c: int, colour: str = "red") -> torch.Tensor:
    from branchgrpo.tasks.shapes import COLOURS, _stamp

    img = np.zeros((16, 16, 3), dtype=np.float32)
    _stamp(img, r, c, shape, COLOURS[colour])
    return torch.from_numpy(img).permute(2, 0, 1)[None]


def test_shape_is_the_iou_with_the_rendered_shape():
    reward = ShapesReward()
    circle, square = _one("circle", 8, 4), _one("square", 8, 4)
    assert reward.components(circle, ["one red circle on the left"])[0, 3] == 1.0
    assert reward.components(square, ["one red square on the left"])[0, 3] == 1.0
    # the 3x3 square lies inside the 21-pixel disk: IoU 9 / 21 either way round
    assert reward.components(square, ["one red circle on the left"])[0, 3] == pytest.approx(9 / 21)
    assert reward.components(circle, ["one red square on the left"])[0, 3] == pytest.approx(9 / 21)


def test_a_corner_object_is_as_much_left_as_top_and_a_side_object_is_one_of_them():
    reward = ShapesReward()
    corner = _one("square", 3, 3)  # centroid offset (-4.5, -4.5): left as much as top
    for where in ("left", "top"):
        score = reward.components(corner, [f"one red square on the {where}"])[0, 2]
        assert score == pytest.approx(0.5)
    side = _one("square", 8, 3)  # centroid offset (+0.5, -4.5): clearly left
    left = reward.components(side, ["one red square on the left"])[0, 2]
    bottom = reward.components(side, ["one red square on the bottom"])[0, 2]
    assert left == pytest.approx(1 / (1 + np.exp(-2 * 4.0)))
    # 6 of its 9 pixels are in the lower half, and it is far more left than low
    assert bottom == pytest.approx(6 / 9 / (1 + np.exp(-2 * (0.5 - 4.5))))
    assert reward.components(side, ["one red square on the right"])[0, 2] == 0.0  # none there

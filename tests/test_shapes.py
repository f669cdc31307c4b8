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
    _stamp(img, 5, 4, "circle", COLOURS["red"])  # what "one red circle on the left" asks
    clean = torch.from_numpy(img.copy()).permute(2, 0, 1)[None]
    _stamp(img, 12, 12, "square", COLOURS["green"])  # a stray object
    stray = torch.from_numpy(img).permute(2, 0, 1)[None]
    prompt = ["one red circle on the left"]
    purity, count, position, _ = ShapesReward().components(clean, prompt)[0].tolist()
    assert (purity, count, position) == (1.0, 1.0, 1.0)
    purity, count, position, _ = ShapesReward().components(stray, prompt)[0].tolist()
    assert count == pytest.approx(np.exp(-1.0))  # exp(-(|1 - 1| + 1 stray))
    assert purity == pytest.approx(21 / 30)  # the circle: 21 of 21 + 9 foreground pixels
    assert position == 1.0  # position and shape read the prompt colour only

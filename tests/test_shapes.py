"""The embedded task: rendered images satisfy their prompts, and clutter is what the reward
penalises (the flaw of the default base model that RL removes)."""

import numpy as np
import pytest

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

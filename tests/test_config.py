"""The config schema on its own (branchgrpo.config): defaults, per-value validation (every range
and choice, NaN and inf), unknown keys, type errors, layering of files and dotted overrides,
the YAML round trip and the per-rank prompt count."""

from __future__ import annotations

import math
import re
import typing
from dataclasses import fields

import pytest

from branchgrpo import config as C
from branchgrpo.config import (
    CHOICES,
    RANGES,
    Config,
    ConfigError,
    all_keys,
    load_config,
    prompts_per_rank,
    to_yaml,
    validate,
)


def _section(key: str):
    section = key.split(".")[0]
    return next(fl.default_factory for fl in fields(Config) if fl.name == section)


def _is_int(key: str) -> bool:
    """The field's type is int (or int | None), not float."""
    hint = typing.get_type_hints(_section(key))[key.split(".")[1]]
    return hint is int or int in typing.get_args(hint)


def _outside(key: str) -> list:
    """Values just outside RANGES[key], on each side it is bounded."""
    interval = RANGES[key]
    lo_s, hi_s = interval[1:-1].split(",")
    lo = float(lo_s)
    step = 1 if _is_int(key) else 1e-3
    out = [lo - step if interval[0] == "[" else lo]
    if hi_s:
        hi = float(hi_s)
        out.append(hi + step if interval[-1] == "]" else hi)
    return [int(v) if _is_int(key) else v for v in out]


def _inside(key: str) -> list:
    """The bounds of RANGES[key] that belong to it, or the value just inside an open one."""
    interval = RANGES[key]
    lo_s, hi_s = interval[1:-1].split(",")
    step = 1 if _is_int(key) else 1e-3
    out = [float(lo_s) if interval[0] == "[" else float(lo_s) + step]
    if hi_s:
        out.append(float(hi_s) if interval[-1] == "]" else float(hi_s) - step)
    return [int(v) if _is_int(key) else v for v in out]


def test_defaults_load_and_validate():
    cfg = load_config()
    assert cfg == Config()
    validate(Config())
    assert (cfg.model.kind, cfg.rollout.method, cfg.train.lr, cfg.reward.weights) == (
        "tiny", "branch", 2e-4, {"shapes": 1.0})


def test_every_ranged_and_choice_key_is_a_schema_key():
    keys = all_keys()
    assert set(RANGES) <= set(keys) and set(CHOICES) <= set(keys)
    assert all(doc for doc in keys.values())  # every key has a one-line doc


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_range_rejects_values_outside_with_the_key(key):
    for bad in _outside(key):
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must .*got {bad}$"):
            load_config(None, [f"{key}={bad}"])
    for ok in _inside(key):  # the closed bounds, or just inside an open one, are accepted
        assert C._get(load_config(None, [f"{key}={ok}"]), key) == ok


def test_range_messages_say_the_interval():
    with pytest.raises(ConfigError, match=r"^train.lr must be > 0, got 0.0$"):
        load_config(None, ["train.lr=0"])
    with pytest.raises(ConfigError, match=r"^model.clutter must lie in \[0, 1\], got 1.5$"):
        load_config(None, ["model.clutter=1.5"])
    with pytest.raises(ConfigError, match=r"^train.ema_decay must lie in \[0, 1\), got 1.0$"):
        load_config(None, ["train.ema_decay=1.0"])


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_choice_rejects_another_value_with_the_key(key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}='nope' is not one of "):
        load_config(None, [f"{key}=nope"])
    for ok in CHOICES[key]:  # (a real model.kind needs a model.path)
        assert C._get(load_config(None, [f"{key}={ok}", "model.path=m"]), key) == ok


def test_a_misspelt_choice_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"model.dtype='bf61' is not one of \['fp32', 'bf16', "
                                          r"'fp16'\]; did you mean 'bf16'\?"):
        load_config(None, ["model.dtype=bf61"])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", ["train.lr", "model.guidance", "rollout.level",
                                 "train.time_budget", "advantage.alpha"])
def test_nan_and_inf_are_rejected(key, value):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be a finite number"):
        load_config(None, [f"{key}={value}"])


def test_a_nan_reward_weight_is_rejected():
    with pytest.raises(ConfigError, match="reward.weights.shapes must be a finite number"):
        load_config(None, ["reward.weights={shapes: .nan}"])


def test_unknown_keys_name_the_key_the_source_and_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr' in the command "
                                          r"line; did you mean 'train.lr'\?"):
        load_config(None, ["train.lrr=1"])
    path = tmp_path / "c.yaml"
    path.write_text("rollout:\n  branch_factr: 3\n")
    with pytest.raises(ConfigError, match=rf"'rollout.branch_factr' in {re.escape(str(path))}"
                                          r"; did you mean 'rollout.branch_factor'\?"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown config key 'zzz.qqq' in the command line$"):
        load_config(None, ["zzz.qqq=1"])


@pytest.mark.parametrize("override,key", [
    ("train.iterations=abc", "train.iterations"), ("train.lr=fast", "train.lr"),
    ("log.tensorboard=maybe", "log.tensorboard"), ("rollout.split_steps=3", "rollout.split_steps"),
    ("train.iterations=1.5", "train.iterations"),
])
def test_type_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^bad value for '{re.escape(key)}' in the command"):
        load_config(None, [override])


@pytest.mark.parametrize("value", [
    "{shapes:1}",
    "{shapes:1.0}",  # the key 'reward.weights.shapes:1.0' has a dot after the colon
])
def test_a_mapping_without_spaces_gets_a_hint(value):
    with pytest.raises(ConfigError, match="write a mapping with a space after each colon"):
        load_config(None, [f"reward.weights={value}"])


def test_malformed_overrides_and_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"overrides must look like key.sub=value, got "
                                          r"\['train.lr'\]"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="config file .*missing.yaml' not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(listed)


def test_file_then_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 3.0e-4, iterations: 7}\nreward: {weights: {a: 1.0, b: 2.0}}\n")
    cfg = load_config(path, ["train.lr=5e-4", "train.lr=6e-4", "rollout.split_steps=[1,2]",
                             "reward.weights={c: 0.5}"])
    assert cfg.train.lr == 6e-4  # the last override wins
    assert cfg.train.iterations == 7  # the file's value where no override sets it
    assert cfg.train.weight_decay == 1e-4  # the default where neither does
    assert cfg.rollout.split_steps == [1, 2]
    assert cfg.reward.weights == {"c": 0.5}  # a layer naming rewards replaces the set
    assert load_config(path).reward.weights == {"a": 1.0, "b": 2.0}  # ... also the default's


def test_values_meaningless_together_are_rejected():
    for over, message in [
        (["reward.weights={}"], "reward.weights is empty"),
        (["reward.weights={a: 0.0, b: 0}"], "every reward.weights value is 0"),
        (["rollout.split_steps=[]"], "rollout.split_steps is empty"),
        (["rollout.granularities=[]"], "rollout.granularities is empty"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, over)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["train.lr=3e-5", "rollout.split_steps=[0,2]", "model.kind=sd3",
                             "model.path=some/model", "reward.weights={hpsv2: 0.5, clip: 2}",
                             "reward.options={clip: {scale: 3}}", "train.clip_eps=1e-4",
                             "log.tensorboard=false", "selection.depths=[3,4]"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    back = load_config(path)
    assert back == cfg
    assert to_yaml(back) == to_yaml(cfg)
    assert back.reward.weights == {"hpsv2": 0.5, "clip": 2.0}


def test_describe_lists_every_key_with_its_default():
    text = C.describe()
    heads = [x.split(" = ")[0].strip() for x in text.splitlines() if x[:2] == "  " and x[2] != " "]
    assert heads == list(all_keys())  # one "  key = default" line per key, in schema order
    assert "  train.lr = 0.0002\n      AdamW learning rate" in text
    assert "  rollout.num_steps = None\n" in text


@pytest.mark.parametrize("over,world,expected", [
    ([], 1, 8), ([], 4, 8),  # train.prompts_per_iteration on each rank
    (["train.prompts_per_iteration=3"], 2, 3),
    (["dist.global_prompts=8"], 1, 8), (["dist.global_prompts=8"], 4, 2),
    (["dist.global_prompts=6"], 3, 2), (["dist.global_prompts=6"], 6, 1),
])
def test_prompts_per_rank(over, world, expected):
    assert prompts_per_rank(load_config(None, over), world) == expected


def test_global_prompts_that_do_not_divide_say_what_fits():
    cfg = load_config(None, ["dist.global_prompts=6"])
    with pytest.raises(ConfigError, match=re.escape(
            "dist.global_prompts=6 does not divide over 4 ranks: set it to a multiple of 4 "
            "(e.g. 8 or 4) or run on 1, 2, 3, 6 ranks")):
        prompts_per_rank(cfg, 4)
    cfg = load_config(None, ["dist.global_prompts=3"])
    with pytest.raises(ConfigError, match=re.escape("multiple of 4 (e.g. 4) or run on 1, 3 ")):
        prompts_per_rank(cfg, 4)  # no lower multiple of 4 than 3


def test_list_defaults_are_not_shared_between_configs():
    a, b = Config(), Config()
    a.reward.weights["x"] = 1.0
    assert b.reward.weights == {"shapes": 1.0}
    assert math.isclose(Config().train.lr, 2e-4)

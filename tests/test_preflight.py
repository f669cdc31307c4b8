"""Every bad input is one clear line and exit 2 before any model loads, with no run folder
left behind (config.validate, preflight.check_run, cli.main)."""

import json
import math
import time

import pytest
import torch

from branchgrpo import cli
from branchgrpo.config import ConfigError, load_config
from branchgrpo.engine.methods import METHODS
from branchgrpo.engine.plans import build_plan
from branchgrpo.engine.tree import rollout
from branchgrpo.evaluate import evaluate
from branchgrpo.log import RunLogger, read_metrics
from branchgrpo.models.analytic import GaussianPolicy
from branchgrpo.preflight import MAX_LEAVES, check_run
from branchgrpo.rewards import RewardError

BAD = [
    (["reward.weights={nope: 1}"], "reward.weights.nope: unknown reward 'nope'"),
    (["reward.weights={nope:1}"], "space after each colon"),
    (["reward.weights={shapes: .nan}"], "reward.weights.shapes must be a finite number"),
    (["reward.weights={shapes: 0}"], "every reward.weights value is 0"),
    (["reward.judge=nope"], "reward.judge: unknown reward 'nope'"),
    (["reward.weights={u: 1}", "reward.options={u: {source: 'no_such_mod:f'}}"],
     "cannot import module 'no_such_mod'"),
    (["reward.options={hps: {device: cpu}}"], "reward.options.hps configures a reward that is "
     "not in reward.weights"),
    (["selection.fraction=0.5"], "selection.fraction is not used by selection 'all'.*"
     "timestep_fraction"),
    (["selection.name=nope"], "selection.name='nope' is unknown"),
    (["advantage.rule=nope"], "advantage.rule='nope' is unknown"),
    (["rollout.method=branch_mix", "rollout.mix_stride=0"], "rollout.mix_stride must be >= 1"),
    (["rollout.method=mix", "rollout.iters_per_shift=0"], "rollout.iters_per_shift must be >= 1"),
    (["rollout.method=nope"], "rollout.method='nope' is unknown"),
    (["data.eval_samples=0"], "data.eval_samples must be >= 1"),
    (["model.pretrain_steps=0"], "model.pretrain_steps must be >= 1"),
    (["train.lr=nan"], "train.lr must be a finite number"),
    (["train.lr=inf"], "train.lr must be a finite number"),
    (["train.lr=-1"], "train.lr must be > 0"),
    (["rollout.branch_factor=40"], "2,560,000 leaves .* lower rollout.branch_factor"),
    (["rollout.branch_factor=1"], "rollout.branch_factor must be >= 2"),
    (["rollout.method=dance", "rollout.group_size=1"], "rollout.group_size must be >= 2"),
    (["advantage.clip=-1"], "advantage.clip must be > 0"),
    (["advantage.clip=0"], "advantage.clip must be > 0"),
    (["train.clip_eps=0"], "train.clip_eps must be > 0"),
    (["log.eval_every=-1"], "log.eval_every must be >= 0"),
    (["train.warmup_iterations=-1"], "train.warmup_iterations must be >= 0"),
    (["train.max_grad_norm=-1"], "train.max_grad_norm must be >= 0"),
    (["train.kl_coef=-0.1"], "train.kl_coef must be >= 0"),
    (["train.weight_decay=-1"], "train.weight_decay must be >= 0"),
    (["train.ema_decay=1"], r"train.ema_decay must lie in \[0, 1\)"),
    (["model.lora_rank=0"], "model.lora_rank must be >= 1"),
    (["selection.until=2"], r"selection.until must lie in \[0, 1\]"),
    (["rollout.kernel=nope"], "rollout.kernel='nope' is not one of"),
    (["train.device=gpu"], "train.device='gpu' is not one of"),
    (["rollout.method=flow_grpo", "rollout.kernel=cps", "train.ratio=guard"],
     "train.ratio=guard with the cps kernel"),
    (["rollout.split_steps=[]"], "rollout.split_steps is empty"),
    (["train.lrr=1"], "unknown config key 'train.lrr'.*did you mean 'train.lr'"),
    (["overrides=[1,"], "cannot parse the overrides"),
    (["model.kind=nope"],  # the registered kinds, new families after the first four
     r"model.kind='nope' is not one of \['tiny', 'flux', 'sd3', 'wan'(, '\w+')*\]$"),
    (["model.kind=flx", "model.path=m"], "did you mean 'flux'"),
    (["model.kind=analytic", "model.path=m"], "model.kind='analytic' is not one of"),
    (["model.kind=flux"], "model.kind=flux needs model.path"),
]


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """Work in an empty folder, and fail the test if anything tries to build a model."""
    monkeypatch.chdir(tmp_path)

    def built(*a, **k):
        raise AssertionError("a model was built before the bad input was reported")

    monkeypatch.setattr("branchgrpo.train.build_policy", built)
    monkeypatch.setattr("branchgrpo.inference.build_policy", built)
    return tmp_path


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_config_is_one_line_exit_2_and_no_run_folder(no_model, capsys, args, message):
    import re

    t = time.perf_counter()
    code, err = _cli(capsys, "train", "model.cache_dir=cache", *args)
    assert code == 2, err
    assert re.search(message, err), err
    assert err.startswith("config error: ") and err.count("\n") == 1, err  # one line
    assert "Traceback" not in err
    assert not (no_model / "runs").exists() and not (no_model / "cache").exists()
    assert time.perf_counter() - t < 5, "checked before anything slow"


def test_prompt_files_are_checked_line_by_line_at_start(no_model, capsys):
    good = "two red circles on the left"
    (no_model / "p.txt").write_text(f"{good}\n{good}\nthree purple hexagons in the sky\n")
    code, err = _cli(capsys, "train", "data.prompts=p.txt")
    assert code == 2
    assert "data.prompts: line 3 of p.txt" in err and "'three'" in err, err
    (no_model / "e.txt").write_text("")
    code, err = _cli(capsys, "train", "data.eval_prompts=e.txt")
    assert code == 2 and "prompt file 'e.txt' is empty" in err, err


@pytest.mark.parametrize("text,message", [
    ("model: [1,\n", "is not valid YAML"),
    ("- a\n- b\n", "must hold a mapping of sections"),
    ("train: 3\n", "unknown config key 'train'"),
])
def test_bad_config_files_exit_2(no_model, capsys, text, message):
    (no_model / "c.yaml").write_text(text)
    code, err = _cli(capsys, "train", "c.yaml")
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_two_config_files_and_bad_sample_eval_arguments_exit_2(no_model, capsys):
    code, err = _cli(capsys, "train", "a.yaml", "b.yaml")
    assert code == 2 and "give one config file" in err
    code, err = _cli(capsys, "sample", "run", "--prompt", "x", "--n", "0")
    assert code == 2 and "--n must be >= 1" in err
    code, err = _cli(capsys, "eval", "run", "--samples", "-3")
    assert code == 2 and "--samples must be >= 1" in err


def test_missing_model_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    """A real family whose weights are not here: the hub's advice in one line, no folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "p.txt").write_text("a cat\n")
    code, err = _cli(capsys, "train", "model.kind=flux", "model.path=no-owner/no-model",
                     "reward.weights={jpeg_compressibility: 1}", "reward.judge=''",
                     "data.prompts=p.txt", "data.eval_prompts=p.txt")
    assert code == 2, err
    last = err.strip().splitlines()[-1]  # (libraries may warn before it)
    assert last.startswith("model not available: cannot load 'no-owner/no-model'"), err
    assert "hf download no-owner/no-model" in last and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_plan_size_is_exact_for_every_method():
    """The arithmetic node/leaf count that bounds a tree before it is rolled out."""
    pol = GaussianPolicy(2)
    for name in METHODS.names():
        m = METHODS.get(name)
        plan = build_plan(m.plan, **m.plan_kw)
        tree = rollout(pol, pol.encode(["x"]), plan, generator=torch.Generator())
        assert plan.size() == (tree.num_nodes, int(tree.leaf.sum())), name
    assert build_plan("branch", branch_factor=3).size() == (1 + 3 * 3 + 3 * 9 + 3 * 27 +
                                                            11 * 81, 81)


def test_published_trees_fit_the_bound():
    for name in METHODS.names():
        check_run(load_config(None, [f"rollout.method={name}", "rollout.level=null"]))
    assert build_plan("g2rpo").size()[1] < MAX_LEAVES


def _constant(media, prompts):
    return torch.zeros(len(prompts))


def test_evaluation_checks_scores_as_training_does():
    pol = GaussianPolicy(2)
    sig = torch.linspace(1, 0, 5)
    nan = lambda m, p: torch.full((len(p),), math.nan)  # noqa: E731
    short = lambda m, p: torch.zeros(len(p) - 1)  # noqa: E731
    as_list = lambda m, p: [0.5] * len(p)  # noqa: E731
    with pytest.raises(RewardError, match="reward 'u' returned 2 non-finite"):
        evaluate(pol, ["a", "b"], sig, {"u": nan})
    with pytest.raises(RewardError, match=r"reward 'u' returned scores of shape \(1,\)"):
        evaluate(pol, ["a", "b"], sig, {"u": short})
    metrics, _ = evaluate(pol, ["a", "b"], sig, {"u": as_list, "c": _constant})
    assert metrics["eval/u"] == 0.5 and metrics["eval/c"] == 0.0


def test_metrics_lines_stay_strict_json(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    log.log(1, {"a": math.nan, "b": math.inf, "c": torch.tensor(2.0), "d": "x", "e": True})
    line = (tmp_path / "metrics.jsonl").read_text()
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
    assert read_metrics(tmp_path) == [{"iteration": 1, "a": None, "b": None, "c": 2.0,
                                       "d": "x", "e": True}]



def test_sample_prompts_need_only_the_policy_vocabulary():
    from branchgrpo.preflight import check_prompts

    cfg = load_config(None, [])
    check_prompts(cfg, ["one red circle"], "--prompt {line}", scored=False)
    with pytest.raises(ConfigError, match="--prompt 2 cannot be used by the tiny policy.*'huge'"):
        check_prompts(cfg, ["one red circle", "one huge circle"], "--prompt {line}",
                      scored=False)
    with pytest.raises(ConfigError, match="--prompt 1 cannot be used by the shapes reward"):
        check_prompts(cfg, ["one red circle"], "--prompt {line}")


def test_config_is_a_pure_schema():
    """Loading and validating a config imports nothing of the engine (spec and preflight do)."""
    import subprocess
    import sys

    code = ("import sys; from branchgrpo.config import load_config; load_config(None, "
            "['rollout.method=dance']); bad = [m for m in sys.modules if m.split('.')[:2] in "
            "(['branchgrpo', n] for n in ('tree', 'methods', 'plans', 'spec', 'models', "
            "'rewards', 'advantages', 'pruning'))]; print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_checks_leave_the_global_generators_alone():
    """A resumed run writes plan.json after restoring its RNG state: the dry run must not draw
    from the global generator (it once shifted every later draw of a resumed run)."""
    import random

    import numpy as np

    cfg = load_config(None, ["rollout.method=dance"])
    torch.manual_seed(0)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    check_run(cfg)
    from branchgrpo.plan_report import plan_report

    plan_report(cfg)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert (np.random.get_state()[1] == before[1]).all() and random.getstate() == before[2]

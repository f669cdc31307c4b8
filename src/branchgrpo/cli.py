"""The ``branchgrpo`` command line: train | plan | encode | sample | eval | serve-reward |
bench."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

TABLE_DEFAULT = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
DESCRIPTION = """\
branchgrpo: online RL for flow-matching generators (BranchGRPO, DanceGRPO, Flow-GRPO,
MixGRPO, G2RPO) with one batched tree-rollout engine.

commands:
  train [CONFIG] [key=value ...]   train (no arguments: the embedded shapes default)
  train --resume RUN_DIR           continue a stopped run from its newest checkpoint
  plan [CONFIG] [key=value ...]    the resolved run (schedule, level, tree sizes), no weights
  encode [CONFIG] [key=value ...] --out FILE   every prompt's embeddings, text encoders only
  recipes [--check]                configs/*.yaml beside the published values (docs/recipes.md)
  build-base [--check]             rebuild the embedded default's shipped base model and judge
  sample CHECKPOINT --prompt P     write images from a checkpoint
  eval RUN_DIR|CHECKPOINT          held-out prompts, every configured reward, a table
  serve-reward NAME ...            serve rewards over HTTP (see docs/rewards.md)
  bench nfe       forward evaluations, edges and trained edges per method (measured)
  bench rollout   batched tree engine vs per-node and sequential evaluation (wall time)
  bench iteration every method's rollout/reward/update time on one policy, vs DanceGRPO
  bench learn     every method's held-out judge vs training time on the embedded default
  bench credit    how much of each trained edge's advantage its own action earned
  bench reward-server  load, batching and fault tests of the reward server
"""


def _train(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError, describe, load_config
    from .train import TrainingStopped, train

    if args.help_config:
        print(describe())
        return 0
    try:
        if args.resume:
            run = Path(args.resume)
            if not (run / "config.yaml").is_file():
                raise ConfigError(f"{run} is not a run directory (no config.yaml)")
            cfg = load_config(run / "config.yaml", args.overrides)
            out = train(cfg, resume=run)
        else:
            cfg = load_config(args.config, args.overrides)
            out = train(cfg)
    except CheckpointError as e:
        print(f"resume error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: report at {out / 'report.md'}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .config import load_config
    from .memory import DEFAULT_TFLOPS
    from .plan_report import format_report, plan_report

    tflops = DEFAULT_TFLOPS if args.tflops is None else args.tflops
    report = plan_report(load_config(args.config, args.overrides), tflops=tflops)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def _encode(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .encode import encode_command

    cfg = load_config(args.config, args.overrides)
    if not (args.out or cfg.model.prompt_embeddings):
        raise ConfigError("give --out FILE (or set model.prompt_embeddings: the file it writes)")
    out = encode_command(cfg, args.out or cfg.model.prompt_embeddings, device=args.device,
                         extra=args.prompt or (), progress=cfg.log.progress)
    print(f"wrote {out}: set model.prompt_embeddings={out} to train without the text encoders")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from .recipes import build, problems

    recipes = build()
    out = Path(args.out)
    if args.check:
        found = problems(recipes, out)
        for msg in found:
            print(f"recipes: {msg}", file=sys.stderr)
        return 1 if found else 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(recipes.markdown, encoding="utf-8")
    for msg in recipes.errors:
        print(f"recipes: {msg}", file=sys.stderr)
    print(f"wrote {out} ({sum(map(len, recipes.rows.values()))} rows, "
          f"{len(recipes.rows)} configs)")
    return 1 if recipes.errors else 0


def _build_base(args: argparse.Namespace) -> int:
    from .models.tiny import build_shipped

    return build_shipped(Path(args.out) if args.out else None, check=args.check)


def _split_config_args(args: argparse.Namespace) -> None:
    """``train a.yaml k=v`` and ``train k=v``: the one argument without '=' is the config."""
    files = [a for a in args.rest if "=" not in a]
    if len(files) > 1:
        from .config import ConfigError

        raise ConfigError(f"give one config file, got {files} (overrides look like "
                          "key.sub=value)")
    args.config = files[0] if files else None
    args.overrides = [a for a in args.rest if "=" in a]


def _sample(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .inference import sample_command

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1 image per prompt, got {args.n}")
    if any(not p.strip() for p in args.prompt):
        raise ConfigError("--prompt must not be empty")

    return sample_command(args.checkpoint, args.prompt, args.out, args.n, args.seed)


def _eval(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .inference import eval_command

    if args.samples < 0:
        raise ConfigError(f"--samples must be >= 1 (or 0 for the config's), got {args.samples}")

    return eval_command(args.target, args.samples, args.json)


def _serve_reward(args: argparse.Namespace) -> int:
    from . import scoring  # noqa: F401  (the embedded task's rewards are servable by name)
    from .rewards.server import main as serve_main

    return serve_main(args.rest, prog="branchgrpo serve-reward")


CREDIT_HELP = """\
For every edge a method trains, compare the advantage it gets with the advantage its action
earned: A* = V(child) - V(parent), V estimated by K continuations of the method's own sampler
from the stored node, on the embedded default's base model and training reward. Reports per
method the correlation of A with A* (raw, and corrected for the Monte-Carlo noise of A*), the
fraction of same signs, and the correlation per grid step (plot). Writes credit.md,
credit.json and credit_by_step.png to --out. Default: 6 methods, 2 prompts, K = 16: a few
minutes on 2 CPU cores.
"""


LEARN_HELP = """\
Train each method on the embedded default (the tiny FLUX-style policy on the shapes task) for
the same budget of training seconds (evaluation and the one-off, cached pretraining of the
base model and judge excluded), for several seeds, and plot the held-out judge score against
training seconds and against iterations (mean over seeds, band: min-max). Writes to --out:
learn.md (table + plots + command + machine), learn.json, learn_time.png,
learn_iterations.png and runs/<method>-s<seed>/ (each run's metrics, report and train.log).

Table: iterations done, s/iteration, judge before, judge final (mean +- std over seeds),
strict final, relative change, and the time to reach the target judge score (default: 1.2 x
the mean judge before training). A failed run is recorded and the others continue.

Defaults: 9 methods x 3 seeds x 100 s (+ evaluations): about an hour on 2 CPU cores. The
budget is wall-clock training time, so run it on an otherwise idle machine.
--quick (CI): dance and branch, 1 seed, 5 s, model.pretrain_steps=5, data.eval_samples=4;
about a minute; exits 1 unless every run trained and the outputs exist. Explicit flags win
over --quick's choices. Overrides (key=value) apply to every run, after the bench's own
settings, e.g. data.eval_samples=128 or train.lr=1e-4.
"""


def _bench_reward_server(args: argparse.Namespace) -> int:
    from .rewards.loadtest import main as loadtest_main

    return loadtest_main(args.rest, prog="branchgrpo bench reward-server")


def _bench(name: str) -> Callable[[argparse.Namespace], int]:
    """``bench <name>``: `branchgrpo.bench.<name>.command`, imported when it runs."""

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(f"branchgrpo.bench.{name}").command(args)

    return run


def _add_bench(sub: Any) -> None:
    """``bench nfe | rollout | iteration | learn | reward-server | credit``."""
    bench = sub.add_parser("bench", help="benchmarks of the rollout engine and the methods")
    bsub = bench.add_subparsers(dest="bench", required=True)
    nfe = bsub.add_parser("nfe", help="forwards, edges and trained edges per tree, per method")
    nfe.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    nfe.add_argument("--methods", nargs="*", help="subset of methods (default: all)")
    nfe.set_defaults(fn=_bench("nfe"))
    ro = bsub.add_parser("rollout", help="batched engine vs per-node and sequential rollouts")
    ro.add_argument("--model", default="tiny", help="tiny (the embedded default's FLUX "
                    "transformer), analytic, or flux-dev (FLUX.1-dev size, random weights)")
    ro.add_argument("--trees", type=int, default=2, help="prompts (trees) per rollout batch")
    ro.add_argument("--max-batch", type=int, default=256, help="max rows per forward call")
    ro.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    ro.add_argument("--device", default="cpu", help="cpu or cuda")
    ro.add_argument("--storage-dtype", default="fp32", choices=["fp32", "bf16"])
    ro.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    ro.set_defaults(fn=_bench("rollout"))
    it = bsub.add_parser("iteration", help="every method's iteration time on one policy")
    it.add_argument("--model", default="tiny", help="tiny (embedded default size) or flux-dev")
    it.add_argument("--methods", nargs="*", help="subset (default: all, DanceGRPO first)")
    it.add_argument("--prompts", type=int, default=1, help="prompts (trees) per iteration")
    it.add_argument("--repeats", type=int, default=1, help="timed runs per method (best kept)")
    it.add_argument("--max-batch", type=int, default=64, help="max rows per forward call")
    it.add_argument("--edge-chunk", type=int, default=64, help="edges per backward chunk")
    it.add_argument("--device", default="cpu", help="cpu or cuda")
    it.add_argument("--no-batch1", action="store_true", help="skip the baseline run one sample "
                    "per forward and one edge per backward (the published code's way)")
    it.add_argument("--compile", action="store_true", help="run every method again with the "
                    "transformer's blocks compiled (model.compile=true): compiled_total_s and "
                    "speedup_compiled (eager / compiled) per row")
    it.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    it.set_defaults(fn=_bench("iteration"))
    le = bsub.add_parser("learn", help="every method's held-out judge vs training time "
                         "(several seeds)", description=LEARN_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    le.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides for every run (see train --help-config)")
    le.add_argument("--methods", metavar="A,B,...", help="comma-separated methods (default: "
                    "dance_full,dance,flow_grpo,mix,mix_flash,g2rpo,branch,branch_depth,"
                    "branch_mix)")
    le.add_argument("--seeds", type=int, metavar="N", help="seeds 0..N-1 per method "
                    "(default 3)")
    le.add_argument("--budget", type=float, metavar="SECONDS", help="training seconds per "
                    "run, evaluation excluded (default 100)")
    le.add_argument("--eval-every", type=float, metavar="SECONDS", help="held-out evaluation "
                    "every this many training seconds (default: budget / 5)")
    le.add_argument("--target", type=float, metavar="X", help="judge score for the time-to-"
                    "target column (default: 1.2 x the mean judge before training)")
    le.add_argument("--out", default="bench_learn", metavar="DIR", help="output folder "
                    "(default ./bench_learn; its runs/ are overwritten)")
    le.add_argument("--quick", action="store_true", help="a one-minute pipeline check (CI)")
    le.set_defaults(fn=_bench("learn"))
    # as serve-reward: every argument, --help included, goes to rewards.loadtest.main
    lt = bsub.add_parser("reward-server", help="load and fault tests of the reward server "
                         "(docs/benchmarks/reward_server.md)", add_help=False, prefix_chars="+")
    lt.add_argument("rest", nargs=argparse.REMAINDER)
    lt.set_defaults(fn=_bench_reward_server)
    cr = bsub.add_parser("credit", help="how much of each trained edge's advantage its own "
                         "action earned (per method)", description=CREDIT_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    cr.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides (see train --help-config)")
    cr.add_argument("--methods", metavar="A,B,...", help="comma-separated methods (default: "
                    "dance_full,flow_grpo,mix,g2rpo,branch,branch_depth)")
    cr.add_argument("--prompts", type=int, default=2, help="training prompts (trees)")
    cr.add_argument("--continuations", type=int, default=16, metavar="K",
                    help="continuations per stochastic node (split in two halves)")
    cr.add_argument("--seed", type=int, default=0, help="rollout and continuation seed")
    cr.add_argument("--out", default="bench_credit", metavar="DIR", help="output folder")
    cr.set_defaults(fn=_bench("credit"))


def build_parser() -> argparse.ArgumentParser:
    """Every command and its options."""
    p = argparse.ArgumentParser(prog="branchgrpo", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a policy (default: the embedded shapes task)",
                        description="Train with a config: schema defaults <- CONFIG (YAML "
                        "overrides) <- key.sub=value arguments. See --help-config for keys.")
    tr.add_argument("rest", nargs="*", metavar="[CONFIG] [key=value ...]",
                    help="optional YAML file, then overrides like train.iterations=10")
    tr.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest "
                    "checkpoint (overrides still apply, e.g. train.iterations=100)")
    tr.add_argument("--help-config", action="store_true", help="list every config key")
    tr.set_defaults(fn=_train)
    pl = sub.add_parser("plan", help="show the resolved run without loading weights",
                        description="The run a config resolves to, with the checkpoint's "
                        "schedule (its config files only): sigmas, timesteps, kernel, level, "
                        "branch factors, forwards/edges/leaves, batch geometry (WORLD_SIZE), "
                        "dtypes, estimated peak memory per rank and seconds per iteration.")
    pl.add_argument("rest", nargs="*", metavar="[CONFIG] [key=value ...]",
                    help="optional YAML file, then overrides like rollout.method=dance")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    pl.add_argument("--tflops", type=float, default=None,  # None: memory.DEFAULT_TFLOPS
                    help="sustained TFLOP/s per device for the seconds per iteration (default "
                         "400: an H100/H200 in bf16 at ~40%% MFU)")
    pl.set_defaults(fn=_plan)
    en = sub.add_parser("encode", help="encode every prompt once into a prompt-embedding file",
                        description="Load only the family's text encoders and tokenizers, "
                        "encode every distinct prompt of data.prompts and data.eval_prompts "
                        "(each alone, with the family's own encode) and write one safetensors "
                        "file; a run with model.prompt_embeddings=FILE then never loads the "
                        "text encoders (docs/small_gpu.md).")
    en.add_argument("rest", nargs="*", metavar="[CONFIG] [key=value ...]",
                    help="the run's YAML file, then its overrides")
    en.add_argument("--out", metavar="FILE", help="the .safetensors file (default: the "
                    "config's model.prompt_embeddings)")
    en.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the encoders run (default cpu)")
    en.add_argument("--prompt", action="append", help="one more prompt to encode (repeatable: "
                    "prompts sample will be asked for)")
    en.set_defaults(fn=_encode)
    rc = sub.add_parser("recipes", help="paper configs beside the published values",
                        description="Resolve every configs/*.yaml (no weights) and write a "
                        "table per config beside the published values of docs/published.json.")
    rc.add_argument("--check", action="store_true", help="write nothing; exit 1 if the table "
                    "is stale or a value differs from the published one without a note")
    rc.add_argument("--out", default=str(TABLE_DEFAULT), help="the table (default: "
                    "docs/recipes.md of this checkout)")
    rc.set_defaults(fn=_recipes)
    bb = sub.add_parser("build-base", help="pretrain the shipped tiny base model and judge "
                        "(one thread, so the files are reproducible on one CPU model)")
    bb.add_argument("--out", default=None, metavar="DIR", help="write there instead of over "
                    "the package's files")
    bb.add_argument("--check", action="store_true", help="rebuild into a temporary folder and "
                    "compare with the shipped files, tensor by tensor")
    bb.set_defaults(fn=_build_base)
    sa = sub.add_parser("sample", help="write images from a checkpoint")
    sa.add_argument("checkpoint", help="a checkpoint file or a run directory (newest one)")
    sa.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    sa.add_argument("--n", type=int, default=4, help="images per prompt")
    sa.add_argument("--out", default=None, help="output folder (default: a new "
                    "samples/sample_NNN folder of the run directory)")
    sa.add_argument("--seed", type=int, default=0, help="noise seed")
    sa.set_defaults(fn=_sample)
    ev = sub.add_parser("eval", help="score held-out prompts with every configured reward")
    ev.add_argument("target", help="a run directory or a checkpoint file")
    ev.add_argument("--samples", type=int, default=0, help="images (0: the config's)")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.set_defaults(fn=_eval)
    # every argument, --help included, goes to rewards.server.main, which parses it (options
    # before or after the names); prefix "+" keeps this parser from claiming "--port" itself
    se = sub.add_parser("serve-reward", help="serve rewards over HTTP", add_help=False,
                        prefix_chars="+")
    se.add_argument("rest", nargs=argparse.REMAINDER)
    se.set_defaults(fn=_serve_reward)
    _add_bench(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse and dispatch. A bad input (config, missing model, unusable checkpoint) is one
    line on stderr and exit 2, with no traceback."""
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .models.hub import ModelNotAvailableError
    from .rewards.base import RewardError

    try:
        if args.command in ("train", "plan", "encode"):
            _split_config_args(args)
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
    except ModelNotAvailableError as e:
        print(f"model not available: {' '.join(str(e).split())}", file=sys.stderr)
    except RewardError as e:
        print(f"reward error: {e}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())

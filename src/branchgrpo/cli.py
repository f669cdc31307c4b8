"""The ``branchgrpo`` command line: train | sample | eval | serve-reward | bench."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
branchgrpo: online RL for flow-matching generators (BranchGRPO, DanceGRPO, Flow-GRPO,
MixGRPO, G2RPO) with one batched tree-rollout engine.

commands:
  bench nfe       forward evaluations, edges and trained edges per method (measured)
  bench rollout   batched tree engine vs per-node and sequential evaluation (wall time)
"""


def _bench_nfe(args: argparse.Namespace) -> int:
    from .bench import markdown, nfe_table

    rows = nfe_table(args.methods or None)
    print(json.dumps(rows, indent=2) if args.json else markdown(rows))
    return 0


def _bench_rollout(args: argparse.Namespace) -> int:
    import torch

    from .bench import markdown, rollout_timings

    device = torch.device(args.device)
    if args.model == "analytic":
        from .models.analytic import GaussianPolicy

        policy = GaussianPolicy(dim=48).to(device)
        cond = policy.encode([f"prompt {i}" for i in range(args.trees)])
    else:
        from .models.tiny import bench_policy

        policy, cond = bench_policy(args.model, args.trees, device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.storage_dtype]
    t = rollout_timings(policy, cond, trees=args.trees, max_batch=args.max_batch,
                        repeats=args.repeats, storage_dtype=dtype)
    base = {x.name: x.seconds for x in t}
    rows = [{"rollout": x.name, "forwards_per_tree": x.forwards,
             "seconds_per_tree": round(x.seconds, 5),
             "ratio_vs_branch_per_node": round(x.seconds / base["branch_per_node"], 4),
             "ratio_vs_dance_sequential": round(x.seconds / base["dance_sequential"], 4)}
            for x in t]
    print(json.dumps({"device": str(device), "model": args.model, "trees": args.trees,
                      "rows": rows}, indent=2) if args.json else markdown(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="branchgrpo", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="benchmarks of the rollout engine and the methods")
    bsub = bench.add_subparsers(dest="bench", required=True)
    nfe = bsub.add_parser("nfe", help="forwards, edges and trained edges per tree, per method")
    nfe.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    nfe.add_argument("--methods", nargs="*", help="subset of methods (default: all)")
    nfe.set_defaults(fn=_bench_nfe)
    ro = bsub.add_parser("rollout", help="batched engine vs per-node and sequential rollouts")
    ro.add_argument("--model", default="tiny", help="tiny (the embedded default's FLUX "
                    "transformer), analytic, or flux-dev (FLUX.1-dev size, random weights)")
    ro.add_argument("--trees", type=int, default=2, help="prompts (trees) per rollout batch")
    ro.add_argument("--max-batch", type=int, default=256, help="max rows per forward call")
    ro.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    ro.add_argument("--device", default="cpu", help="cpu or cuda")
    ro.add_argument("--storage-dtype", default="fp32", choices=["fp32", "bf16"])
    ro.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    ro.set_defaults(fn=_bench_rollout)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

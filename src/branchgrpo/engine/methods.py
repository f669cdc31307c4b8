"""Method presets: each method is a plan, an advantage rule and an edge selection, plus the
loss settings the papers ship (docs/algorithms.md §10). The trainer's config starts from these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .registry import Registry


@dataclass(frozen=True)
class Method:
    """One method's published defaults (FLUX.1-dev settings unless noted)."""

    plan: str
    plan_kw: dict = field(default_factory=dict)
    advantage: str = "group"
    advantage_kw: dict = field(default_factory=dict)
    selection: str = "all"
    selection_kw: dict = field(default_factory=dict)
    clip_eps: float = 1e-4
    note: str = ""


METHODS: Registry[Method] = Registry("method")

METHODS.register("dance")(Method(
    "dance", selection="timestep_fraction", selection_kw={"fraction": 0.6},
    note="DanceGRPO: shared x_T, split 12 at step 0, Dance-SDE eta 0.3, 60% random steps"))
METHODS.register("dance_full")(Method(
    "dance", plan_kw={"num_steps": 20, "group_size": 16}, selection="timestep_fraction",
    selection_kw={"fraction": 1.0},
    note="DanceGRPO as BranchGRPO's baseline (698 s): T 20, 16 samples, every step but the last"))
METHODS.register("flow_grpo")(Method(
    "flow_grpo", advantage="prompt_global_std", selection="timestep_fraction",
    selection_kw={"fraction": 1.0, "random": False},
    note="Flow-GRPO: 12 independent roots, Flow-SDE a 0.7, steps 0..T-2 in order"))
METHODS.register("mix")(Method(
    "mix", note="MixGRPO: ODE prefix, SDE window of 4 sliding every 25 iterations"))
METHODS.register("mix_flash")(Method(
    "mix_flash", note="MixGRPO-Flash: window of 4, DPM-Solver++ 2M after it (r 0.4)"))
METHODS.register("g2rpo")(Method(
    "g2rpo", advantage="g2rpo",
    note="G2RPO: ODE anchor, one SDE step at k in 0..7, ODE tails at granularities 1,2,3"))
METHODS.register("branch")(Method(
    "branch", advantage="depth", clip_eps=1e-3,
    note="BranchGRPO: splits {0,3,6,9}, K 2, Dance-SDE eta 0.3, depth-wise advantages"))
METHODS.register("branch_width")(Method(
    "branch", advantage="depth", selection="width", selection_kw={"ratio": 0.5}, clip_eps=1e-3,
    note="BranchGRPO-WidPru: chains of the 4 best and 4 worst leaves below the last split"))
METHODS.register("branch_depth")(Method(
    "branch", advantage="depth", selection="depth",
    selection_kw={"depths": (16, 17, 18, 19, 20)}, clip_eps=1e-3,
    note="BranchGRPO-DepPru: child depths 16..20 pruned (138 trained edges per tree)"))
METHODS.register("branch_mix")(Method(
    "branch_mix", advantage="depth", clip_eps=1e-3,
    note="BranchGRPO-Mix: SDE only at steps {0,1,2,3} and the splits"))
METHODS.register("branch_mix_flash")(Method(
    "branch_flash", advantage="depth", clip_eps=1e-3,
    note="flash tree: BranchGRPO-Mix with a compressed DPM-Solver++ tail after step 9 (r 0.4)"))
METHODS.register("branch_sibling")(Method(
    "branch_flash", plan_kw={"split_steps": (0, 2), "branch_factor": 4, "mix_window": 0,
                             "compression": 0.25, "kernel": "flow", "level": 0.7},
    advantage="sibling", clip_eps=1e-3,
    note="sibling tree: K 4 at steps 0 and 2, Flow-SDE only there, ODE between, 3-step "
         "flash tail, sibling-relative advantages"))

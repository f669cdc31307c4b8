"""The rollout plan of every method (docs/algorithms.md §7, §2-6, §10).

Each builder is a registered function of keyword parameters, defaulting to the published
FLUX.1-dev setting, that returns a `RolloutPlan`. Plans that change over training (MixGRPO's
sliding window) take ``iteration``. ``sigmas`` (T + 1 floats) replaces the builder's own
``schedule``/``shift``/``image_seq_len`` grid: `branchgrpo.spec` passes the model's resolved one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

from .registry import Registry
from .schedule import make_sigmas, shift_sigmas
from .tree import Fork, Lane, RolloutPlan, chain_plan

PlanBuilder = Callable[..., RolloutPlan]
PLANS: Registry[PlanBuilder] = Registry("rollout plan")


def _sigmas(num_steps: int, schedule: str, shift: float, image_seq_len: int,
            sigmas: Sequence[float] | None = None) -> torch.Tensor:
    """The grid [T + 1]: ``sigmas`` when given (a schedule resolved by `branchgrpo.spec`),
    else ``make_sigmas(schedule, ...)``."""
    if sigmas is None:
        return make_sigmas(schedule, num_steps, shift, image_seq_len)
    if len(sigmas) != num_steps + 1:
        raise ValueError(f"sigmas must hold num_steps + 1 = {num_steps + 1} values, "
                         f"got {len(sigmas)}")
    return torch.tensor([float(x) for x in sigmas], dtype=torch.float32)


def _check_group(group_size: int) -> None:
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a group advantage, got {group_size}")


@PLANS.register("dance")
def dance(
    num_steps: int = 16, group_size: int = 12, kernel: str = "dance", level: float = 0.3,
    shift: float = 3.0, schedule: str = "shifted", image_seq_len: int = 256,
    sigmas: Sequence[float] | None = None,
    shared_noise: bool = True, iteration: int = 0,
) -> RolloutPlan:
    """DanceGRPO: one shared x_T per tree, split into G at step 0, SDE at every step
    (docs/algorithms.md §2.1). NFE per tree = 1 + G (T - 1) (the root is evaluated once)."""
    _check_group(group_size)
    t = num_steps
    return chain_plan("dance", _sigmas(t, schedule, shift, image_seq_len, sigmas),
                      [group_size] + [1] * (t - 1), ["sde"] * t, kernel=kernel, level=level,
                      shared_noise=shared_noise, info={"group_size": group_size})


@PLANS.register("flow_grpo")
def flow_grpo(
    num_steps: int = 16, group_size: int = 12, kernel: str = "flow", level: float = 0.7,
    shift: float = 3.0, schedule: str = "shifted", image_seq_len: int = 256,
    sigmas: Sequence[float] | None = None,
    shared_noise: bool = False, iteration: int = 0,
) -> RolloutPlan:
    """Flow-GRPO: G independent roots (own x_T each), SDE at every step
    (docs/algorithms.md §3.1). Defaults follow the FLUX comparisons (T = 16, G = 12); the SD3.5
    recipe sets T = 10, G = 24."""
    _check_group(group_size)
    t = num_steps
    return chain_plan("flow_grpo", _sigmas(t, schedule, shift, image_seq_len, sigmas), [1] * t,
                      ["sde"] * t, roots=group_size, kernel=kernel, level=level,
                      shared_noise=shared_noise, info={"group_size": group_size})


def mix_window_start(iteration: int, num_steps: int, iters_per_shift: int, stride: int) -> int:
    """MixGRPO's sliding window start l (docs/algorithms.md §4.1): advances by ``stride`` every
    ``iters_per_shift`` iterations and rolls back to 0 once past T - 2. stride 0 freezes it."""
    if stride == 0:
        return 0
    positions = (num_steps - 2) // stride + 1
    return stride * ((iteration // iters_per_shift) % positions)


def _mix_window(iteration, num_steps, window, iters_per_shift, stride) -> range:
    """W(l) = {l, ..., min(l + w, T - 2) - 1} (docs/algorithms.md §4.1)."""
    lo = mix_window_start(iteration, num_steps, iters_per_shift, stride)
    return range(lo, max(min(lo + window, num_steps - 2), lo + 1))


@PLANS.register("mix")
def mix(
    num_steps: int = 25, group_size: int = 12, kernel: str = "flow", level: float = 0.7,
    window: int = 4, iters_per_shift: int = 25, stride: int = 1, shift: float = 3.0,
    schedule: str = "shifted", image_seq_len: int = 256,
    sigmas: Sequence[float] | None = None, shared_noise: bool = True,
    iteration: int = 0,
) -> RolloutPlan:
    """MixGRPO: Euler ODE before the window, computed once per tree; split into G at the window
    start; Flow-SDE inside the window only; ODE after it (docs/algorithms.md §4.1)."""
    _check_group(group_size)
    t = num_steps
    w = _mix_window(iteration, t, window, iters_per_shift, stride)
    branch = [group_size if i == w.start else 1 for i in range(t)]
    solver = ["sde" if i in w else "ode" for i in range(t)]
    return chain_plan("mix", _sigmas(t, schedule, shift, image_seq_len, sigmas), branch, solver,
                      kernel=kernel, level=level, shared_noise=shared_noise,
                      info={"group_size": group_size, "window": list(w)})


@PLANS.register("mix_flash")
def mix_flash(
    num_steps: int = 25, group_size: int = 12, kernel: str = "flow", level: float = 0.7,
    window: int = 4, iters_per_shift: int = 20, stride: int = 1, compression: float = 0.4,
    shift: float = 3.0, schedule: str = "shifted", image_seq_len: int = 256,
    sigmas: Sequence[float] | None = None,
    shared_noise: bool = True, iteration: int = 0,
) -> RolloutPlan:
    """MixGRPO-Flash: as `mix`, but after the window a DPM-Solver++(2M) ODE on a compressed
    schedule of n_post = int(max((T - e) r, 1)) points from the unshifted time 1 - (e+1)/T to 0
    (docs/algorithms.md §4.1; Flash* is stride 0, compression 0.2, NFE 7 at T = 25). Needs the
    'shifted' schedule, whose unshifted times the compression is defined on."""
    _check_group(group_size)
    t = num_steps
    if schedule != "shifted" or (sigmas is not None and not torch.allclose(
            _sigmas(t, schedule, shift, image_seq_len, sigmas), make_sigmas("shifted", t, shift))):
        raise ValueError("mix_flash compresses the 'shifted' schedule; set schedule: shifted")
    w = _mix_window(iteration, t, window, iters_per_shift, stride)
    e = w[-1]
    n_post = int(max((t - e) * compression, 1))
    base = make_sigmas("shifted", t, shift)[: e + 2]
    u = torch.linspace(1.0 - (e + 1) / t, 0.0, max(n_post, 2), dtype=torch.float64)
    post = shift_sigmas(u, shift).float()[1:]
    sig = torch.cat([base, post])
    steps = len(sig) - 1
    branch = [group_size if i == w.start else 1 for i in range(steps)]
    solver = ["ode" if i < w.start else "sde" if i in w else "dpm2" for i in range(steps)]
    return chain_plan("mix_flash", sig, branch, solver, kernel=kernel, level=level,
                      shared_noise=shared_noise,
                      info={"group_size": group_size, "window": list(w), "n_post": n_post})


@PLANS.register("g2rpo")
def g2rpo(
    num_steps: int = 16, group_size: int = 12, kernel: str = "flow", level: float = 0.7,
    split_steps: Sequence[int] = tuple(range(8)), granularities: Sequence[int] = (1, 2, 3),
    shift: float = 3.0, schedule: str = "shifted", image_seq_len: int = 256,
    sigmas: Sequence[float] | None = None,
    shared_noise: bool = True, iteration: int = 0,
) -> RolloutPlan:
    """G2RPO: an ODE anchor from a shared x_T; at each k in M one SDE step into G children of
    the anchor state; from each child an ODE tail over sigma[k+1], sigma[k+2], then
    sigma[k+2::g] for every granularity g, each tail ending in a rewarded leaf
    (docs/algorithms.md §6.1-6.2).

    Lanes: 0 is the anchor; lane 1 + a * |G| + b is the tail of split M[a] at granularity
    G[b]. The first tail step and the forward at sigma[k+2] are shared by all granularities,
    which the published code recomputes per granularity."""
    _check_group(group_size)
    t = num_steps
    ks, gs = sorted(set(split_steps)), list(dict.fromkeys(granularities))
    if not ks or ks[0] < 0 or ks[-1] > t - 2:
        raise ValueError(f"g2rpo split_steps must lie in [0, {t - 2}] (T - 2), got {ks}")
    if not gs or min(gs) < 1:
        raise ValueError(f"g2rpo granularities must be >= 1, got {gs}")
    lanes: list[Lane] = []
    anchor = []
    for i in range(t):
        forks = [Fork(1, "ode", 0)]
        if i in ks:
            forks.append(Fork(group_size, "sde", 1 + ks.index(i) * len(gs)))
        anchor.append(tuple(forks))
    lanes.append(Lane(tuple(range(t + 1)), tuple(anchor)))
    for a, k in enumerate(ks):
        tracks = [(k + 1, *range(k + 2, t + 1, g)) for g in gs]
        first = 1 + a * len(gs)
        for b, track in enumerate(tracks):
            forks = [(Fork(1, "ode", first + b),) for _ in track[1:]]
            if b == 0:  # the fine tail fans out to the other granularities' lanes: a lane
                # ending at sigma[k+2] takes its leaf from the first step, the rest continue
                # from the node at sigma[k+2] (no forward is repeated)
                for pos in (0, 1)[: len(forks)]:
                    forks[pos] += tuple(Fork(1, "ode", first + j) for j in range(1, len(gs))
                                        if (len(tracks[j]) == 2) == (pos == 0))
            lanes.append(Lane(track, tuple(forks)))
    sig = tuple(float(s) for s in _sigmas(t, schedule, shift, image_seq_len, sigmas))
    return RolloutPlan("g2rpo", sig, tuple(lanes), kernel=kernel, level=level,
                       shared_noise=shared_noise,
                       info={"group_size": group_size, "split_steps": ks, "granularities": gs})


def _check_splits(split_steps: Sequence[int], num_steps: int, branch_factor: int) -> list[int]:
    s = sorted(set(split_steps))
    if not s:
        raise ValueError("branch plan needs at least one split step")
    if s[0] < 0 or s[-1] > num_steps - 1:
        raise ValueError(f"split steps must lie in [0, {num_steps - 1}] (T - 1), got {s}")
    if branch_factor < 1:
        raise ValueError(f"branch_factor must be >= 1, got {branch_factor}")
    return s


@PLANS.register("branch")
def branch(
    num_steps: int = 20, split_steps: Sequence[int] = (0, 3, 6, 9), branch_factor: int = 2,
    split_noise_scale: float = 1.0, kernel: str = "dance", level: float = 0.3,
    shift: float = 3.0, schedule: str = "shifted", image_seq_len: int = 256,
    sigmas: Sequence[float] | None = None,
    shared_noise: bool = True, mix_window: int = 0, mix_stride: int = 30, roots: int = 1,
    iteration: int = 0,
) -> RolloutPlan:
    """BranchGRPO: one shared x_T per tree; at each split step every frontier node gets K
    children (split noise lambda, default 1 so leaf marginals are preserved,
    docs/algorithms.md §13.2).
    ``roots`` > 1 grows a forest per prompt: that many independent x_T, each branching, for
    exploration in what the initial noise decides (layout) at the same prefix sharing.

    ``mix_window`` > 0 gives BranchGRPO-Mix: step i is SDE iff i mod q < w or i is a split
    step (q = ``mix_stride``), else Euler ODE (docs/algorithms.md §5.6)."""
    s = _check_splits(split_steps, num_steps, branch_factor)
    t = num_steps
    branch_ = [branch_factor if i in s else 1 for i in range(t)]
    if mix_window > 0:
        solver = ["sde" if (i % mix_stride < mix_window or i in s) else "ode" for i in range(t)]
    else:
        solver = ["sde"] * t
    lam = [split_noise_scale if i in s else 1.0 for i in range(t)]
    name = "branch_mix" if mix_window > 0 else "branch"
    sig = _sigmas(t, schedule, shift, image_seq_len, sigmas)
    return chain_plan(name, sig, branch_, solver, lam, kernel=kernel, level=level,
                      shared_noise=shared_noise, roots=roots,
                      info={"split_steps": s, "branch_factor": branch_factor,
                            "group_size": roots * branch_factor ** len(s)})


@PLANS.register("branch_mix")
def branch_mix(mix_window: int = 4, mix_stride: int = 30, **kw) -> RolloutPlan:
    """BranchGRPO-Mix with the published window (w = 4, q = 30: SDE at {0,1,2,3} and the
    split steps, 34 trained edges per tree at the default splits)."""
    if mix_window < 1:
        raise ValueError("branch_mix needs mix_window >= 1")
    return branch(mix_window=mix_window, mix_stride=mix_stride, **kw)


def check_high_order(plan: RolloutPlan) -> None:
    """Raise ValueError unless every DPM-Solver++ (2M) step of ``plan`` lies in a
    deterministic tail: after the last stochastic step or split of its lane, and after a
    deterministic single-child step (docs/algorithms.md §15.3). A 2M step extrapolates from
    the previous step's x0 prediction; across an SDE step or a split that prediction belongs
    to the pre-noise state, and inside a window the compressed grid would change the sigma
    pairs of trained edges, so their stored log-probs would not be the ones trained."""
    for li, lane in enumerate(plan.lanes):
        stochastic = [p for p, fs in enumerate(lane.forks)
                      if any(f.solver == "sde" or f.count > 1 for f in fs)]
        last = max(stochastic, default=-1)
        for p, fs in enumerate(lane.forks):
            if not any(f.solver == "dpm2" for f in fs):
                continue
            where = f"plan {plan.name!r} lane {li} at step {lane.track[p]}"
            if p <= last:
                raise ValueError(f"{where}: a DPM-Solver++ step before the last SDE step or "
                                 "split of the lane; keep high-order steps in the ODE tail")
            prev = lane.forks[p - 1] if p > 0 else ()
            if not prev or any(f.solver == "sde" or f.count > 1 for f in prev):
                raise ValueError(f"{where}: a DPM-Solver++ step right after a stochastic step "
                                 "or split would take its history across it; make the first "
                                 "tail step 'ode' (first order)")


@PLANS.register("branch_flash")
def branch_flash(
    num_steps: int = 20, split_steps: Sequence[int] = (0, 3, 6, 9), branch_factor: int = 2,
    split_noise_scale: float = 1.0, kernel: str = "dance", level: float = 0.3,
    mix_window: int = 4, mix_stride: int = 30, compression: float = 0.4, shift: float = 3.0,
    schedule: str = "shifted", image_seq_len: int = 256, sigmas: Sequence[float] | None = None,
    shared_noise: bool = True, roots: int = 1, iteration: int = 0,
) -> RolloutPlan:
    """The flash tree (docs/algorithms.md §15.3): BranchGRPO-Mix up to its last stochastic
    step e (SDE iff i mod q < w or i is a split; ``mix_window`` 0: SDE at the splits only),
    Euler ODE between, then MixGRPO-Flash's compressed tail: n_post = int(max((T - e) r, 1))
    points from sigma[e+1] to 0 (unshifted times spaced linearly, then shifted), the first
    tail step Euler (DPM-Solver++ first order, no history across the SDE step) and the rest
    DPM-Solver++ (2M). Every SDE step keeps its sigma pair of the full grid. Needs the
    'shifted' schedule, like mix_flash."""
    s = _check_splits(split_steps, num_steps, branch_factor)
    t = num_steps
    full = _sigmas(t, schedule, shift, image_seq_len, sigmas)
    if schedule != "shifted" or not torch.allclose(full, make_sigmas("shifted", t, shift)):
        raise ValueError("branch_flash compresses the 'shifted' schedule; set schedule: shifted")
    sde = {i for i in range(t) if i % mix_stride < mix_window} | set(s)
    e = max(sde)
    if e > t - 2:
        raise ValueError(f"branch_flash needs its last SDE step or split <= T - 2 = {t - 2}, "
                         f"got {e}: there is no ODE tail to compress")
    n_post = int(max((t - e) * compression, 1))
    u = torch.linspace(1.0 - (e + 1) / t, 0.0, max(n_post, 2), dtype=torch.float64)
    sig = torch.cat([full[: e + 2], shift_sigmas(u, shift).float()[1:]])
    steps = len(sig) - 1
    solver = [("sde" if i in sde else "ode") if i <= e + 1 else "dpm2" for i in range(steps)]
    solver[e + 1] = "ode"
    plan = chain_plan("branch_flash", sig, [branch_factor if i in s else 1 for i in range(steps)],
                      solver, [split_noise_scale if i in s else 1.0 for i in range(steps)],
                      kernel=kernel, level=level, shared_noise=shared_noise, roots=roots,
                      info={"split_steps": s, "branch_factor": branch_factor, "n_post": n_post,
                            "sde_steps": sorted(sde),
                            "group_size": roots * branch_factor ** len(s)})
    check_high_order(plan)
    return plan


def plan_parameters(plan: str) -> set[str]:
    """The keyword parameters the plan builder ``plan`` accepts (branch_mix forwards the
    rest of branch's)."""
    valid = set(inspect.signature(PLANS.get(plan)).parameters)
    if plan == "branch_mix":
        valid |= set(inspect.signature(branch).parameters)
    return valid


def build_plan(method: str, **params) -> RolloutPlan:
    """The plan of ``method`` with keyword overrides (unknown keys are an error)."""
    fn = PLANS.get(method)
    valid = plan_parameters(method)
    bad = sorted(set(params) - valid)
    if bad:
        raise ValueError(f"plan {method!r} has no parameter(s) {bad}; valid: {sorted(valid)}")
    return fn(**params)

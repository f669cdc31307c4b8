"""Rollout plans, the batched tree-rollout engine, and the flat `Tree` it returns.

Every method is one rollout tree (docs/algorithms.md §7). A `RolloutPlan` holds a sigma grid and
one or more *lanes*; a lane is an increasing sequence of grid indices (its *track*) and, at each
track position but the last, the `Fork`s a node there gets: how many children, by which solver
(SDE kernel, Euler ODE or DPM-Solver++ 2M), into which lane, with which split noise scale
lambda. A node at the last position of its lane is a leaf. Most methods need one lane (the full
schedule); G2RPO's strided ODE tails are extra lanes over the same grid.

The engine walks the grid indices in order and evaluates **every pending node at that index,
of all trees in the batch, in one forward call** (chunked to ``max_batch``), so a shared prefix
is computed once. Noise is drawn per fork for all children at once, so the tree does not depend
on the chunking: ``max_batch=1`` reproduces the published per-node evaluation exactly.

A sampled latent is round-tripped through the storage dtype *before* its log-prob is computed,
and the child continues from the rounded value, so recomputing the log-prob from the stored
tensors gives a ratio of exactly 1 (docs/algorithms.md §1.7, §13.3). With lambda != 1 the stored
log-prob uses the std actually sampled with, lambda * std (docs/algorithms.md §13.2).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from .policy import Cond, Policy, select_cond
from .sde import KERNELS, Reduce, dpm2, ode, transition_log_prob

SOLVERS = ("sde", "ode", "dpm2")


@dataclass(frozen=True)
class Fork:
    """``count`` children of a node, made by ``solver`` into lane ``lane``.

    ``noise_scale`` (lambda) multiplies the SDE std at this fork (BranchGRPO's split noise)."""

    count: int = 1
    solver: str = "sde"
    lane: int = 0
    noise_scale: float = 1.0


@dataclass(frozen=True)
class Lane:
    """``track``: increasing grid indices its nodes visit; ``forks[p]``: the children of a node
    at track position p (one tuple per position but the last)."""

    track: tuple[int, ...]
    forks: tuple[tuple[Fork, ...], ...]


@dataclass(frozen=True)
class RolloutPlan:
    """A method's rollout: sigma grid [P], lanes, roots per tree, SDE kernel and its level.

    ``roots``: root nodes (own initial noise each) per tree: 1 for a shared x_T (DanceGRPO),
    G for Flow-GRPO. ``shared_noise``: every tree of a batch starts from the same root noise
    (DanceGRPO's ``--init_same_noise``). ``info`` keeps method parameters for reports.
    """

    name: str
    sigmas: tuple[float, ...]
    lanes: tuple[Lane, ...]
    roots: int = 1
    kernel: str = "dance"
    level: float = 0.3
    shared_noise: bool = False
    info: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming what to change when the plan is malformed."""
        p = len(self.sigmas)
        if p < 2 or any(a <= b for a, b in zip(self.sigmas, self.sigmas[1:], strict=False)):
            raise ValueError(f"plan {self.name!r}: sigmas must decrease strictly, got {p} values")
        if self.roots < 1:
            raise ValueError(f"plan {self.name!r}: roots must be >= 1, got {self.roots}")
        if self.kernel not in KERNELS:
            raise ValueError(f"plan {self.name!r}: unknown kernel {self.kernel!r}; "
                             f"valid: {KERNELS.names()}")
        if not self.lanes:
            raise ValueError(f"plan {self.name!r} has no lanes")
        for li, lane in enumerate(self.lanes):
            t = lane.track
            if not t or any(a >= b for a, b in zip(t, t[1:], strict=False)):
                raise ValueError(f"plan {self.name!r} lane {li}: track must increase, got {t}")
            if t[0] < 0 or t[-1] >= p:
                raise ValueError(f"plan {self.name!r} lane {li}: track {t} is outside the grid "
                                 f"[0, {p - 1}]")
            if len(lane.forks) != len(t) - 1:
                raise ValueError(f"plan {self.name!r} lane {li}: needs {len(t) - 1} fork tuples")
            for pos, forks in enumerate(lane.forks):
                for f in forks:
                    self._check_fork(li, t[pos], f)

    def _check_fork(self, li: int, grid: int, f: Fork) -> None:
        where = f"plan {self.name!r} lane {li} at step {grid}"
        if f.count < 1:
            raise ValueError(f"{where}: branch factor must be >= 1, got {f.count}")
        if f.solver not in SOLVERS:
            raise ValueError(f"{where}: solver {f.solver!r} not in {SOLVERS}")
        if not 0 <= f.lane < len(self.lanes):
            raise ValueError(f"{where}: fork into missing lane {f.lane}")
        if self.next_grid(f.lane, grid) is None:
            raise ValueError(f"{where}: lane {f.lane} has no grid index after {grid}")
        if f.noise_scale <= 0:
            raise ValueError(f"{where}: noise_scale must be > 0, got {f.noise_scale}")

    def next_grid(self, lane: int, grid: int) -> int | None:
        """The first grid index of ``lane``'s track after ``grid`` (None if there is none)."""
        return next((g for g in self.lanes[lane].track if g > grid), None)

    def size(self) -> tuple[int, int]:
        """(nodes, leaves) of one tree, counted from the lanes without rolling out: a node at
        track position p of its lane makes ``count`` children per fork; the last position of
        a lane is a leaf. Exact for every plan `rollout` accepts."""
        at: dict[tuple[int, int], int] = defaultdict(int)
        at[(0, self.lanes[0].track[0])] = self.roots
        nodes = leaves = 0
        for grid in range(len(self.sigmas)):
            for lane_id, lane in enumerate(self.lanes):
                n = at.pop((lane_id, grid), 0)
                if not n:
                    continue
                nodes += n
                if grid == lane.track[-1]:
                    leaves += n
                    continue
                for f in lane.forks[lane.track.index(grid)]:
                    at[(f.lane, self.next_grid(f.lane, grid))] += n * f.count
        return nodes, leaves

    @property
    def num_steps(self) -> int:
        """T: the steps of the grid (P - 1)."""
        return len(self.sigmas) - 1


def chain_plan(
    name: str,
    sigmas: Tensor | tuple[float, ...],
    branch: list[int],
    solver: list[str],
    noise_scale: list[float] | None = None,
    **kw,
) -> RolloutPlan:
    """A one-lane plan over the full grid: step i forks ``branch[i]`` children by ``solver[i]``
    with split noise ``noise_scale[i]`` (lists of length T)."""
    sig = tuple(float(s) for s in sigmas)
    t = len(sig) - 1
    lam = noise_scale or [1.0] * t
    if not len(branch) == len(solver) == len(lam) == t:
        raise ValueError(f"plan {name!r}: branch/solver/noise_scale need {t} entries (T)")
    forks = tuple((Fork(b, s, 0, lm),) for b, s, lm in zip(branch, solver, lam, strict=True))
    return RolloutPlan(name, sig, (Lane(tuple(range(t + 1)), forks),), **kw)


@dataclass
class Tree:
    """All trees of a rollout batch as flat node tensors; node n's incoming edge is parent[n] -> n.

    Parents precede their children (parent[n] < n). Shapes: N nodes, L leaves, D latent dims.
    ``log_prob``/``sde``/``noise_scale`` describe the edge into a node (0/False/1 for roots and
    deterministic edges). ``leaf_x0`` [L, *D] is the image latent of each leaf (x0_hat predicted
    at the last model call, docs/algorithms.md §1.8), in ``leaf_ids`` order.
    """

    latents: Tensor  # [N, *D] storage dtype
    parent: Tensor  # [N] long, -1 for roots
    grid: Tensor  # [N] long, index into sigmas
    lane: Tensor  # [N] long
    depth: Tensor  # [N] long, edges from the root
    group: Tensor  # [N] long, the tree (prompt) a node belongs to
    log_prob: Tensor  # [N] fp32
    sde: Tensor  # [N] bool
    noise_scale: Tensor  # [N] fp32
    leaf: Tensor  # [N] bool
    leaf_x0: Tensor  # [L, *D] storage dtype
    sigmas: Tensor  # [P] fp32
    forwards: int  # model rows evaluated to build the tree (NFE)
    old_mean: Tensor | None = None  # [N, *D] fp32 rollout mean of each edge (GRPO-Guard)

    @property
    def num_nodes(self) -> int:
        return int(self.parent.numel())

    @property
    def leaf_ids(self) -> Tensor:
        """Node ids of the leaves [L], ascending."""
        return self.leaf.nonzero().squeeze(1)

    @property
    def edge_mask(self) -> Tensor:
        """Nodes that have an incoming edge [N] bool."""
        return self.parent >= 0

    def edges(self, select: Tensor | None = None, adv: Tensor | None = None) -> EdgeBatch:
        """The edges into the nodes where ``select`` [N] is True (default: every SDE edge), with
        per-node advantages ``adv`` [N] (the child's, docs/algorithms.md §5.3) or zeros."""
        mask = self.edge_mask & (self.sde if select is None else select.to(self.parent.device))
        if bool((mask & ~self.sde).any()):
            raise ValueError("selected a deterministic (ODE) edge: it has no density to train")
        child = mask.nonzero().squeeze(1)
        par = self.parent[child]
        dev = self.parent.device
        a = torch.zeros(self.num_nodes, device=dev) if adv is None else adv.float().to(dev)
        return EdgeBatch(
            child=child,
            x=self.latents[par],
            x_next=self.latents[child],
            sigma=self.sigmas[self.grid[par]],
            sigma_next=self.sigmas[self.grid[child]],
            old_log_prob=self.log_prob[child],
            noise_scale=self.noise_scale[child],
            adv=a[child],
            group=self.group[child],
            step=self.grid[par],
            depth=self.depth[child],
            old_mean=None if self.old_mean is None else self.old_mean[child],
        )


@dataclass
class EdgeBatch:
    """Training samples: one stochastic transition x -> x_next each. E edges, D latent dims.

    ``step`` is the parent's grid index i (the transition sigma_i -> sigma_next); ``adv`` the
    child node's advantage; ``group`` the tree; ``child`` the child node id in its `Tree`."""

    child: Tensor  # [E]
    x: Tensor  # [E, *D]
    x_next: Tensor  # [E, *D]
    sigma: Tensor  # [E]
    sigma_next: Tensor  # [E]
    old_log_prob: Tensor  # [E]
    noise_scale: Tensor  # [E]
    adv: Tensor  # [E]
    group: Tensor  # [E]
    step: Tensor  # [E]
    depth: Tensor  # [E]
    old_mean: Tensor | None = None  # [E, *D]

    def __len__(self) -> int:
        return int(self.child.numel())

    def index(self, idx: Tensor) -> EdgeBatch:
        """A sub-batch (minibatch or shuffle) by edge index [e]."""
        return EdgeBatch(**{f.name: (None if getattr(self, f.name) is None
                                     else getattr(self, f.name)[idx]) for f in fields(self)})


def transition(
    kernel: str, level: float, v: Tensor, x: Tensor, sigma: Tensor, sigma_next: Tensor,
    noise_scale: Tensor,
) -> tuple[Tensor, Tensor]:
    """(mean [N, *D], std [N]) of an SDE transition with split noise lambda [N] applied.
    Shared by the rollout and the training recompute, so both compute bit-identical values."""
    mean, std = KERNELS.get(kernel)(v, x, sigma, sigma_next, level)
    return mean, std * noise_scale.float()


@torch.no_grad()
def decode_leaves(policy: Policy, tree: Tree, batch: int) -> Tensor:
    """Media of every leaf [L, ...] in ``leaf_ids`` order: ``policy.decode`` of ``leaf_x0`` in
    chunks of ``batch`` rows, without gradients."""
    return torch.cat([policy.decode(c) for c in tree.leaf_x0.split(batch)])


def velocity_chunked(
    policy: Policy, x: Tensor, sigma: Tensor, cond: Cond, group: Tensor, max_batch: int
) -> Tensor:
    """policy.velocity over rows in chunks of ``max_batch``; x [N, *D] fp32 -> v [N, *D] fp32."""
    out = []
    for s in range(0, x.shape[0], max_batch):
        sl = slice(s, s + max_batch)
        out.append(policy.velocity(x[sl], sigma[sl], select_cond(cond, group[sl])).float())
    return torch.cat(out) if out else x.new_zeros(x.shape)


def edge_log_prob(
    policy: Policy, edges: EdgeBatch, cond: Cond, plan: RolloutPlan, *,
    max_batch: int = 256, reduce: Reduce = "mean", storage_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Recompute log-probs of stored edges under the current policy (with gradients).

    Returns (log_prob [E], mean [E, *D], std [E], v [E, *D]); cond has one row per tree."""
    x = edges.x.to(storage_dtype).float()
    v = velocity_chunked(policy, x, edges.sigma, cond, edges.group, max_batch)
    mean, std = transition(plan.kernel, plan.level, v, x, edges.sigma, edges.sigma_next,
                           edges.noise_scale)
    lp = transition_log_prob(plan.kernel, edges.x_next.float(), mean, std, reduce)
    return lp, mean, std, v


@dataclass
class _Pending:
    """Nodes waiting at one grid index: ids [n], latents x [n, *D] fp32, and the x0_hat and
    sigma of their parent's forward (DPM-Solver++ 2M needs them)."""

    ids: Tensor
    x: Tensor
    prev_x0: Tensor | None
    prev_sigma: Tensor | None


class _Builder:
    """Accumulates node attributes during a rollout; `finish` makes the Tree."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Tensor]] = defaultdict(list)
        self.count = 0
        self.leaf_ids: list[Tensor] = []
        self.leaf_x0: list[Tensor] = []

    def add(self, **cols: Tensor) -> Tensor:
        n = cols["parent"].numel()
        for k, v in cols.items():
            self.cols[k].append(v)
        ids = torch.arange(self.count, self.count + n)
        self.count += n
        return ids

    def finish(self, sigmas: Tensor, forwards: int, keep_mean: bool) -> Tree:
        c = {k: torch.cat(v) for k, v in self.cols.items()}
        leaf = torch.zeros(self.count, dtype=torch.bool)
        lid = torch.cat(self.leaf_ids)
        leaf[lid] = True
        order = lid.argsort()
        return Tree(
            latents=c["latents"], parent=c["parent"], grid=c["grid"], lane=c["lane"],
            depth=c["depth"], group=c["group"], log_prob=c["log_prob"], sde=c["sde"],
            noise_scale=c["noise_scale"], leaf=leaf, leaf_x0=torch.cat(self.leaf_x0)[order],
            sigmas=sigmas, forwards=forwards, old_mean=c["mean"] if keep_mean else None,
        )


@torch.no_grad()
def rollout(
    policy: Policy,
    cond: Cond,
    plan: RolloutPlan,
    *,
    generator: torch.Generator | None = None,
    max_batch: int = 256,
    storage_dtype: torch.dtype = torch.float32,
    reduce: Reduce = "mean",
    keep_mean: bool = False,
    device: torch.device | str | None = None,
    x_start: Tensor | None = None,
) -> Tree:
    """Sample one tree per prompt row of ``cond`` following ``plan``; see the module docstring.

    ``generator`` draws all noise (root and SDE), on ``device`` (default: the cond's device).
    ``keep_mean`` stores each edge's rollout mean (needed by the GRPO-Guard ratio).
    ``x_start`` [num_trees * plan.roots, *D]: the root latents at the plan's first sigma instead
    of drawn noise (continuing from intermediate states, e.g. `branchgrpo.bench.credit`)."""
    # One function, 80+ lines: the walk over grid indices keeps the frontier, the builder and the
    # noise draws in one place, so the order of generator draws (which makes a tree independent
    # of max_batch) is visible at a glance; helpers would scatter that shared state.
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    first = next(iter(cond.values()))
    dev = torch.device(device) if device is not None else first.device
    num_trees = first.shape[0]
    sigmas = torch.tensor(plan.sigmas, dtype=torch.float32, device=dev)
    shape = tuple(policy.latent_shape)
    b = _Builder()
    lane_pos = [{g: p for p, g in enumerate(lane.track)} for lane in plan.lanes]
    last = [lane.track[-1] for lane in plan.lanes]
    last_t = torch.tensor(last, device=dev)

    roots = num_trees * plan.roots
    if x_start is not None:
        if tuple(x_start.shape) != (roots, *shape):
            raise ValueError(f"x_start must have shape {(roots, *shape)} (trees x roots, "
                             f"latent), got {tuple(x_start.shape)}")
        x_t = x_start.to(dev, storage_dtype)
    else:
        draw = plan.roots if plan.shared_noise else roots
        x_t = torch.randn((draw, *shape), generator=generator, device=dev)
        x_t = x_t.repeat(num_trees, *([1] * len(shape))) if plan.shared_noise else x_t
        x_t = x_t.to(storage_dtype)
    start = plan.lanes[0].track[0]
    z = torch.zeros(roots, dtype=torch.long, device=dev)
    ids = b.add(
        latents=x_t, parent=z - 1, grid=z + start, lane=z, depth=z,
        group=torch.arange(num_trees, device=dev).repeat_interleave(plan.roots),
        log_prob=torch.zeros(roots, device=dev), sde=torch.zeros(roots, dtype=torch.bool,
                                                                  device=dev),
        noise_scale=torch.ones(roots, device=dev),
        **({"mean": x_t.float()} if keep_mean else {}),
    )
    pending: dict[int, list[_Pending]] = defaultdict(list)
    pending[start].append(_Pending(ids.to(dev), x_t.float(), None, None))
    forwards = 0
    for grid in range(len(plan.sigmas)):
        if grid not in pending:
            continue
        fr = _merge(pending.pop(grid))
        node_lane = _col_of(b, "lane")[fr.ids.cpu()].to(dev)
        is_leaf = last_t[node_lane] == grid
        if bool(is_leaf.all()):
            continue
        act = (~is_leaf).nonzero().squeeze(1)
        x, ids = fr.x[act], fr.ids[act]
        group = _col_of(b, "group")[ids.cpu()].to(dev)
        sig = sigmas[grid].expand(len(ids))
        v = velocity_chunked(policy, x, sig, cond, group, max_batch)
        forwards += len(ids)
        x0 = x - sig.reshape(-1, *([1] * len(shape))) * v
        prev_x0 = fr.prev_x0[act] if fr.prev_x0 is not None else None
        prev_sig = fr.prev_sigma[act] if fr.prev_sigma is not None else None
        depth = _col_of(b, "depth")[ids.cpu()].to(dev)
        lanes = node_lane[act]
        for ln in sorted(set(lanes.tolist())):
            sel = (lanes == ln).nonzero().squeeze(1)
            forks = plan.lanes[ln].forks[lane_pos[ln][grid]]
            for f in forks:
                _fork(b, plan, f, grid, sigmas, ids[sel], x[sel], v[sel], x0[sel], group[sel],
                      depth[sel], None if prev_x0 is None else prev_x0[sel],
                      None if prev_sig is None else prev_sig[sel], pending, generator,
                      storage_dtype, reduce, keep_mean, last, shape)
    return b.finish(sigmas, forwards, keep_mean)


def _col_of(b: _Builder, name: str) -> Tensor:
    """The concatenated column ``name`` so far (cached between grid indices by re-cat)."""
    parts = b.cols[name]
    if len(parts) > 1:
        parts[:] = [torch.cat(parts)]
    return parts[0].cpu()


def _merge(items: list[_Pending]) -> _Pending:
    ids = torch.cat([p.ids for p in items])
    x = torch.cat([p.x for p in items])
    has_prev = all(p.prev_x0 is not None for p in items)
    px = torch.cat([p.prev_x0 for p in items]) if has_prev else None
    ps = torch.cat([p.prev_sigma for p in items]) if has_prev else None
    return _Pending(ids, x, px, ps)


def _fork(b, plan, f, grid, sigmas, ids, x, v, x0, group, depth, prev_x0, prev_sig, pending,
          generator, storage_dtype, reduce, keep_mean, last, shape) -> None:
    """Make ``f.count`` children for each of the n nodes ``ids`` (node-major order)."""
    n, k = len(ids), f.count
    dev = x.device
    nxt = plan.next_grid(f.lane, grid)
    sig = sigmas[grid].expand(n)
    sig_n = sigmas[nxt].expand(n)
    lam = torch.full((n * k,), float(f.noise_scale), device=dev)
    rep = lambda t: t.repeat_interleave(k, dim=0)  # noqa: E731
    if f.solver == "sde":
        mean, std = transition(plan.kernel, plan.level, v, x, sig, sig_n, lam[:n])
        mean, std = rep(mean), rep(std)
        noise = torch.randn((n * k, *shape), generator=generator, device=dev)
        x_next = mean + std.reshape(-1, *([1] * len(shape))) * noise
    elif f.solver == "ode":
        mean = rep(ode(v, x, sig, sig_n)[0])
        x_next = mean
    else:
        mean = rep(dpm2(v, x, sig, sig_n, prev_x0, prev_sig))
        x_next = mean
    stored = x_next.to(storage_dtype)
    x_next = stored.float()
    if f.solver == "sde":
        lp = transition_log_prob(plan.kernel, x_next, mean, std, reduce)
    else:
        lp = torch.zeros(n * k, device=dev)
    ones = torch.ones(n * k, dtype=torch.long, device=dev)
    child = b.add(
        latents=stored, parent=rep(ids), grid=ones * nxt, lane=ones * f.lane,
        depth=rep(depth) + 1, group=rep(group), log_prob=lp,
        sde=torch.full((n * k,), f.solver == "sde", device=dev), noise_scale=lam,
        **({"mean": mean} if keep_mean else {}),
    ).to(dev)
    if nxt == last[f.lane]:
        b.leaf_ids.append(child.cpu())
        b.leaf_x0.append(rep(x0).to(storage_dtype))
    pending[nxt].append(_Pending(child, x_next, rep(x0), rep(sig)))

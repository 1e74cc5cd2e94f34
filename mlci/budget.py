"""Pure: how a model's tuning budget is spread over its kernels.

MetaSchedule's gradient scheduler starves the last tasks of a large model when
the budget is small: it first gives every task a round of trials, and the last
tasks of a large model never get theirs. mlci gives every kernel a floor
first, so each one leaves naive loops behind, then hands the rest out in
proportion to each kernel's share of the estimated cost (FLOPs x how often it
is called), because that is where latency is won.
"""

from __future__ import annotations

from dataclasses import dataclass


def allocate_trials(costs: list[float], total: int, per_round: int) -> list[int]:
    """Trials per kernel, summing to `total` (when there are enough kernels to take them).

    Every kernel gets ``min(per_round, total // (2 n))`` (at least 1) first, so half
    the budget or more follows cost; with fewer trials than
    kernels the costliest kernels get one each. The remainder follows cost shares
    (largest-remainder rounding, ties to the earlier kernel), so the result is
    deterministic for the same inputs.
    """
    n = len(costs)
    if n == 0 or total <= 0:
        return [0] * n
    order = sorted(range(n), key=lambda i: (-costs[i], i))
    if total < n:
        alloc = [0] * n
        for i in order[:total]:
            alloc[i] = 1
        return alloc
    floor = max(1, min(per_round, total // (2 * n)))
    alloc = [floor] * n
    rest = total - floor * n
    weights = [max(c, 0.0) for c in costs]
    weight_sum = sum(weights)
    if rest <= 0:
        return alloc
    if weight_sum <= 0:
        weights = [1.0] * n
        weight_sum = float(n)
    shares = [rest * w / weight_sum for w in weights]
    whole = [int(s) for s in shares]
    left = rest - sum(whole)
    by_fraction = sorted(range(n), key=lambda i: (-(shares[i] - whole[i]), order.index(i)))
    for i in by_fraction[:left]:
        whole[i] += 1
    return [a + w for a, w in zip(alloc, whole)]


def trials_to_search(allocated: list[int], done: list[int]) -> list[int]:
    """What is still owed to each kernel, given trials already spent on it (the cache)."""
    return [max(0, a - d) for a, d in zip(allocated, done)]


MIN_PRICED_COST = 1e4
"""Below this estimated work (FLOPs x calls) a kernel moves data rather than computes."""


@dataclass(frozen=True)
class KernelState:
    """What the cache knows about one kernel, for deciding where the next trials go."""

    cost: float
    """Estimated work per inference (FLOPs x calls): the prior when nothing was measured yet."""
    trials: int
    """Trials it has had so far (over every run)."""
    seconds: float | None = None
    """Its best measured time per inference (best record x calls), or None when it has none."""


def remaining_gain(kernel: KernelState, per_round: int, seconds_per_cost: float) -> float:
    """Estimated time a round of search could still win on this kernel.

    The time at stake is its best measured time, or for a kernel never measured its cost priced
    at the model's going rate (`seconds_per_cost`); what a round can still win of it shrinks as
    trials accumulate (search returns diminish roughly as 1 / trials)."""
    at_stake = kernel.seconds if kernel.seconds is not None else kernel.cost * seconds_per_cost
    return at_stake * per_round / (per_round + kernel.trials)


def progressive_trials(kernels: list[KernelState], total: int, per_round: int) -> list[int]:
    """New trials per kernel for one run of progressive tuning, summing to `total`.

    Rounds of `per_round` trials go one at a time to the kernel whose estimated remaining gain is
    largest, its gain re-estimated after each. Kernels never measured come first in practice (their
    time is priced as if naive, and they have no trials); then the costliest and least-searched.
    Deterministic for the same inputs (ties go to the earlier kernel)."""
    n = len(kernels)
    if n == 0 or total <= 0:
        return [0] * n
    measured = [(k.seconds, k.cost) for k in kernels if k.seconds is not None and k.cost >= MIN_PRICED_COST]
    # Price an unmeasured kernel's work at the slowest rate measured on real compute (data-movement
    # kernels estimate ~no work, so their rate means nothing), or 1 s per GFLOP.
    seconds_per_cost = max((s / c for s, c in measured), default=1e-9)
    alloc = [0] * n
    left = total
    while left > 0:
        gains = [
            remaining_gain(KernelState(k.cost, k.trials + a, k.seconds), per_round, seconds_per_cost)
            for k, a in zip(kernels, alloc)
        ]
        best = max(range(n), key=lambda i: (gains[i], -i))
        step = min(per_round, left)
        alloc[best] += step
        left -= step
    return alloc


@dataclass(frozen=True)
class ShardKernel:
    """One kernel of a run, as sharded tuning sees it."""

    key: str
    """The kernel key: a kernel two models share is one kernel, searched once."""
    trials: int
    """Trials the unsharded plan gives it (`allocate_trials` over its model's kernels): what it costs."""
    tie: str = ""
    """Orders kernels of equal cost, the same in every process (e.g. the key itself)."""


def assign_shards(kernels: list[ShardKernel], shards: int) -> dict[str, int]:
    """Kernel key -> shard (1..`shards`), each kernel in exactly one shard, shards balanced by trials.

    Greedy longest-first: the costliest kernel goes to the least-loaded shard (by trials, then by
    kernel count, then the lower shard), and so on down. A key listed more than once (a kernel of
    two models) counts once, at its largest plan: the unsharded run searches it up to that. The
    result depends only on the set of (key, trials, tie), never on the order given, so every shard
    of a run computes the same assignment on its own."""
    if shards < 1:
        raise ValueError(f"shards must be 1 or more, not {shards}")
    cost: dict[str, tuple[int, str]] = {}
    for kernel in kernels:
        trials = max(0, kernel.trials)
        known = cost.get(kernel.key)
        cost[kernel.key] = max(known, (trials, kernel.tie)) if known else (trials, kernel.tie)
    loads = [(0, 0)] * shards
    assignment: dict[str, int] = {}
    for key in sorted(cost, key=lambda k: (-cost[k][0], cost[k][1], k)):
        shard = min(range(shards), key=lambda s: (loads[s], s))
        assignment[key] = shard + 1
        trials, count = loads[shard]
        loads[shard] = (trials + cost[key][0], count + 1)
    return assignment

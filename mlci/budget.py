"""Pure: how a model's tuning budget is spread over its kernels.

MetaSchedule's gradient scheduler starves the last tasks of a large model when
the budget is small: it first gives every task a round of trials, and the last
tasks of a large model never get theirs. mlci gives every kernel a floor
first, so each one leaves naive loops behind, then hands the rest out in
proportion to each kernel's share of the estimated cost (FLOPs x how often it
is called), because that is where latency is won.
"""

from __future__ import annotations


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

"""Splitting whole units (layers, samples) over unequal workers so the slowest finishes first.

Water-filling: hand out one unit at a time to the worker that would finish it soonest. For
identical units this minimises the largest `(fixed + units) / speed`, the time a step waits
for its slowest worker, and it respects each worker's cap (what fits in its memory).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def split_by_speed(
    units: int,
    speeds: Sequence[float],
    caps: Sequence[int | None] | None = None,
    fixed: Sequence[float] | None = None,
    minimum: int = 1,
) -> tuple[int, ...] | None:
    """`units` split over workers of `speeds` (units per second) with at least `minimum` each.

    `fixed` is work each worker has anyway, in units (the embedding on the first pipeline
    stage, say). Returns None when the caps cannot hold `units`.
    """
    count = len(speeds)
    caps = list(caps) if caps is not None else [None] * count
    fixed = list(fixed) if fixed is not None else [0.0] * count
    if units < minimum * count or any(cap is not None and cap < minimum for cap in caps):
        return None
    shares = [minimum] * count
    heap = [((fixed[i] + shares[i] + 1) / speeds[i], i) for i in range(count)]
    heapq.heapify(heap)
    for _ in range(units - minimum * count):
        while heap:
            _, i = heapq.heappop(heap)
            if caps[i] is None or shares[i] < caps[i]:
                break
        else:
            return None
        shares[i] += 1
        heapq.heappush(heap, ((fixed[i] + shares[i] + 1) / speeds[i], i))
    return tuple(shares)


def split_evenly(items: int, parts: int) -> tuple[int, ...]:
    """`items` as `parts` counts differing by at most one, larger counts first."""
    base, extra = divmod(items, parts)
    return tuple(base + (1 if part < extra else 0) for part in range(parts))

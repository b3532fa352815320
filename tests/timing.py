"""Guards against pathological slowness (a cubic regex, an unbounded scan), not speed targets.

A guard takes the fastest of a few runs, so a busy CI box's scheduling hiccups do not fail it, and
its bound sits far above the healthy time and far below the pathological one. Speed targets live
in the benchmarks (`flywheel bench`).
"""

import time
from collections.abc import Callable


def fastest_run_s(work: Callable[[], object], runs: int = 3) -> float:
    """The shortest wall time of `runs` calls of `work`, in seconds."""
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best

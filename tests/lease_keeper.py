"""A loop keeper reduced to its lease and its alias moves, for the fencing proof (tests/test_lease.py).

    python -m tests.lease_keeper URI TASK NAME LOG LEASE_S [S3_ENDPOINT]

Like the real keeper, it renews the lease every third of LEASE_S and, while it leads, moves the champion
continuously under the epoch it holds (the canary controller's moves). One JSON line per attempt goes to LOG:
{"name", "epoch", "n", "outcome": "moved" | "refused" | "failed" | "standby"}; a refused move makes it stand by, and so
does a renewal that finds a newer claim. SIGTERM
stops it between moves, so every move it made is in LOG.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time

from flywheel.lease import StoreLease
from flywheel.registry import FencedError, Registry


def main(uri: str, task: str, name: str, log_path: str, lease_s: float, endpoint: str | None) -> None:
    # short timeouts and few retries: a request cut by SIGSTOP that the server never answers fails within
    # seconds on SIGCONT instead of waiting out botocore's and s3fs's retries (minutes)
    s3 = {"endpoint_url": endpoint,
          "config_kwargs": {"connect_timeout": 3, "read_timeout": 3, "retries": {"max_attempts": 2}}}
    registry = Registry(uri, task, storage_options=s3 if endpoint else None)
    registry.fs.retries = 2
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    lease = StoreLease(registry, name, lease_s)
    versions = [m.version for m in registry.versions()]
    epoch, renewed, n = lease.claim(), time.monotonic(), 0
    with open(log_path, "a", buffering=1) as log:
        while not stopping:
            if (held := epoch) is not None:
                n += 1
                try:
                    registry.fenced(held).promote(versions[n % len(versions)], actor=name, reason=f"{name}#{n}")
                    outcome = "moved"
                except FencedError:
                    outcome, epoch = "refused", None  # the loop was taken over: stand by
                except Exception:  # a request cut short by the pause (may have landed): try again
                    outcome = "failed"
                log.write(json.dumps({"name": name, "epoch": held, "n": n, "outcome": outcome}) + "\n")
            if epoch is None or time.monotonic() - renewed > lease_s / 3:
                with contextlib.suppress(Exception):  # the store did not answer: the lease runs out by itself
                    led, (epoch, renewed) = epoch, (lease.claim(), time.monotonic())
                    if led is not None and epoch is None:  # it saw the newer claim before any refused move
                        log.write(json.dumps({"name": name, "epoch": led, "n": n, "outcome": "standby"}) + "\n")
            time.sleep(0.05)


if __name__ == "__main__":
    main(*sys.argv[1:5], float(sys.argv[5]), sys.argv[6] if len(sys.argv) > 6 else None)

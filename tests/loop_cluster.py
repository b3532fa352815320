"""A Ray cluster of its own that runs the loop's keeper and nothing else, for the two-clusters proof
(tests/test_lease.py).

    python -m tests.loop_cluster CONFIG TEMP_DIR STATUS

Starts a local Ray cluster under TEMP_DIR (its own GCS, raylet and Serve controller; no dashboard, no HTTP
proxy), runs an app of the real LoopKeeper deployment alone under CONFIG's settings (app `serving.app_name`),
and every half second appends one JSON line to STATUS: {"at", "pid": the keeper replica's process,
"status": LoopKeeper.status(), or null while it does not answer}. SIGTERM stops the cluster, keeper and all
(the lease it may hold runs out by itself).
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from pathlib import Path

import psutil
import ray
from ray import serve

from flywheel.config import load_settings
from services.loop import LoopKeeper


def keeper_pid() -> int:
    """The keeper's replica: a worker of this cluster's raylet (a child of this driver), titled
    `ray::ServeReplica:<app>:LoopKeeper`."""
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            title = " ".join(process.cmdline())  # `.method` appended while it runs one
            if title.startswith("ray::ServeReplica:") and ":LoopKeeper" in title:
                return process.pid
    raise RuntimeError("no LoopKeeper replica among this cluster's processes")


def main(config: Path, temp_dir: str, status_path: Path) -> None:
    settings = load_settings(config)
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    # address="local": a new cluster, never one this box already runs; the keeper asks for no CPU
    ray.init(address="local", _temp_dir=temp_dir, include_dashboard=False, num_cpus=1,
             object_store_memory=80 * 1024 * 1024, namespace="flywheel", log_to_driver=True)
    try:
        serve.start(proxy_location="Disabled")  # the keeper has no route: no HTTP port to share with the other
        keeper = serve.run(LoopKeeper.bind(settings.shareable()), name=settings.serving.app_name, route_prefix=None)
        pid = keeper_pid()
        with status_path.open("a", buffering=1) as out:
            while not stopping:
                try:
                    status = keeper.status.remote().result(timeout_s=2)
                except Exception:  # paused (SIGSTOP) or busy: no answer this time
                    status = None
                out.write(json.dumps({"at": time.time(), "pid": pid, "status": status}) + "\n")
                time.sleep(0.5)
    finally:
        ray.shutdown()  # this driver started the cluster: its processes go with it


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))

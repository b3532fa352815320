"""`flywheel bench console`: what an open console costs serving, measured in one run on one machine.

An admin logged in to /console with its pages open, each reloaded every `poll_s` (as a browser does with the
runs page's refresh while a retrain runs), beside one client asking /predict one request at a time. Blocks of
requests with the console polling and without it alternate, so the box's drift moves both alike:
/predict p50 with the console ÷ without (goal <= 1.02), and the pages' own p50.
"""

from __future__ import annotations

import re
import statistics
import threading
import time
import uuid
from collections.abc import Callable

import httpx
from pydantic import BaseModel

from flywheel.auth import KeyStore
from flywheel.config import Settings
from loadtests.bench_serve import PROMPT
from training.demo_bootstrap import bootstrap

BLOCK = 20  # requests per block; the console polls during every other block
LOGIN_TOKEN = re.compile(r'name="login_token" value="([^"]+)"')


class ConsoleBenchReport(BaseModel):
    requests_each: int
    poll_s: float
    quiet_p50_ms: float
    polled_p50_ms: float
    polled_over_quiet_p50: float
    pages_loaded: int
    page_p50_ms: dict[str, float]


def _logged_in(url: str, key: str) -> httpx.Client:
    """A client holding a console session, as a browser would after the login form."""
    client = httpx.Client(base_url=url, timeout=60, headers={"origin": url})
    token = LOGIN_TOKEN.search(client.get("/console/login").text)
    if token is None:
        raise RuntimeError("the console's login form has no login token")
    answered = client.post("/console/login", data={"key": key, "login_token": token.group(1)})
    if answered.status_code != 303:
        raise RuntimeError(f"console login answered {answered.status_code}")
    return client


def _poll(console: httpx.Client, pages: list[str], polling: threading.Event, stop: threading.Event, poll_s: float,
          timings: dict[str, list[float]]) -> None:
    while not stop.is_set():
        if not polling.wait(0.05):
            continue
        for page in pages:  # each open page reloads once per poll_s
            started = time.perf_counter()
            console.get(page).raise_for_status()
            timings[page].append((time.perf_counter() - started) * 1000)
        stop.wait(poll_s)


def run_console_bench(settings: Settings, *, requests: int = 200, poll_s: float = 1.0,
                      say: Callable[[str], None] = print) -> ConsoleBenchReport:
    from services import app as serve_app

    say("bootstrapping (if needed)")
    bootstrap(settings, progress=say)
    _, key = KeyStore(settings.registry_uri).create(f"bench-console-{uuid.uuid4().hex[:6]}", ["admin"])
    url = serve_app.run(settings)
    pages = ["/console", f"/console/tasks/{settings.default_task}", "/console/loop", "/console/review"]
    timings: dict[str, list[float]] = {page: [] for page in pages}
    predict: dict[bool, list[float]] = {True: [], False: []}
    polling, stop = threading.Event(), threading.Event()
    try:
        console = _logged_in(url, key)
        poller = threading.Thread(target=_poll, args=(console, pages, polling, stop, poll_s, timings), daemon=True)
        poller.start()
        say(f"{requests} /predict requests with the console polling every {poll_s:g} s, and as many without, "
            f"in blocks of {BLOCK}")
        with httpx.Client(timeout=60) as client:
            for _ in range(5):  # warm up
                client.post(f"{url}/predict", json={"prompt": PROMPT, "max_tokens": 16}).raise_for_status()
            for block in range(2 * -(-requests // BLOCK)):
                polled = block % 2 == 1
                if polled:
                    polling.set()
                else:
                    polling.clear()
                for _ in range(BLOCK):
                    started = time.perf_counter()
                    client.post(f"{url}/predict", json={"prompt": PROMPT, "max_tokens": 16}).raise_for_status()
                    predict[polled].append((time.perf_counter() - started) * 1000)
        stop.set()
        poller.join(timeout=60)
        console.close()
    finally:
        stop.set()
        serve_app.shutdown()
    quiet, polled = statistics.median(predict[False]), statistics.median(predict[True])
    return ConsoleBenchReport(
        requests_each=len(predict[False]), poll_s=poll_s, quiet_p50_ms=quiet, polled_p50_ms=polled,
        polled_over_quiet_p50=polled / quiet, pages_loaded=sum(len(t) for t in timings.values()),
        page_p50_ms={page: statistics.median(t) for page, t in timings.items() if t})

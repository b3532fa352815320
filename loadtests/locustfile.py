"""Simulated users and raters for flywheel, under drifting traffic.

    FLYWHEEL_SCENARIO=mixed locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 60s --host URL \
        --csv OUT/locust --html OUT/locust.html

Environment:
    FLYWHEEL_SCENARIO        predict (predict only) | mixed (predict, then rate; default) | swap (predict only,
                             while something else moves the alias) | hostile (mixed, plus FLYWHEEL_HOSTILE_USERS
                             users that send what a hostile-but-valid client sends: prompts of each adversarial
                             shape at the prompt limit, a chunked body of 100 MB, ratings for request ids that
                             never existed)
    FLYWHEEL_HOSTILE_USERS   hostile: how many of the -u users are hostile (default 1)
    FLYWHEEL_MAX_PROMPT_CHARS hostile: the gateway's prompt limit (default 4000)
    FLYWHEEL_MAX_CORRECTION_CHARS hostile: the gateway's correction limit (default 4000)
    FLYWHEEL_CORRECTION_P    mixed: chance a rater sends the ground truth as a correction (default 0.8)
    FLYWHEEL_DRIFT_START/END share of drifted prompts at the start / after the ramp (default 0.2 / 0.8)
    FLYWHEEL_DRIFT_RAMP_S    seconds the share takes to go from START to END (default 120)
    FLYWHEEL_SEED            seeds the prompt pools and every user's choices (default 0)
    FLYWHEEL_MAX_TOKENS      max_tokens of each /predict (default 48)
    FLYWHEEL_DEMO_LOG        if set, one JSON line per request is appended to this file
    FLYWHEEL_API_KEYS        comma-separated API keys, one per Locust user (taken in turn): each a backend that
                             vouches for the people it speaks for (`act-for-users`); none: anonymous (open mode)

Ground truth stays with the rater (this process): the model only ever sees it as a correction.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from typing import IO, Any

from locust import HttpUser, between, events, task
from locust.env import Environment

from loadtests.hostile import ADVERSARIAL_UNITS, repeated
from training.demo_task import DemoExample, generate_examples, is_correct

SCENARIO = os.environ.get("FLYWHEEL_SCENARIO", "mixed")
CORRECTION_P = float(os.environ.get("FLYWHEEL_CORRECTION_P", "0.8"))
DRIFT_START = float(os.environ.get("FLYWHEEL_DRIFT_START", "0.2"))
DRIFT_END = float(os.environ.get("FLYWHEEL_DRIFT_END", "0.8"))
DRIFT_RAMP_S = float(os.environ.get("FLYWHEEL_DRIFT_RAMP_S", "120"))
SEED = int(os.environ.get("FLYWHEEL_SEED", "0"))
MAX_TOKENS = int(os.environ.get("FLYWHEEL_MAX_TOKENS", "48"))
MAX_PROMPT_CHARS = int(os.environ.get("FLYWHEEL_MAX_PROMPT_CHARS", "4000"))
MAX_CORRECTION_CHARS = int(os.environ.get("FLYWHEEL_MAX_CORRECTION_CHARS", "4000"))
HOSTILE_USERS = int(os.environ.get("FLYWHEEL_HOSTILE_USERS", "1"))
STREAMED_BODY_BYTES = 100 * 2**20
API_KEYS = [key for key in os.environ.get("FLYWHEEL_API_KEYS", "").split(",") if key]
if SCENARIO not in ("predict", "mixed", "swap", "hostile"):
    raise SystemExit(f"FLYWHEEL_SCENARIO must be predict, mixed, swap or hostile, not {SCENARIO!r}")

POOL_SIZE = 3000  # distinct prompts per distribution: the retrain keeps one target per prompt
POOLS = {
    "original": generate_examples(POOL_SIZE, seed=SEED + 1, distribution="original"),
    "drifted": generate_examples(POOL_SIZE, seed=SEED + 2, distribution="drifted"),
}
_user_numbers = itertools.count()
_started = time.time()
_log: IO[str] | None = None


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    global _started, _log
    _started = time.time()
    path = os.environ.get("FLYWHEEL_DEMO_LOG")
    _log = open(path, "a", buffering=1, encoding="utf-8") if path else None  # noqa: SIM115 - closed at test_stop


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    if _log is not None:
        _log.close()


def drift_share(elapsed_s: float) -> float:
    """Share of drifted prompts `elapsed_s` into the run: a linear ramp from DRIFT_START to DRIFT_END."""
    progress = min(1.0, max(0.0, elapsed_s / DRIFT_RAMP_S)) if DRIFT_RAMP_S > 0 else 1.0
    return DRIFT_START + (DRIFT_END - DRIFT_START) * progress


def rating_for(correct: bool, rng: random.Random) -> int:
    """A rater's 1-5 score: 4-5 for a right answer, 1-2 for a wrong one."""
    return rng.choice((4, 5)) if correct else rng.choice((1, 2))


def _record(**fields: Any) -> None:
    if _log is not None:
        _log.write(json.dumps({"t": time.time(), **fields}, ensure_ascii=False) + "\n")


class Rater(HttpUser):
    """Asks a prompt from the (drifting) traffic and, in the mixed scenario, rates the answer."""

    wait_time = between(0.2, 0.6)

    def on_start(self) -> None:
        number = next(_user_numbers)
        self.rng = random.Random(f"{SEED}:{number}")
        if API_KEYS:
            self.client.headers["Authorization"] = f"Bearer {API_KEYS[number % len(API_KEYS)]}"

    def _pick(self) -> DemoExample:
        distribution = "drifted" if self.rng.random() < drift_share(time.time() - _started) else "original"
        return self.rng.choice(POOLS[distribution])

    @task
    def ask(self) -> None:
        example = self._pick()
        # each Locust user speaks for many people: a canary's share is drawn per person, and each person rates
        # what they asked (with a key that vouches for users, each person is a rater of their own)
        person = f"person-{self.rng.randrange(500)}"
        body = {"prompt": example.prompt, "max_tokens": MAX_TOKENS, "user": person}
        started = time.perf_counter()
        with self.client.post("/predict", json=body, name="/predict", catch_response=True) as response:
            latency_ms = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                _record(kind="predict", status=response.status_code, adapter_version=None,
                        distribution=example.distribution, correct=False, rating=None, latency_ms=latency_ms)
                return
            answer = response.json()
            correct = is_correct(answer["answer"], example)
            rating = rating_for(correct, self.rng) if SCENARIO in ("mixed", "hostile") else None
            _record(kind="predict", status=200, adapter_version=answer["adapter_version"],
                    distribution=example.distribution, correct=correct, rating=rating, latency_ms=latency_ms)
        if rating is not None:
            self._rate(example, answer, correct, rating, person)

    def _rate(self, example: DemoExample, answer: dict[str, Any], correct: bool, rating: int, person: str) -> None:
        correction = None
        if self.rng.random() < CORRECTION_P:
            correction = f"<think>\n{example.reasoning}\n</think>\n\n{example.answer}"
        body = {"request_id": answer["request_id"], "rating": rating, "thumb": "up" if correct else "down",
                "event_id": f"demo-{answer['request_id']}", "user_id": person}
        if correction is not None:  # an optional field is left out, never sent as null
            body["correction"] = correction
        started = time.perf_counter()
        with self.client.post("/feedback", json=body, name="/feedback", catch_response=True) as response:
            latency_ms = (time.perf_counter() - started) * 1000
            if response.status_code != 202:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            _record(kind="feedback", status=response.status_code, adapter_version=answer["adapter_version"],
                    distribution=example.distribution, correct=correct, rating=rating, latency_ms=latency_ms)


class Hostile(HttpUser):
    """Sends, in turn, what a hostile-but-valid client may send. Any 4xx is fine; a 5xx is a failure."""

    abstract = SCENARIO != "hostile"
    fixed_count = HOSTILE_USERS
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        self.rng = random.Random(f"{SEED}:hostile:{next(_user_numbers)}")
        if API_KEYS:
            self.client.headers["Authorization"] = f"Bearer {API_KEYS[0]}"

    @task(len(ADVERSARIAL_UNITS))
    def adversarial_prompt(self) -> None:
        """A prompt of one adversarial shape at the limit: the shapes that made PII masking quadratic."""
        unit = self.rng.choice(ADVERSARIAL_UNITS)
        self._send("prompt", json={"prompt": repeated(unit, MAX_PROMPT_CHARS), "max_tokens": 4})

    @task(2)
    def endless_body(self) -> None:
        """100 MB streamed with no Content-Length: a server that buffers before its cap holds all of it."""
        progress = {"bytes_sent": 0}

        def chunks() -> Any:
            yield b'{"prompt": "'
            while progress["bytes_sent"] < STREAMED_BODY_BYTES:
                progress["bytes_sent"] += 2**20
                yield b"a" * 2**20
            yield b'"}'

        self._send("chunked", data=chunks(), headers={"Content-Type": "application/json"}, logged=progress)

    @task(len(ADVERSARIAL_UNITS))
    def rate_a_request_that_never_was(self) -> None:
        """Feedback no prediction will ever match, with a correction of one adversarial shape at the limit:
        accepted (202) and masked on the way in, whatever the base's context."""
        body = {"request_id": f"{self.rng.getrandbits(128):032x}", "rating": 1,
                "correction": repeated(self.rng.choice(ADVERSARIAL_UNITS), MAX_CORRECTION_CHARS)}
        self._send("orphan_feedback", route="/feedback", json=body)

    def _send(self, shape: str, *, route: str = "/predict", logged: dict[str, Any] | None = None,
              **request: Any) -> None:
        started = time.perf_counter()
        with self.client.post(route, name=f"{route} (hostile {shape})", catch_response=True, **request) as response:
            # a server that refuses a streamed body may close the connection before the client has sent it all
            refused_midway = response.status_code == 0 and shape == "chunked"
            if response.status_code >= 500:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif response.status_code == 0 and not refused_midway:
                response.failure(f"no answer: {response.error}")
            else:
                response.success()
        _record(kind=f"hostile_{shape}", status=response.status_code, adapter_version=None, distribution="hostile",
                correct=False, rating=None, latency_ms=(time.perf_counter() - started) * 1000, **(logged or {}))

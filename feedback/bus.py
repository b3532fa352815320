"""The feedback bus: how /predict and /feedback hand events to the feedback plane.

`publish` never waits on a broker and never raises: it appends the event to a durable file (a few
microseconds, no fsync in the caller's path) and returns whether that worked. Two implementations:

- `KafkaBus`: the file is a spool (an outbox); a forwarder thread sends its records to Kafka in order
  (acks=all, retries, gzip) and marks them delivered once acknowledged. It hands the producer at most
  `producer_buffer_bytes` at a time (kafka-python 3 has no `buffer_memory`), so memory stays bounded. A slow or dead
  broker only makes the spool longer; it drains in order when the broker returns, and a spool left by
  an earlier process is drained by the next one. Delivery is at least once: the curator dedupes.
- `LocalLogBus`: no broker configured (the embedded default). The file is the log itself, one per
  topic, shared safely by several publishing processes; the curator reads it by byte position.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Protocol

from kafka import KafkaProducer
from kafka.errors import KafkaError

from feedback.local_log import LogRecord, PeriodicSync, RecordLog
from feedback.schemas import FeedbackEvent, PredictionEvent, decode_event, encode_event
from feedback.spool import Spool
from flywheel.config import FeedbackSettings, Settings

log = logging.getLogger("flywheel.feedback.bus")

LINGER_S = 0.005


class EventBus(Protocol):
    def publish(self, event: PredictionEvent | FeedbackEvent) -> bool:
        """Hand over one event in microseconds. False only if it could not be stored locally."""
        ...

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything published so far is delivered and on disk; False on timeout."""
        ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def topic_for(event_type: str, settings: FeedbackSettings) -> str:
    return settings.predictions_topic if event_type == "prediction" else settings.feedback_topic


def parse_api_version(value: str | None) -> tuple[int, ...] | None:
    """`"0.9"` -> (0, 9); None -> None (kafka-python asks the broker)."""
    if value is None:
        return None
    try:
        return tuple(int(part) for part in value.split("."))
    except ValueError:
        raise ValueError(f"feedback.kafka_api_version must look like `2.8` or `0.9`, not {value!r}") from None


def kafka_client_config(settings: FeedbackSettings) -> dict[str, Any]:
    """Connection settings shared by the producer and the curator's consumer."""
    if not settings.kafka_bootstrap:
        raise ValueError("feedback.kafka_bootstrap is not set")
    config: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap.split(","),
        "api_version": parse_api_version(settings.kafka_api_version),
        "security_protocol": settings.security_protocol,
        "sasl_mechanism": settings.sasl_mechanism,
        "sasl_plain_username": settings.sasl_username,
        "sasl_plain_password": settings.sasl_password.get_secret_value() if settings.sasl_password else None,
        "ssl_cafile": settings.ssl_cafile,
        "reconnect_backoff_max_ms": 1000,
        "bootstrap_timeout_ms": 5000,
    }
    return {key: value for key, value in config.items() if value is not None}


class _Counters:
    """Thread-safe event counters for `stats()`."""

    def __init__(self, *names: str) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(names, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class LocalLogBus:
    """The embedded bus: durable append-only files `<feedback_dir>/log/<topic>.log`, no broker."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings.feedback
        directory = settings.feedback_dir / "log"
        self._logs = {topic: RecordLog(directory / f"{topic}.log")
                      for topic in (self._settings.predictions_topic, self._settings.feedback_topic)}
        self._fsync = PeriodicSync(self._logs.values())
        self._counters = _Counters("published", "failed")
        log.info("event=bus_started backend=local dir=%s", directory)

    def publish(self, event: PredictionEvent | FeedbackEvent) -> bool:
        try:
            self._logs[topic_for(event.event_type, self._settings)].append(encode_event(event))
        except OSError as exc:
            log.error("event=publish_failed request_id=%s error=%r", event.request_id, exc)
            self._counters.add("failed")
            return False
        self._counters.add("published")
        return True

    def flush(self, timeout_s: float = 10.0) -> bool:
        self._fsync.sync_all()
        return True

    def stats(self) -> dict[str, Any]:
        counts = self._counters.snapshot()
        return {"backend": "local", **counts, "delivered": counts["published"], "pending": 0,
                "positions": {topic: record_log.size() for topic, record_log in self._logs.items()}}

    def close(self) -> None:
        self._fsync.stop()
        for record_log in self._logs.values():
            record_log.close()


class KafkaBus:
    """Kafka behind a durable on-disk outbox; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        batch_records: int = 500,
        max_block_ms: int = 2000,
        delivery_timeout_s: float = 30.0,
        retry_backoff_s: tuple[float, float] = (0.2, 5.0),
    ) -> None:
        self._settings = settings.feedback
        self._client_config = kafka_client_config(self._settings)
        self._batch_records = batch_records
        self._max_block_ms = max_block_ms
        self._delivery_timeout_s = delivery_timeout_s
        self._retry_backoff_s = retry_backoff_s
        self._spool = Spool(settings.feedback_dir / "spool")
        self._fsync = PeriodicSync([self._spool.own_log])
        self._counters = _Counters("published", "failed", "delivered", "malformed")
        self._producer: KafkaProducer | None = None
        self._last_error: str | None = None
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._forwarder = threading.Thread(target=self._forward, name="flywheel-kafka-forwarder", daemon=True)
        self._forwarder.start()
        log.info("event=bus_started backend=kafka bootstrap=%s spool=%s pending=%d",
                 self._settings.kafka_bootstrap, self._spool.directory, self._spool.pending())

    def publish(self, event: PredictionEvent | FeedbackEvent) -> bool:
        try:
            self._spool.append(encode_event(event))
        except OSError as exc:
            log.error("event=publish_failed request_id=%s error=%r", event.request_id, exc)
            self._counters.add("failed")
            return False
        self._counters.add("published")
        self._wake.set()
        return True

    def flush(self, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while self._spool.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._fsync.sync_all()
        return not self._spool.pending()

    def stats(self) -> dict[str, Any]:
        return {"backend": "kafka", **self._counters.snapshot(), "pending": self._spool.pending(),
                "oldest_pending_age_s": self._oldest_pending_age_s(),
                "connected": self._producer is not None and self._last_error is None,
                "last_error": self._last_error}

    def _oldest_pending_age_s(self) -> float | None:
        oldest = self._spool.oldest_pending()
        try:
            return max(0.0, time.time() - decode_event(oldest).timestamp.timestamp()) if oldest else None
        except ValueError:  # not an event (a torn record): its age is unknown
            return None

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop forwarding; what is not delivered yet stays in the spool for the next process."""
        self._closing.set()
        self._wake.set()
        self._forwarder.join(timeout_s + self._max_block_ms / 1000)
        if self._producer is not None:
            try:
                self._producer.close(timeout=timeout_s)
            except KafkaError as exc:  # records still in flight: the spool resends them later
                log.warning("event=producer_close_incomplete error=%r", exc)
        self._fsync.stop()
        self._spool.close()
        log.info("event=bus_closed backend=kafka stats=%s", json.dumps(self.stats()))

    # -- forwarder thread --------------------------------------------------------------------

    def _forward(self) -> None:
        backoff = self._retry_backoff_s[0]
        while not self._closing.is_set():
            self._wake.clear()
            records = self._spool.peek(self._batch_records, self._settings.producer_buffer_bytes)
            if not records:
                if self._wake.wait(0.5):
                    self._closing.wait(LINGER_S)  # let a few more events arrive: fewer, larger sends
                continue
            try:
                delivered = self._send(records)
            except Exception as exc:  # no producer yet (broker down), or a client bug: the thread must live
                delivered = 0
                self._note_error(exc)
            self._spool.ack(records[:delivered])
            self._counters.add("delivered", delivered)
            if delivered == len(records):
                if self._last_error is not None:
                    log.info("event=broker_available pending=%d", self._spool.pending())
                    self._last_error = None
                backoff = self._retry_backoff_s[0]
            else:
                self._closing.wait(backoff)
                backoff = min(backoff * 2, self._retry_backoff_s[1])

    def _note_error(self, exc: BaseException) -> None:
        if self._last_error is None:
            log.warning("event=broker_unavailable pending=%d error=%r", self._spool.pending(), exc)
        self._last_error = repr(exc)

    def _connect(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = KafkaProducer(
                **self._client_config,
                acks="all",
                retries=2**31 - 1,  # bounded by delivery_timeout_ms
                compression_type="gzip",
                max_block_ms=self._max_block_ms,
                linger_ms=5,
                max_in_flight_requests_per_connection=1,  # keep the spool's order within a partition
                request_timeout_ms=min(10_000, int(self._delivery_timeout_s * 1000) - 10),
                delivery_timeout_ms=int(self._delivery_timeout_s * 1000),
                retry_backoff_ms=200,
            )
        return self._producer

    def _send(self, records: list[LogRecord]) -> int:
        """Send `records` in order and wait for the outcome; how many leading records were delivered."""
        producer = self._connect()
        futures = []
        try:
            for record in records:
                futures.append(self._send_one(producer, record))
        except KafkaError as exc:  # e.g. no metadata within max_block_ms: send the rest later
            self._note_error(exc)
        while not self._closing.is_set():
            try:
                producer.flush(timeout=0.5)
                break
            except KafkaError:
                continue  # the producer fails records itself after delivery_timeout_ms
        delivered = 0
        for future in futures:
            if future is not None and not future.succeeded():
                if future.failed():
                    self._note_error(future.exception)
                break
            delivered += 1
        return delivered

    def _send_one(self, producer: KafkaProducer, record: LogRecord) -> Any:
        try:
            head = json.loads(record.value)
            topic, key = topic_for(head["event_type"], self._settings), head["request_id"].encode()
        except (ValueError, KeyError, TypeError, AttributeError):
            # Only a write torn by a power loss looks like this: it cannot be sent, and it is no event.
            log.error("event=spool_record_malformed position=%d bytes=%d", record.position, len(record.value))
            self._counters.add("malformed")
            return None
        return producer.send(topic, value=record.value, key=key)


def build_bus(settings: Settings) -> EventBus:
    """Kafka when `feedback.kafka_bootstrap` is set, else the embedded local log."""
    return KafkaBus(settings) if settings.feedback.kafka_bootstrap else LocalLogBus(settings)

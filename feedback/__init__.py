"""The feedback plane: event schemas, the bus (Kafka or an embedded local log), the curator, the dataset.

The serving plane needs only what is exported here; the curator and the dataset live in
`feedback.curator` and `feedback.dataset` (they pull in pyarrow).
"""

from feedback.bus import EventBus, KafkaBus, LocalLogBus, build_bus
from feedback.pii import mask_event
from feedback.schemas import FeedbackAccepted, FeedbackEvent, FeedbackRequest, PredictionEvent
from feedback.supervisor import overall, read_curators, read_health

__all__ = [
    "EventBus",
    "FeedbackAccepted",
    "FeedbackEvent",
    "FeedbackRequest",
    "KafkaBus",
    "LocalLogBus",
    "PredictionEvent",
    "build_bus",
    "mask_event",
    "overall",
    "read_curators",
    "read_health",
]

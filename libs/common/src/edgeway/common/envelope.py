"""The message envelope: what every Edgeway message carries besides its body.

The envelope lives in AMQP properties and headers, never in the body, so a body can stay in its
native format (JSON, protobuf, H.264, JPEG). Where tracing is exported, the broker's
OpenTelemetry middleware writes the W3C `traceparent` of its own span (see
`edgeway.common.broker`); where it is not, the envelope carries the incoming one on unchanged, so
a trace is not cut by a process that does not record it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import uuid_utils

JSON = "application/json"

HEADER_PRODUCER = "x-producer"
HEADER_CAPTURED_AT = "x-captured-at"
HEADER_RECEIVED_AT = "x-received-at"
# Broadcast channel where a service sends a rejection for this message (see `Channels.producer`).
HEADER_REPLY_CHANNEL = "x-reply-channel"
HEADER_TRACEPARENT = "traceparent"  # W3C Trace Context


def new_message_id() -> str:
    """A UUIDv7: time-ordered, so ids sort by creation and index well."""
    return str(uuid_utils.uuid7())


class IncomingMessage(Protocol):
    """What the envelope needs of a received message (FastStream's `RabbitMessage` and
    aio-pika's `IncomingMessage` have it)."""

    @property
    def message_id(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def headers(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class Envelope:
    """Identity, type, origin and timing of one message.

    `message_id` is set by the first producer and kept through retries and re-publishes, so
    consumers can be idempotent on it.
    """

    type: str  # schema name and version, e.g. "occupancy.observation.v1"
    producer: str
    message_id: str = field(default_factory=new_message_id)
    correlation_id: str | None = None
    captured_at: float | None = None  # epoch seconds, when the producer captured the data
    received_at: float = field(default_factory=time.time)  # epoch seconds, at the Edgeway edge
    reply_channel: str | None = None
    content_type: str = JSON
    traceparent: str | None = None
    # Headers of this kind of message (e.g. `x-vehicle-vin`); the envelope's own take precedence.
    headers: Mapping[str, str] = field(default_factory=dict)

    def publish_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `RabbitBroker.publish` that carry this envelope."""
        # Times travel as decimal strings: pamqp encodes a Python float header as a 32-bit
        # float, which is off by up to a minute at today's epoch seconds.
        headers: dict[str, Any] = {
            **self.headers,
            HEADER_PRODUCER: self.producer,
            HEADER_RECEIVED_AT: f"{self.received_at:.6f}",
        }
        if self.captured_at is not None:
            headers[HEADER_CAPTURED_AT] = f"{self.captured_at:.6f}"
        if self.reply_channel:
            headers[HEADER_REPLY_CHANNEL] = self.reply_channel
        if self.traceparent:
            headers[HEADER_TRACEPARENT] = self.traceparent
        return {
            "message_id": self.message_id,
            "correlation_id": self.correlation_id or self.message_id,
            "content_type": self.content_type,
            "message_type": self.type,
            "headers": headers,
        }

    def derive(self, *, type: str, producer: str) -> Envelope:
        """The envelope of a message caused by this one: same correlation, new id."""
        return Envelope(
            type=type,
            producer=producer,
            correlation_id=self.correlation_id or self.message_id,
            captured_at=self.captured_at,
            received_at=self.received_at,
            traceparent=self.traceparent,
        )

    def received_datetime(self) -> datetime:
        """`received_at` as an aware UTC datetime; now if the header held no usable time."""
        try:
            return datetime.fromtimestamp(self.received_at, UTC)
        except (OverflowError, OSError, ValueError):
            return datetime.now(UTC)

    @classmethod
    def from_message(cls, message: IncomingMessage, *, type: str) -> Envelope:
        headers = message.headers or {}
        captured = headers.get(HEADER_CAPTURED_AT)
        received = headers.get(HEADER_RECEIVED_AT)
        return cls(
            type=type,
            producer=str(headers.get(HEADER_PRODUCER, "unknown")),
            message_id=message.message_id or new_message_id(),
            correlation_id=message.correlation_id or None,
            captured_at=float(captured) if captured is not None else None,
            received_at=float(received) if received is not None else time.time(),
            reply_channel=headers.get(HEADER_REPLY_CHANNEL),
            content_type=message.content_type or JSON,
            traceparent=headers.get(HEADER_TRACEPARENT),
        )

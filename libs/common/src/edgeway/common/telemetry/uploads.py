"""Several telemetry uploads in one AMQP message, each with its own envelope (`uploads.proto`).

The gateway publishes an upload that finds the broker idle as a message of its own
(`UPLOAD_TYPE`, the logger's body, the envelope in AMQP properties). Uploads that arrive while
earlier ones await their confirm go together in the next message (`UPLOADS_TYPE`). The telemetry
service reads both, and handles the uploads of a message in order, as if each had come alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import DecodeError

from edgeway.common.envelope import Envelope
from edgeway.common.telemetry import uploads_pb2

PROTOBUF = "application/x-protobuf"
UPLOAD_TYPE = "telemetry.upload.v1"  # one upload: the logger's body as it came
UPLOADS_TYPE = "telemetry.uploads.v1"  # several: an `Uploads` message


def pack(uploads: Sequence[tuple[bytes, Envelope]]) -> bytes:
    """The body of an `UPLOADS_TYPE` message: each upload's body and envelope, in order."""
    message = uploads_pb2.Uploads()
    for body, envelope in uploads:
        item = message.uploads.add(
            body=body,
            message_id=envelope.message_id,
            producer=envelope.producer,
            received_at=envelope.received_at,
            traceparent=envelope.traceparent or "",
        )
        if envelope.captured_at is not None:
            item.captured_at = envelope.captured_at
        item.headers.update(envelope.headers)
    data: bytes = message.SerializeToString()
    return data


def unpack(body: bytes) -> list[tuple[bytes, Envelope]]:
    """The uploads of an `UPLOADS_TYPE` body; ValueError if it is not one."""
    try:
        message = uploads_pb2.Uploads.FromString(body)
    except DecodeError as exc:
        raise ValueError(f"not a {UPLOADS_TYPE} body: {exc}") from exc
    return [
        (
            item.body,
            Envelope(
                type=UPLOAD_TYPE,
                producer=item.producer,
                message_id=item.message_id,
                captured_at=item.captured_at if item.HasField("captured_at") else None,
                received_at=item.received_at,
                content_type=PROTOBUF,
                traceparent=item.traceparent or None,
                headers=dict(item.headers),
            ),
        )
        for item in message.uploads
    ]

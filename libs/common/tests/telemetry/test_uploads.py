"""Several uploads in one message: each comes back with its body and its own envelope."""

from __future__ import annotations

import pytest

from edgeway.common.envelope import Envelope
from edgeway.common.telemetry.uploads import PROTOBUF, UPLOAD_TYPE, pack, unpack


def test_uploads_come_back_in_order_with_their_envelopes() -> None:
    first = Envelope(
        type=UPLOAD_TYPE,
        producer="telemetry-logger/car-1",
        captured_at=1_795_000_000.125,
        received_at=1_795_000_000.5,
        content_type=PROTOBUF,
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        headers={"x-vehicle-vin": "5YJ3E1EA1KF000001", "x-compressed": "true", "x-batch": "false"},
    )
    second = Envelope(type=UPLOAD_TYPE, producer="telemetry-logger/car-2", content_type=PROTOBUF)
    assert unpack(pack([(b"\x08\x01", first), (b"", second)])) == [
        (b"\x08\x01", first),
        (b"", second),  # no capture time, no trace: none comes back
    ]
    assert unpack(pack([])) == []


def test_a_body_that_is_no_batch_is_refused() -> None:
    with pytest.raises(ValueError, match=r"not a telemetry\.uploads\.v1 body"):
        unpack(b"\xff\xff\xff")

"""The broker's metric labels: bounded whatever the routing keys carry."""

from __future__ import annotations

import pytest

from edgeway.common.broker import metrics_destination


@pytest.mark.parametrize(
    ("exchange", "routing_key", "label"),
    [
        # Work exchanges are fanouts: no routing key.
        ("edgeway.telemetry.raw", "", "edgeway.telemetry.raw."),
        # Broadcast keys name vehicles, locations, requests: only their kind is kept.
        ("edgeway.broadcast", "telemetry.vehicle.5YJ3E1EA1KF000001", "edgeway.broadcast.telemetry"),
        ("edgeway.broadcast", "ingest.request.0193-abc", "edgeway.broadcast.ingest"),
        ("edgeway.broadcast", "occupancy", "edgeway.broadcast.occupancy"),
        # The default exchange routes by queue name: requests keep theirs, replies share one.
        ("", "edgeway.telemetry.requests", "default.edgeway.telemetry.requests"),
        ("default", "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAxNDk", "default.amq.rabbitmq.reply-to"),
    ],
)
def test_metric_labels_keep_the_kind_of_routing_key_not_its_ids(
    exchange: str, routing_key: str, label: str
) -> None:
    assert metrics_destination(exchange, routing_key) == label

"""The AsyncAPI document's builder: names from the settings, FastStream's output amended, the
page. Validity and drift against the code are checked in the repository's `tests/test_asyncapi.py`,
which can build the gateway."""

from __future__ import annotations

import re

from edgeway.common.asyncapi import document, html
from edgeway.common.asyncapi.amqp import parameters
from edgeway.common.settings import ExchangeNames


def test_exchange_names_come_from_the_settings() -> None:
    spec = document(ExchangeNames(broadcast="site-a.broadcast", video_frames="frames-a"))
    exchanges = {
        binding["exchange"]["name"]
        for channel in spec["channels"].values()
        if (binding := channel.get("bindings", {}).get("amqp")) and binding["is"] == "routingKey"
    }
    assert {"site-a.broadcast", "frames-a"} <= exchanges
    assert "edgeway.broadcast" not in exchanges


def test_work_queues_keep_their_quorum_arguments() -> None:
    channel = document()["channels"]["telemetry.raw"]
    queue = channel["bindings"]["amqp"]["queue"]
    assert queue["x-arguments"] == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 5,
        "x-dead-letter-exchange": "edgeway.dead-letter",
        "x-dead-letter-routing-key": "edgeway.telemetry.raw",
        "x-single-active-consumer": True,
    }
    assert channel["bindings"]["amqp"]["x-bound-to"]["exchange"]["type"] == "fanout"


def test_operations_say_which_service_publishes_and_which_consumes() -> None:
    operations = document()["operations"]
    assert operations["occupancy.broadcast.location"]["action"] == "send"
    assert operations["occupancy.broadcast.location"]["tags"] == [{"name": "occupancy"}]
    assert operations["gateway.broadcast"]["action"] == "receive"
    assert operations["gateway.broadcast"]["tags"] == [{"name": "gateway"}]


def test_no_key_keeps_faststreams_colons() -> None:
    spec = document()
    for part in ("channels", "operations"):
        assert all(":" not in key for key in spec[part]), part
    assert all(":" not in key for key in spec["components"]["messages"])


def test_parameters_are_the_names_in_braces() -> None:
    assert parameters("gateway.{gateway_id}.{connection_id}").keys() == {
        "gateway_id",
        "connection_id",
    }
    assert parameters("video.viewer") == {}


def test_the_page_loads_nothing_from_elsewhere_and_escapes_its_url() -> None:
    page = html('/docs/asyncapi.json?x="<b>')
    assert "http://" not in page
    assert "https://" not in page
    assert not re.search(r"<script[^>]+src=", page)
    assert "&quot;&lt;b&gt;" in page
    assert '"<b>' not in page

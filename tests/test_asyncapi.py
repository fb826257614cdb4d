"""The AsyncAPI document is valid AsyncAPI 3.0 and says what the code does.

Valid: check-jsonschema against the official AsyncAPI 3.0.0 JSON Schema, from the npm package
`@asyncapi/specs` (a dev dependency of web/, installed by `make setup`), plus what the schema cannot
check: every reference resolves, component keys use the allowed characters, each operation's
messages are its channel's, each `{name}` of an address is a parameter.

Not drifting: every exchange and queue `Topology` can make (each property and method, found by
introspection, so a new one fails here until it is documented), the video relay's bridge
queues, and every routing key of `Channels` appear with the same type, flags and arguments, and
nothing else does; every WebSocket route the gateway's app registers appears with its path and
query parameters and its scope, and nothing else does.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from fastapi.routing import APIWebSocketRoute, iter_route_contexts
from faststream.rabbit import RabbitExchange, RabbitQueue

from edgeway.common.asyncapi import document
from edgeway.common.settings import Environment
from edgeway.common.topology import Channels, Topology
from edgeway.gateway.app import create_app
from edgeway.gateway.docs import WEBSOCKET_ROUTES
from edgeway.gateway.settings import GatewaySettings
from edgeway.video_relay.handlers import bridge_queue

SCHEMA = (
    Path(__file__).parents[1] / "web/node_modules/@asyncapi/specs/schemas/3.0.0-without-$id.json"
)
DOCUMENT = document()
TOPOLOGY = Topology()
COMPONENT_KEY = re.compile(r"^[\w\d.\-_]+$")
# Topology methods that build from names rather than name one thing: what they make is
# enumerated through the properties and lists that use them (see `made_by_topology`).
BUILDERS = {"work_queue", "dead_letter_queue", "worldsystem", "worldsystem_exchanges"}


def _placeholders(function: Any) -> list[str]:
    """`{name}` for each parameter, as the document writes a value given at run time."""
    return [f"{{{name}}}" for name in inspect.signature(function).parameters]


def made_by_topology() -> Iterator[RabbitExchange | RabbitQueue]:
    """Every exchange and queue `Topology` can make."""
    for name, member in inspect.getmembers(Topology):
        if name.startswith("_") or name in BUILDERS:
            continue
        if isinstance(member, property):
            value = getattr(TOPOLOGY, name)
            if isinstance(value, list):
                yield from value
            elif not isinstance(value, str):
                yield value
            continue
        if name == "tracking_detections_key":
            continue  # a routing key, checked with the Channels
        method = getattr(TOPOLOGY, name)
        assert callable(method), name
        made = method(*_placeholders(method))
        assert isinstance(made, RabbitExchange | RabbitQueue), f"document Topology.{name}"
        yield made
    yield from TOPOLOGY.worldsystem_exchanges()
    for work in TOPOLOGY.work_queues:
        yield TOPOLOGY.dead_letter_queue(work.name)
    for kind in ("trajectory", "restart"):
        yield bridge_queue(kind, "{instance}")


def _exchange(exchange: RabbitExchange) -> dict[str, Any]:
    return {
        "name": exchange.name,
        "type": exchange.type.value,
        "durable": exchange.durable,
        "autoDelete": exchange.auto_delete,
        "arguments": dict(exchange.arguments or {}),
    }


def _queue(queue: RabbitQueue) -> dict[str, Any]:
    return {
        "name": queue.name,
        "durable": queue.durable,
        "exclusive": queue.exclusive,
        "autoDelete": queue.auto_delete,
        "arguments": dict(queue.arguments or {}),
    }


def _documented() -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The exchanges and queues the document names, by name, as the helpers above shape them."""
    exchanges: dict[str, dict[str, Any]] = {}
    queues: dict[str, dict[str, Any]] = {}

    def keep(found: dict[str, dict[str, Any]], binding: dict[str, Any]) -> None:
        entry = {key: binding[key] for key in ("name", "durable", "autoDelete")}
        if "type" in binding:
            entry["type"] = binding["type"]
        if "exclusive" in binding:
            entry["exclusive"] = binding["exclusive"]
        entry["arguments"] = binding.get("x-arguments", {})
        assert found.setdefault(entry["name"], entry) == entry, f"{entry['name']} differs"

    for channel in DOCUMENT["channels"].values():
        amqp = channel.get("bindings", {}).get("amqp")
        if amqp is None:
            continue
        if amqp["is"] == "queue":
            keep(queues, amqp["queue"])
            exchange = amqp["x-bound-to"]["exchange"]
        else:
            exchange = amqp["exchange"]
        if exchange["name"]:  # the default exchange is RabbitMQ's own
            keep(exchanges, exchange)
    return exchanges, queues


def test_the_document_is_valid_asyncapi_3(tmp_path: Path) -> None:
    assert DOCUMENT["asyncapi"] == "3.0.0"
    path = tmp_path / "asyncapi.json"
    path.write_bytes(orjson.dumps(DOCUMENT))
    checked = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", str(SCHEMA), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _resolve(reference: str) -> Any:
    assert reference.startswith("#/"), reference
    found: Any = DOCUMENT
    for part in reference[2:].split("/"):
        found = found[unquote(part)]
    return found


def _references(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref" and isinstance(item, str):
                yield item
            else:
                yield from _references(item)
    elif isinstance(value, list):
        for item in value:
            yield from _references(item)


def test_every_reference_resolves() -> None:
    references = set(_references(DOCUMENT))
    assert references
    for reference in references:
        _resolve(reference)  # KeyError names the one that does not


def test_the_document_is_well_formed_beyond_its_schema() -> None:
    for kind, items in DOCUMENT["components"].items():
        bad = [key for key in items if not COMPONENT_KEY.match(key)]
        assert not bad, (kind, bad)
    for key, operation in DOCUMENT["operations"].items():
        channel = _resolve(operation["channel"]["$ref"])
        own = {f"{operation['channel']['$ref']}/messages/{name}" for name in channel["messages"]}
        assert {message["$ref"] for message in operation["messages"]} <= own, key
    for key, channel in DOCUMENT["channels"].items():
        names = set(re.findall(r"{(\w+)}", channel.get("address") or ""))
        assert names == set(channel.get("parameters", {})), key


def test_every_exchange_and_queue_of_the_topology_is_documented_alike() -> None:
    exchanges, queues = _documented()
    made = list(made_by_topology())
    code_exchanges = {e.name: _exchange(e) for e in made if isinstance(e, RabbitExchange)}
    code_queues = {q.name: _queue(q) for q in made if isinstance(q, RabbitQueue)}
    assert exchanges == code_exchanges
    assert queues == code_queues


def _channel_patterns() -> set[str]:
    """Every routing key `Channels` (and `Topology`) can make, `{name}` for run-time values."""
    keys = {TOPOLOGY.tracking_detections_key(*_placeholders(Topology.tracking_detections_key))}
    for name, member in vars(Channels).items():
        if name.startswith("_"):
            continue
        if isinstance(member, str):
            keys.add(member)
        elif isinstance(member, staticmethod):
            keys.add(member.__func__(*_placeholders(member.__func__)))
    return keys


def test_every_routing_key_of_the_channels_is_documented() -> None:
    addresses = set()
    bindings = set()
    for channel in DOCUMENT["channels"].values():
        amqp = channel.get("bindings", {}).get("amqp")
        if amqp is None:
            continue
        if amqp["is"] == "routingKey" and amqp["exchange"]["name"] == TOPOLOGY.names.dead_letter:
            # The broker dead-letters by the work queue's name.
            assert channel["address"] in {queue.name for queue in TOPOLOGY.work_queues}
        elif amqp["is"] == "routingKey" and amqp["exchange"]["type"] == "topic":
            addresses.add(channel["address"])
        if amqp["is"] == "queue" and amqp["x-bound-to"]["exchange"]["type"] == "topic":
            bindings.add(amqp["x-bound-to"]["routingKey"])
    wildcards = {re.sub(r"{\w+}", "*", address) for address in addresses}
    for key in _channel_patterns():
        assert key in addresses or key in wildcards or key in bindings, key
    # ... and nothing the code cannot make: each documented key is one of the patterns.
    patterns = _channel_patterns()
    for address in addresses:
        assert address in patterns, address


@pytest.fixture(scope="module")
def served() -> dict[str, APIWebSocketRoute]:
    settings = GatewaySettings(
        jwt_secret="asyncapi-test-secret-that-is-long-enough-for-hs256",
        environment=Environment.DEVELOPMENT,
        metrics_port=None,
    )
    app = create_app(settings)
    return {
        context.original_route.path: context.original_route
        for context in iter_route_contexts(app.routes)
        if isinstance(context.original_route, APIWebSocketRoute)
    }


def _websocket_channels() -> dict[str, dict[str, Any]]:
    return {
        channel["address"]: channel
        for channel in DOCUMENT["channels"].values()
        if "ws" in channel.get("bindings", {})
    }


def test_every_websocket_route_is_documented_and_nothing_else(
    served: dict[str, APIWebSocketRoute],
) -> None:
    documented = _websocket_channels()
    assert set(documented) == set(served)
    for path, route in served.items():
        channel = documented[path]
        query = set(channel["bindings"]["ws"]["query"]["properties"]) - {"token"}
        assert query == {param.name for param in route.dependant.query_params}, path
        path_params = {param.name for param in route.dependant.path_params}
        assert set(channel.get("parameters", {})) == path_params, path


def test_each_websocket_route_names_the_scope_the_gateway_checks() -> None:
    scopes = {route.path: route.scope.value for route in WEBSOCKET_ROUTES}
    for key, operation in DOCUMENT["operations"].items():
        channel = _resolve(operation["channel"]["$ref"])
        if "ws" not in channel.get("bindings", {}):
            continue
        assert operation["x-scopes"] == [scopes[channel["address"]]], key
        assert operation["security"], key

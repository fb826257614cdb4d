"""Edgeway's AsyncAPI 3.0 document: every exchange, queue, routing key and WebSocket message.

`document()` builds it: the AMQP part is FastStream's AsyncAPI generator run over a broker
that describes every flow (`amqp`), amended where FastStream cannot say it; the WebSocket part
is the gateway's routes (`websockets`). `html(document_url)` is a page that shows it without
loading anything from the internet. The gateway serves both.
"""

from __future__ import annotations

import html as markup
import json
from typing import Any

from faststream.specification import AsyncAPI
from pydantic.json_schema import models_json_schema

from edgeway.common.asyncapi import amqp, websockets
from edgeway.common.settings import ExchangeNames
from edgeway.common.topology import Topology

VERSION = "3.0.0"
TITLE = "Edgeway"
DESCRIPTION = """\
Edgeway's messages: the AMQP flows between its services (one RabbitMQ), and the gateway's
WebSocket routes for producers and clients.

- **AMQP**: each channel is a queue a service consumes (`is: queue`; `x-bound-to` names its
  exchange and binding key) or an exchange and routing key a service publishes to
  (`is: routingKey`). Queue and exchange arguments (quorum type, delivery limit, dead-letter
  exchange, length limit and overflow) are under `x-arguments`. Each operation is tagged with
  its service. Every message carries the envelope: `message_id`, `correlation_id`,
  `content_type` and `type` in AMQP properties, the rest in headers (`EnvelopeHeaders`).
  `{name}` in a name is a value given at run time (a replica, a device, a task).
- **WebSockets**: each channel is a path of the gateway. `receive` is what a client sends,
  `send` what it gets. The token (`Authorization: Bearer`, or `?token=`) must hold the
  operation's `x-scopes`. What cannot be taken gets the error frame (`ErrorFrame`), the same
  object as every HTTP error; the socket stays open unless the frame says otherwise.
"""


def document(names: ExchangeNames | None = None) -> dict[str, Any]:
    """The AsyncAPI document, as JSON-ready data (exchange names as `names` has them)."""
    described = amqp.flows(Topology(names))
    broker = amqp.broker(described, url="amqp://rabbitmq:5672/")
    generated = AsyncAPI(
        broker, title=TITLE, version="1", description=DESCRIPTION, schema_version=VERSION
    ).to_specification()
    spec = amqp.amend(generated.to_jsonable(), described)
    spec["servers"] = {
        "rabbitmq": {
            "host": "rabbitmq:5672",
            "protocol": "amqp",
            "protocolVersion": "0.9.1",
            "description": "RabbitMQ: `EDGEWAY_AMQP_URL`; reached only by Edgeway's services.",
        },
        "gateway": {
            "host": "gateway:8000",
            "protocol": "ws",
            "description": "The gateway: the only public surface (`wss` behind TLS).",
        },
    }
    for channel in spec["channels"].values():
        channel["servers"] = [{"$ref": "#/servers/rabbitmq"}]
    routes = websockets.channels()
    spec["channels"] |= routes["channels"]
    spec["operations"] |= routes["operations"]
    components = spec["components"]
    components["messages"] |= routes["messages"]
    _, models = models_json_schema(
        [(model, "serialization") for model in dict.fromkeys(routes["models"])],
        ref_template="#/components/schemas/{model}",
    )
    components["schemas"] |= models.get("$defs", {})
    components["securitySchemes"] = websockets.SECURITY_SCHEMES
    return spec


def html(document_url: str) -> str:
    """A page that lists the document at `document_url`: channels, their operations and
    messages. Self-contained: no script or style from elsewhere."""
    url = markup.escape(document_url, quote=True)
    # In the script, the URL is a JSON string; `<` escaped so it cannot close the script.
    script_url = json.dumps(document_url).replace("<", "\\u003c")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Edgeway AsyncAPI</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:2rem;max-width:70rem}}
h2{{margin-top:2rem;font-size:1.1rem}} code{{background:#f3f3f3;padding:0 .2rem}}
table{{border-collapse:collapse;width:100%}} td,th{{border:1px solid #ddd;padding:.3rem;
vertical-align:top;text-align:left}} pre{{margin:0;white-space:pre-wrap;font-size:12px}}
</style></head><body>
<h1>Edgeway AsyncAPI</h1>
<p>The document: <a href="{url}">{url}</a> (AsyncAPI {VERSION}).</p>
<div id="doc">Loading…</div>
<script>
const esc = (s) => String(s ?? "").replace(/[&<>"]/g, (c) => ({{"&":"&amp;","<":"&lt;",
  ">":"&gt;",'"':"&quot;"}})[c]);
const at = (doc, ref) => ref.slice(2).split("/").map(decodeURIComponent)
  .reduce((o, k) => o[k], doc);
fetch({script_url}).then((r) => r.json()).then((doc) => {{
  const rows = Object.entries(doc.channels).map(([key, ch]) => {{
    const ops = Object.values(doc.operations).filter((op) => op.channel.$ref === "#/channels/"
      + encodeURIComponent(key) || op.channel.$ref === "#/channels/" + key);
    const messages = Object.values(ch.messages || {{}}).map((m) => at(doc, m.$ref));
    return `<tr><td><code>${{esc(ch.address ?? key)}}</code><br>${{esc(key)}}</td>
      <td>${{ops.map((op) => `<b>${{esc(op.action)}}</b> ${{esc(op.title)}}
        ${{op["x-scopes"] ? `<br>scope <code>${{esc(op["x-scopes"].join(" "))}}</code>` : ""}}`)
        .join("<br>")}}</td>
      <td>${{messages.map((m) => `<code>${{esc(m.name || m.title)}}</code>
        ${{esc(m.contentType || "")}} ${{esc(m.summary || "")}}`).join("<br>")}}</td>
      <td><pre>${{esc(JSON.stringify((ch.bindings || {{}}), null, 1))}}</pre></td></tr>`;
  }});
  document.getElementById("doc").innerHTML = `<table><tr><th>channel</th><th>operations</th>
    <th>messages</th><th>bindings</th></tr>${{rows.join("")}}</table>`;
}}).catch((e) => {{ document.getElementById("doc").textContent = "Not loaded: " + e; }});
</script></body></html>
"""


__all__ = ["VERSION", "document", "html"]

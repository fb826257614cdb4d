"""The HTTP baseline of the telemetry benchmark: a bare FastAPI app, served like the gateway.

`python -m bench.bare_ingest` (port from `EDGEWAY_HTTP_PORT`, as `ServiceProcess` passes it):

- `POST /telemetry`: reads the body and answers 202 with an empty body. No token check, no
  protobuf parsing, no broker: what one uvicorn worker on this machine can answer, the ceiling
  the gateway's upload endpoint is compared with.
- `GET /readyz`, `GET /healthz`: 200, so `ServiceProcess` can wait for it.

Served as `edgeway.gateway` is: uvicorn, one worker, uvloop, httptools, no access log.
"""

from __future__ import annotations

import argparse
import os

import uvicorn
from fastapi import FastAPI, Request, Response

app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


@app.post("/telemetry", status_code=202)
async def upload(request: Request) -> Response:
    await request.body()
    return Response(status_code=202)


@app.get("/readyz")
@app.get("/healthz")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("EDGEWAY_HTTP_PORT", 8091)))
    args = parser.parse_args()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
    )


if __name__ == "__main__":
    main()

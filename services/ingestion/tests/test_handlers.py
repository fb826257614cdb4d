"""The ingestion service's own HTTP route, `GET /objects`: its refusals are the error object.

The route as the service mounts it on its internal port (`handlers.local_objects`), over a real
local store, asked with a real HTTP client over ASGI.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from edgeway.ingestion.handlers import local_objects
from edgeway.ingestion.storage import LocalStore, LocalUrls

KEY = "frames/2026/12/06/cam-1/a.jpg"


async def test_objects_are_served_at_signed_urls_and_refusals_are_the_error_object(
    tmp_path: Path,
) -> None:
    urls = LocalUrls("http://ingestion", b"k" * 32)
    objects = LocalStore(tmp_path, "frames", urls=urls)
    await objects.put(KEY, b"\xff\xd8jpeg", content_type="image/jpeg", metadata={})
    signed = urlsplit(urls.sign("frames", KEY, expires=timedelta(minutes=5)))
    transport = httpx.ASGITransport(app=local_objects(objects))
    async with httpx.AsyncClient(transport=transport, base_url="http://ingestion") as http:
        served = await http.get(f"{signed.path}?{signed.query}")
        assert (served.status_code, served.content) == (200, b"\xff\xd8jpeg")
        gone = urlsplit(urls.sign("frames", KEY + ".swept", expires=timedelta(minutes=5)))
        cases = [
            (await http.get(f"{gone.path}?{gone.query}"), 404, "not_found"),
            (await http.get("/objects?key=x"), 400, "bad_request"),
            (
                await http.get(f"/objects?{signed.query.replace('signature=', 'signature=0')}"),
                403,
                "forbidden",
            ),
            (await http.post(f"/objects?{signed.query}"), 405, "method_not_allowed"),
        ]
    for response, status, code in cases:
        assert response.status_code == status
        body = response.json()
        assert (body["type"], body["code"]) == ("error", code), body
        assert body["reason"]

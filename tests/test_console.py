"""The web console (web/) in real headless Chromium against the stack `make run` starts.

The stack is test_readme_walk's (devstack on its own ports, virtual host and data directory);
the console is opened with the sign-in address its banner prints, and driven by
web/tests/console.browser.mjs (playwright-core with Debian's /usr/bin/chromium), whose report
is checked here. Screenshots of each page are kept under var/screenshots/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeway.common.testing import make_token
from edgeway.gateway.settings import DEVELOPMENT_SECRET
from tests.test_readme_walk import Stack, stack  # noqa: F401 - the shared devstack fixture

# The stack starts (up to 240 s on a busy machine) and the browser runs (up to 240 s) in setup.
pytestmark = [pytest.mark.connected, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "web"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "var" / "screenshots"
BROWSER_TIMEOUT_S = 240


def console_url(banner: str) -> str:
    """The sign-in address the banner prints for the web console."""
    found = re.search(r"web console\s+(http://\S+/#token=\S+)", banner)
    assert found, f"the banner names no console address:\n{banner}"
    return found[1]


def browser_ready() -> None:
    """Fail with what to run when the console is not built or Chromium is missing."""
    if not (WEB / "dist" / "index.html").is_file():
        pytest.fail("the web console is not built: run `make setup`")
    if not (WEB / "node_modules" / "playwright-core").is_dir():
        pytest.fail("playwright-core is not installed: run `make setup` (npm ci in web/)")
    if not CHROMIUM.is_file():
        pytest.fail(f"no {CHROMIUM}: run `apt-get install -y chromium` (or `make test`)")
    if shutil.which("node") is None:
        pytest.fail("no node on PATH: the browser test needs Node.js 20")


@pytest.fixture(scope="module")
def report(stack: Stack) -> dict[str, Any]:  # noqa: F811 - the imported fixture, by name
    browser_ready()
    url = console_url(stack.banner)
    # A token for telemetry only: the occupancy page must refuse it and show no data.
    limited = make_token(
        "telemetry:subscribe", subject="console-limited", secret=DEVELOPMENT_SECRET
    )
    result = subprocess.run(
        ["node", str(WEB / "tests" / "console.browser.mjs")],
        cwd=ROOT,
        env={
            **os.environ,
            "CONSOLE_URL": url,
            "LIMITED_TOKEN": limited,
            "RTSP_URL": f"rtsp://127.0.0.1:{stack.ports[8554]}/moving",
            "SAMPLE_IMAGE": str(ROOT / "deploy/local/sample.jpg"),
            "SCREENSHOTS": str(SCREENSHOTS),
        },
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT_S,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    found: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    # Beside the screenshots: what each page showed, for whoever looks at them.
    (SCREENSHOTS / "report.json").write_text(json.dumps(found, indent=2))
    return found


def test_the_gateway_serves_the_console(stack: Stack) -> None:  # noqa: F811
    page = httpx.get(f"{stack.gateway}/", timeout=10)
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-cache"
    assets = re.findall(r'(?:src|href)="(/assets/[^"]+)"', page.text)
    assert assets, page.text
    for asset in assets:
        answer = httpx.get(f"{stack.gateway}{asset}", timeout=10)
        assert answer.status_code == 200, asset
        assert "immutable" in answer.headers["cache-control"]
    # Only what the build wrote: no path outside it.
    assert httpx.get(f"{stack.gateway}/assets/..%2Findex.html", timeout=10).status_code == 404
    assert httpx.get(f"{stack.gateway}/assets/nothing.js", timeout=10).status_code == 404
    # Nothing from the internet: no absolute address in the page or its scripts.
    for text in [page.text, *(httpx.get(f"{stack.gateway}{a}").text for a in assets)]:
        assert not re.findall(r"""(?:src|href)=["']https?://""", text)
        assert "fonts.googleapis" not in text


def test_occupancy_history_through_the_gateway(stack: Stack) -> None:  # noqa: F811
    token = make_token("occupancy:subscribe", secret=DEVELOPMENT_SECRET)
    headers = {"Authorization": f"Bearer {token}"}
    url = f"{stack.gateway}/api/v1/occupancy/history"
    answer = httpx.get(url, params={"seconds": 3600, "bucket_s": 10}, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    history = answer.json()
    assert history["bucket_s"] == 10
    assert history["locations"], history  # the demo camera has been sending since the start
    for location in history["locations"]:
        starts = [point[0] for point in location["points"]]
        assert starts == sorted(starts)
        assert all(
            start % 10 == 0 and 0 <= percent <= 100 for start, percent, _ in location["points"]
        )
    refused = httpx.get(url, params={"bucket_s": 0}, headers=headers, timeout=10)
    assert refused.status_code == 422
    telemetry_only = make_token("telemetry:subscribe", ttl=60, secret=DEVELOPMENT_SECRET)
    forbidden = httpx.get(url, headers={"Authorization": f"Bearer {telemetry_only}"}, timeout=10)
    assert forbidden.status_code == 403


def test_sign_in_from_the_banner_and_nothing_offsite(report: dict[str, Any]) -> None:
    assert report["token_left_address"], "the token stays in the address bar"
    assert report["offsite_requests"] == []
    assert report["page_errors"] == []


def test_occupancy_cards_update_live(report: dict[str, Any]) -> None:
    page = report["pages"]["occupancy"]
    assert "error" not in page, page
    assert len(page["later"]) >= 7, page  # Omega's seven places, as the demo camera sends them
    assert page["changed"], f"no card changed in the wait: {page}"
    assert all(re.fullmatch(r"\d+\.\d%", card["percent"]) for card in page["later"])
    assert any(card["sparkline_points"] >= 2 for card in page["later"]), page


def test_telemetry_charts_get_points(report: dict[str, Any]) -> None:
    page = report["pages"]["telemetry"]
    assert "error" not in page, page
    vins = {vehicle["vin"] for vehicle in page["vehicles"]}
    assert {"5YJ3E1EA1KF000001", "5YJ3E1EA1KF000002"} <= vins, page
    for vehicle in page["vehicles"]:
        assert vehicle["canvases"] >= 4
    assert any(vehicle["points"]["speed"] >= 5 for vehicle in page["vehicles"])
    assert "% saved" in page["fleet"]
    assert "5YJ3E1EA1KF000001" in page["control"]  # the loggers' states after Start


def test_a_dead_zone_from_the_page_shows_as_an_offline_session(report: dict[str, Any]) -> None:
    """The page put one vehicle into a dead zone past offline_after_s and back: the telemetry
    service stored its replay as an offline session, which the vehicle's table lists."""
    page = report["pages"]["telemetry"]
    assert "error" not in page, page
    assert "5YJ3E1EA1KF000001" in page["dead_zone"], page  # the logger acknowledged it
    assert page["sessions"], page
    newest = page["sessions"][0]
    assert newest["status"] in ("syncing", "synced"), newest
    started, _, arrived, records, status = newest["cells"]
    stored, buffered = (int(part) for part in records.split(" / "))
    assert 0 < stored <= buffered, newest
    assert re.search(r"\d:\d\d:\d\d", started), newest  # the page's local time of day
    assert re.search(r"\d:\d\d:\d\d", arrived), newest
    assert status == newest["status"], newest


def test_video_decodes_the_phones_stream(report: dict[str, Any]) -> None:
    page = report["pages"]["video"]
    assert "error" not in page, page
    assert page["frames"] >= 1, page
    # The simulated phone streams 640x360; a blank (one-colour) canvas has no spread at all.
    assert (page["picture"]["width"], page["picture"]["height"]) == (640, 360), page
    assert page["picture"]["stddev"] > 5, page
    assert "kbit/s" in page["stats"]
    assert "decode delay" in page["stats"]
    assert page["mode"] == "h264", page
    assert page["fallback"] is None, page
    # Capture to screen, from the relay's capture times (the phone here is on this machine's
    # clock): a number, and not a wild one.
    assert "capture → screen" in page["stats"]
    assert isinstance(page["capture_ms"], int | float), page
    assert -1_000 < page["capture_ms"] < 5_000, page


def test_video_falls_back_to_jpeg_frames_without_webcodecs(report: dict[str, Any]) -> None:
    page = report["pages"]["video_jpeg"]
    assert "error" not in page, page
    assert page["mode"] == "jpeg", page
    assert "no WebCodecs" in page["fallback"], page
    assert page["frames"] >= 1, page
    # The relay's JPEGs of the simulated phone's 640x360 stream, on the same canvas.
    assert (page["picture"]["width"], page["picture"]["height"]) == (640, 360), page
    assert page["picture"]["stddev"] > 5, page
    assert "kbit/s" in page["stats"]
    assert "frames/s" in page["stats"]
    assert isinstance(page["capture_ms"], int | float), page


def test_a_tracking_task_shows_global_ids_on_the_map(report: dict[str, Any]) -> None:
    page = report["pages"]["tracking"]
    assert "error" not in page, page
    assert page["ids"] >= 1, page
    assert page["trails"] >= 1, page
    assert page["frame"] >= 0, page
    assert set(page["cameras"]) <= {"c01", "c02", "c03"}, page
    assert page["cameras"], page


def test_an_upload_completes_and_a_capture_is_cancelled(report: dict[str, Any]) -> None:
    page = report["pages"]["ingestion"]
    assert "error" not in page, page
    assert page["progress"] == 1
    assert page["status"] == "completed"
    assert any(thumb["width"] > 0 for thumb in page["thumbnails"]), page
    # The RTSP capture started from the page was cancelled from it.
    assert "cancelled" in page["cancelled"]
    assert "rtsp from cam-1" in page["cancelled"]


def test_system_shows_every_service_ready(report: dict[str, Any]) -> None:
    page = report["pages"]["system"]
    assert "error" not in page, page
    rows = page["readiness"]
    # One row per instance, from the reports each instance publishes (its own /readyz).
    services = {row["service"] for row in rows}
    assert {"gateway", "occupancy", "telemetry", "video-relay", "ingestion", "tracker"} <= services
    for row in rows:
        assert row["state"] == "ready", row
        assert row["instance"], row
    assert int(page["metrics"]["edgeway_gateway_connections"]) >= 1, page  # the console's own


def test_a_token_without_the_scope_sees_the_refusal(report: dict[str, Any]) -> None:
    page = report["pages"]["refused"]
    assert page["refusal"], page
    assert "occupancy:subscribe" in page["refusal"]
    assert page["cards"] == 0
    # telemetry:subscribe opens the telemetry page, but not the operators' logger controls.
    assert "telemetry:control" in page["controls"]
    assert page["control_buttons"] == 0


def test_screenshots_are_kept(report: dict[str, Any]) -> None:
    pages = ("occupancy", "telemetry", "video", "video-jpeg", "ingestion", "system", "tracking")
    for name in (*pages, "refused-occupancy"):
        shot = SCREENSHOTS / f"{name}.png"
        assert shot.is_file(), shot
        assert shot.stat().st_size > 10_000, shot

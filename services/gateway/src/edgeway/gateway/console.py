"""The web console (`web/`), served at `/`: its built page and the assets Vite wrote beside it.

The console is a static page that talks only to the gateway's own public endpoints, with the
token its user pastes; it is built by `make setup` (`npm ci && npm run build` in `web/`) into
`web/dist`. Only the files that build wrote are served, by name: a path that names anything
else is a 404, so nothing outside the build folder can be reached. Asset names carry a hash of
their content, so browsers may keep them; the page itself is asked for again every time.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from edgeway.common.errors import ErrorObject

# The repository's build folder (services/gateway/src/edgeway/gateway/ -> web/dist).
BUILD_DIR = Path(__file__).resolve().parents[5] / "web" / "dist"
ASSETS = "assets"
IMMUTABLE = "public, max-age=31536000, immutable"

router = APIRouter(include_in_schema=False)


def _not_built() -> Response:
    return ErrorObject(
        code="unavailable",
        reason=f"the web console is not built ({BUILD_DIR / 'index.html'} is missing)",
        fix="run `make setup` (or `npm ci && npm run build` in web/)",
    ).response(503)


@router.get("/")
async def console_page() -> Response:
    index = BUILD_DIR / "index.html"
    if not index.is_file():
        return _not_built()
    return FileResponse(index, headers={"Cache-Control": "no-cache"})


@router.get("/assets/{name}")
async def console_asset(name: str) -> Response:
    folder = BUILD_DIR / ASSETS
    # By name among what the build wrote: `name` never becomes a path of its own.
    built = {path.name: path for path in folder.iterdir()} if folder.is_dir() else {}
    path = built.get(name)
    if path is None or not path.is_file():
        return ErrorObject(
            code="not_found", reason=f"the console has no asset {name[:100]!r}"
        ).response(404)
    return FileResponse(path, headers={"Cache-Control": IMMUTABLE})

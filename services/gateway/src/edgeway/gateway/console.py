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

# The repository's build folder (services/gateway/src/edgeway/gateway/ -> web/dist), unless the
# `console_dir` setting names another (the images' /app/console).
BUILD_DIR = Path(__file__).resolve().parents[5] / "web" / "dist"
ASSETS = "assets"
IMMUTABLE = "public, max-age=31536000, immutable"


def routes(build_dir: Path | None = None) -> APIRouter:
    """The console's two routes over `build_dir` (default `BUILD_DIR`, read when asked)."""
    router = APIRouter(include_in_schema=False)

    def folder() -> Path:
        return build_dir if build_dir is not None else BUILD_DIR

    @router.get("/")
    async def console_page() -> Response:
        index = folder() / "index.html"
        if not index.is_file():
            return ErrorObject(
                code="unavailable",
                reason=f"the web console is not built ({index} is missing)",
                fix="run `make setup` (or `npm ci && npm run build` in web/)",
            ).response(503)
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    @router.get("/assets/{name}")
    async def console_asset(name: str) -> Response:
        assets = folder() / ASSETS
        # By name among what the build wrote: `name` never becomes a path of its own.
        built = {path.name: path for path in assets.iterdir()} if assets.is_dir() else {}
        path = built.get(name)
        if path is None or not path.is_file():
            return ErrorObject(
                code="not_found", reason=f"the console has no asset {name[:100]!r}"
            ).response(404)
        return FileResponse(path, headers={"Cache-Control": IMMUTABLE})

    return router

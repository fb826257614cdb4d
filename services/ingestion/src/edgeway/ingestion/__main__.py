"""`python -m edgeway.ingestion`: the ingestion service with its operations endpoints."""

from __future__ import annotations

from edgeway.common.service import serve
from edgeway.ingestion.app import SERVICE, build_app
from edgeway.ingestion.settings import IngestionSettings


def main() -> None:
    serve(SERVICE, IngestionSettings(), build_app)


if __name__ == "__main__":
    main()

"""`python -m edgeway.tracker`: the tracker service with its operations endpoints."""

from __future__ import annotations

from edgeway.common.service import serve
from edgeway.tracker.app import build_app
from edgeway.tracker.flows import SERVICE
from edgeway.tracker.settings import TrackerSettings


def main() -> None:
    serve(SERVICE, TrackerSettings(), build_app)


if __name__ == "__main__":
    main()

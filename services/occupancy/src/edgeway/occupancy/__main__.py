"""`python -m edgeway.occupancy`: the occupancy service with its operations endpoints."""

from __future__ import annotations

from edgeway.common.service import serve
from edgeway.occupancy.app import build_app
from edgeway.occupancy.flows import SERVICE
from edgeway.occupancy.settings import OccupancySettings


def main() -> None:
    serve(SERVICE, OccupancySettings(), build_app)


if __name__ == "__main__":
    main()

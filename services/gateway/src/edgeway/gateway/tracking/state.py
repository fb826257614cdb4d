"""What this gateway replica holds for tracking: its edge cameras by name, its video uploads."""

from __future__ import annotations

import asyncio

from edgeway.gateway.auth import Identity
from edgeway.gateway.producers import ProducerSeats
from edgeway.gateway.settings import GatewaySettings

DETECTIONS_ENDPOINT = "/ws/detections"


class TrackingState:
    def __init__(self, settings: GatewaySettings) -> None:
        # One `/ws/detections` connection produces for each edge camera (`<environment>/<camera>`)
        # on this replica; a token's `device` claim names the cameras it may produce for.
        self.cameras = ProducerSeats(DETECTIONS_ENDPOINT, Identity.DEVICE)
        # Video uploads served at once (each holds its body in memory).
        self.video_slots = asyncio.Semaphore(settings.tracking_video_slots)

"""What this gateway replica holds for video: its consumers, and its phones by device."""

from __future__ import annotations

from collections import Counter

from edgeway.gateway.auth import Identity
from edgeway.gateway.producers import ProducerSeats

PHONE_ENDPOINT = "/ws/phone"
VIDEO_ENDPOINT = "/ws/video"


class VideoState:
    def __init__(self) -> None:
        # Open `/ws/video/consume` sockets per device.
        self.consumers: Counter[str] = Counter()
        # The one `/ws/phone` and the one `/ws/video` socket of each device on this replica.
        self.phones = ProducerSeats(PHONE_ENDPOINT, Identity.DEVICE)
        self.streams = ProducerSeats(VIDEO_ENDPOINT, Identity.DEVICE)

    def consumer_counts(self) -> dict[str, int]:
        return dict(self.consumers)

    def consumer_left(self, device: str) -> None:
        self.consumers[device] -= 1
        if self.consumers[device] <= 0:
            del self.consumers[device]  # ids come and go: keep only the devices watched now

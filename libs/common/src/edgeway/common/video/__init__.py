"""Phone video and IMU: the Android H.264 packet format and the per-device IMU orderer."""

from __future__ import annotations

import re

# A phone's device id: it names channels (`video.stream.<device>`) and object keys, so it is
# held to a safe alphabet.
DEVICE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_device(device: str) -> str | None:
    """The reason `device` is not a usable device id, or None."""
    if DEVICE.fullmatch(device):
        return None
    return "?device= must be 1 to 64 letters, digits, '_' or '-'"

"""Putting each phone's IMU samples in order and publishing them, one flusher per device."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from edgeway.common.logging import get_logger
from edgeway.common.tasks import spawn
from edgeway.common.video.imu import ImuOrderer
from edgeway.video_relay.metrics import Metrics
from edgeway.video_relay.publishing import Publisher
from edgeway.video_relay.relay import device_of

# The seed's IMU flush period.
IMU_FLUSH_S = 0.05

log = get_logger("edgeway.video_relay.imu")


def read_imu(body: bytes) -> dict[str, Any] | None:
    """A phone IMU message in the seed's shape, or None. Extra fields pass through."""
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict) or message.get("type", "imu_data") != "imu_data":
        return None
    timestamp = message.get("timestamp")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or timestamp < 0:
        return None
    for sensor in ("accelerometer", "gyroscope"):
        axes = message.get(sensor)
        if not isinstance(axes, dict):
            return None
        for axis in ("x", "y", "z"):
            value = axes.get(axis)
            if not isinstance(value, int | float) or isinstance(value, bool):
                return None
    message["type"] = "imu_data"
    return message


@dataclass(eq=False)
class ImuDevice:
    orderer: ImuOrderer
    last_activity: float
    task: asyncio.Task[None] | None = None


class ImuRelay:
    """Per device an `ImuOrderer` and one flusher every 50 ms (the seed had one per phone
    connection sharing one global buffer)."""

    def __init__(
        self,
        *,
        publisher: Publisher,
        metrics: Metrics,
        ready: asyncio.Event,
        max_devices: int,
        idle_s: float,
    ) -> None:
        self.publisher = publisher
        self.metrics = metrics
        self.ready = ready
        self.max_devices = max_devices
        self.idle_s = idle_s
        self.devices: OrderedDict[str, ImuDevice] = OrderedDict()

    def take(self, body: bytes, headers: Mapping[str, Any]) -> None:
        device = device_of(headers)
        sample = read_imu(body)
        if device is None or sample is None:
            self.metrics.imu.labels("invalid").inc()
            return
        sample["device"] = device
        state = self.devices.get(device)
        if state is None:
            while len(self.devices) >= self.max_devices:
                self._forget(next(iter(self.devices)))
            state = self.devices[device] = ImuDevice(ImuOrderer(), time.monotonic())
            state.task = spawn(self._flush(device, state), name=f"imu-{device}")
        else:
            self.devices.move_to_end(device)
            state.last_activity = time.monotonic()
        orderer = state.orderer
        duplicates, late = orderer.duplicates, orderer.late
        orderer.add(sample, now_ns=time.monotonic_ns())
        self.metrics.imu.labels("duplicate").inc(orderer.duplicates - duplicates)
        self.metrics.imu.labels("late").inc(orderer.late - late)

    async def _flush(self, device: str, state: ImuDevice) -> None:
        await self.ready.wait()
        while True:
            await asyncio.sleep(IMU_FLUSH_S)
            samples = state.orderer.due(now_ns=time.monotonic_ns())
            if not samples:
                if time.monotonic() - state.last_activity > self.idle_s:
                    if self.devices.get(device) is state:
                        del self.devices[device]
                    return
                continue
            # One publish per task, created in order, so they reach the channel in order; the
            # whole batch is confirmed together.
            publishes = []
            for sample in samples:
                publishes.append(self.publisher.imu(device, sample))
                publishes.append(self.publisher.imu_viewers(device, sample))
            results = await asyncio.gather(*publishes, return_exceptions=True)
            failed = sum(isinstance(result, BaseException) for result in results[::2])
            self.metrics.imu.labels("published").inc(len(samples) - failed)
            if failed:
                self.metrics.imu.labels("publish_failed").inc(failed)
                log.warning("publishing imu samples failed", device=device, failed=failed)

    def _forget(self, device: str) -> None:
        state = self.devices.pop(device)
        if state.task is not None:
            state.task.cancel()

    def stop(self) -> None:
        for device in list(self.devices):
            self._forget(device)

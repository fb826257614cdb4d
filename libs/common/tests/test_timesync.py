"""NTP against real UDP servers started here on loopback (no internet).

`Responder` is a small NTP server (RFC 5905 server mode) whose clock runs `offset_s` ahead of
this host's; it can also stay silent, answer "unsynchronised" or answer garbage.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import cast

import pytest
from prometheus_client import REGISTRY

from edgeway.common.settings import CommonSettings
from edgeway.common.timesync import NTP_PORT, TimeSync, split_server

NTP_EPOCH = 2_208_988_800  # seconds from 1900-01-01 (NTP) to 1970-01-01 (Unix)


def ntp_timestamp(seconds: float) -> int:
    return int((seconds + NTP_EPOCH) * 2**32)


class Responder(asyncio.DatagramProtocol):
    def __init__(self, offset_s: float, *, mode: str = "good") -> None:
        self.offset_s = offset_s
        self.mode = mode  # good | silent | unsynchronised | garbage
        self.requests = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.requests += 1
        if len(data) < 48 or self.mode == "silent" or self.transport is None:
            return
        if self.mode == "garbage":
            self.transport.sendto(b"not ntp", addr)
            return
        received = time.time() + self.offset_s
        version = (data[0] >> 3) & 0x7
        leap, stratum = (3, 0) if self.mode == "unsynchronised" else (0, 2)
        reply = struct.pack(
            "!BBBbII4sQ8sQQ",
            leap << 6 | version << 3 | 4,  # mode 4: server
            stratum,
            6,  # poll
            -20,  # precision
            0,  # root delay
            0,  # root dispersion
            b"TEST",
            ntp_timestamp(received),  # reference
            data[40:48],  # origin: the client's transmit timestamp, echoed
            ntp_timestamp(received),
            ntp_timestamp(time.time() + self.offset_s),  # transmit
        )
        self.transport.sendto(reply, addr)


Serve = Callable[..., Awaitable[tuple[str, Responder]]]


@asynccontextmanager
async def responders() -> AsyncIterator[Serve]:
    opened: list[asyncio.DatagramTransport] = []

    async def serve(offset_s: float = 0.0, *, mode: str = "good") -> tuple[str, Responder]:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: Responder(offset_s, mode=mode), local_addr=("127.0.0.1", 0)
        )
        opened.append(transport)
        port = transport.get_extra_info("sockname")[1]
        return f"127.0.0.1:{port}", protocol

    try:
        yield serve
    finally:
        for transport in opened:
            transport.close()


async def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_offset_age_and_gauges_from_a_local_server() -> None:
    async with responders() as serve:
        address, responder = await serve(12.5)
        sync = TimeSync([address], interval_s=60, timeout_s=1)
        assert sync.offset_s == 0.0
        assert sync.age_s is None
        sync.start()
        try:
            await wait_for(lambda: sync.age_s is not None)
            assert sync.offset_s == pytest.approx(12.5, abs=0.05)
            assert sync.server == address
            assert sync.now() == pytest.approx(time.time() + 12.5, abs=0.05)
            assert REGISTRY.get_sample_value("edgeway_ntp_offset_seconds") == sync.offset_s
            await asyncio.sleep(0.2)
            age = sync.age_s
            assert age is not None
            assert 0.2 <= age < 2
            gauge = REGISTRY.get_sample_value("edgeway_ntp_age_seconds")
            assert gauge is not None
            assert gauge == pytest.approx(age, abs=0.1)
            assert responder.requests == 1  # the next sync is a minute away
        finally:
            await sync.stop()


async def test_start_returns_at_once_when_no_server_answers() -> None:
    async with responders() as serve:
        silent, responder = await serve(mode="silent")
        sync = TimeSync([silent], timeout_s=0.5)
        started = time.monotonic()
        sync.start()
        assert time.monotonic() - started < 0.05
        try:
            await wait_for(lambda: responder.requests == 1)
            await asyncio.sleep(0.7)  # past the timeout: the attempt has failed
            assert sync.offset_s == 0.0
            assert sync.age_s is None
            assert sync.now() == pytest.approx(time.time(), abs=0.05)
            assert REGISTRY.get_sample_value("edgeway_ntp_age_seconds") == math.inf
        finally:
            await sync.stop()


async def test_servers_are_tried_in_order_until_one_answers() -> None:
    async with responders() as serve:
        silent, quiet = await serve(mode="silent")
        unsynced, lost = await serve(99.0, mode="unsynchronised")
        garbled, noisy = await serve(99.0, mode="garbage")
        good, answering = await serve(-3.0)
        spare, unused = await serve(50.0)
        sync = TimeSync([silent, unsynced, garbled, good, spare], timeout_s=0.3)
        assert await sync.sync()
        assert sync.offset_s == pytest.approx(-3.0, abs=0.05)
        assert sync.server == good
        assert [quiet.requests, lost.requests, noisy.requests, answering.requests] == [1, 1, 1, 1]
        assert unused.requests == 0


async def test_resyncs_every_interval_and_keeps_the_offset_while_servers_fail() -> None:
    async with responders() as serve:
        address, responder = await serve(1.0)
        sync = TimeSync([address], interval_s=0.1, timeout_s=0.2)
        sync.start()
        try:
            await wait_for(lambda: sync.offset_s != 0.0)
            assert sync.offset_s == pytest.approx(1.0, abs=0.05)
            responder.offset_s = 2.0
            await wait_for(lambda: sync.offset_s > 1.5)
            assert sync.offset_s == pytest.approx(2.0, abs=0.05)
            responder.mode = "silent"
            failures_from = responder.requests
            await wait_for(lambda: responder.requests >= failures_from + 2)
            assert sync.offset_s == pytest.approx(2.0, abs=0.05)  # last good answer kept
            age = sync.age_s
            assert age is not None
            assert age > 0.2
        finally:
            await sync.stop()


async def test_an_empty_server_list_turns_it_off() -> None:
    sync = TimeSync([])
    sync.start()
    await asyncio.sleep(0.05)
    assert sync.offset_s == 0.0
    assert sync.age_s is None
    assert not await sync.sync()
    await sync.stop()


def test_server_addresses() -> None:
    assert split_server("pool.ntp.org") == ("pool.ntp.org", NTP_PORT)
    assert split_server("127.0.0.1:1234") == ("127.0.0.1", 1234)
    assert split_server("[::1]:1234") == ("::1", 1234)
    assert split_server("[::1]") == ("::1", NTP_PORT)
    assert split_server("2001:db8::1") == ("2001:db8::1", NTP_PORT)


def test_settings_default_and_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CommonSettings().ntp_servers == [
        "pool.ntp.org",
        "time.cloudflare.com",
        "time.google.com",
    ]
    monkeypatch.setenv("EDGEWAY_NTP_SERVERS", "[]")
    assert CommonSettings().ntp_servers == []
    monkeypatch.setenv("EDGEWAY_NTP_SERVERS", '["ntp.internal:10123"]')
    assert CommonSettings().ntp_servers == ["ntp.internal:10123"]

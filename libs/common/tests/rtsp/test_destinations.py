"""The RTSP destination allowlist: public addresses on the RTSP ports by default, anything else
only where an operator lists it, and every address a name resolves to checked."""

from __future__ import annotations

import ipaddress

import pytest

from edgeway.common.rtsp.destinations import (
    DEFAULT_POLICY,
    Destination,
    DestinationPolicy,
    DestinationRefusedError,
    is_public,
    parse_rule,
)


def addresses(*texts: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return [ipaddress.ip_address(text) for text in texts]


def at(url: str) -> Destination:
    return Destination.of(url)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",  # loopback
        "::1",
        "10.1.2.3",  # private
        "172.16.0.1",
        "192.168.1.10",
        "fd00::1",
        "169.254.169.254",  # link-local: the cloud metadata endpoint
        "fe80::1",
        "100.64.0.1",  # shared (carrier-grade NAT)
        "0.0.0.0",  # unspecified
        "::",
        "224.0.0.1",  # multicast
        "ff02::1",
        "240.0.0.1",  # reserved
        "255.255.255.255",
        "192.0.2.1",  # documentation
        "::ffff:127.0.0.1",  # IPv4-mapped loopback
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "fec0::1",  # site-local
    ],
)
def test_special_addresses_are_not_public(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))
    assert DEFAULT_POLICY.refusal(at("rtsp://camera.example.com/x"), addresses(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "203.0.114.7", "2606:4700::1111"])
def test_public_addresses_are_admitted_on_the_rtsp_ports_only_by_default(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))
    for url, admitted in [
        ("rtsp://camera.example.com/x", True),  # 554
        ("rtsps://camera.example.com/x", True),  # 322
        ("rtsp://camera.example.com:8554/x", False),
        ("rtsp://camera.example.com:22/x", False),
    ]:
        refusal = DEFAULT_POLICY.refusal(at(url), addresses(address))
        assert (refusal is None) is admitted, (url, refusal)


def test_a_listed_network_admits_its_addresses_and_ports_only() -> None:
    policy = DestinationPolicy.parse(["10.20.0.0/16:554", "[fd00::/8]", "127.0.0.1:8554-8560"])
    assert policy.refusal(at("rtsp://cam/x"), addresses("10.20.3.4")) is None
    assert policy.refusal(at("rtsp://cam:8554/x"), addresses("10.20.3.4"))  # port
    assert policy.refusal(at("rtsp://cam/x"), addresses("10.21.0.1"))  # outside
    assert policy.refusal(at("rtsp://cam:9/x"), addresses("fd00::5")) is None  # any port
    assert policy.refusal(at("rtsp://cam:8560/x"), addresses("127.0.0.1")) is None
    assert policy.refusal(at("rtsp://cam:8561/x"), addresses("127.0.0.1"))
    assert policy.refusal(at("rtsp://cam/x"), addresses("8.8.8.8"))  # no public entry
    # An IPv4-mapped address is its IPv4 address.
    assert policy.refusal(at("rtsp://cam/x"), addresses("::ffff:10.20.0.9")) is None


def test_names_admit_public_addresses_of_those_names_only() -> None:
    policy = DestinationPolicy.parse(["cam1.example.com:554", "*.cams.example.org"])
    public, private = addresses("8.8.8.8"), addresses("10.0.0.1")
    assert policy.refusal(at("rtsp://CAM1.example.com./x"), public) is None
    assert policy.refusal(at("rtsp://cam1.example.com/x"), private)  # a name never opens 10/8
    assert policy.refusal(at("rtsp://cam2.example.com/x"), public)
    assert policy.refusal(at("rtsp://a.b.cams.example.org:9/x"), public) is None
    assert policy.refusal(at("rtsp://cams.example.org/x"), public)  # the wildcard needs a label
    assert policy.refusal(at("rtsp://8.8.8.8/x"), public)  # not by that name


def test_every_address_of_a_name_must_be_admitted() -> None:
    refusal = DestinationPolicy.parse(["*"]).refusal(
        at("rtsp://rebind.example.com/x"), addresses("8.8.8.8", "127.0.0.1")
    )
    assert refusal is not None
    assert "127.0.0.1" in refusal


def test_the_early_check_refuses_addresses_and_names_no_entry_could_admit() -> None:
    policy = DestinationPolicy.parse(["*:554", "10.0.0.0/8:8554"])
    assert policy.early_refusal(at("rtsp://127.0.0.1/x"))
    assert policy.early_refusal(at("rtsp://[::1]:554/x"))
    assert policy.early_refusal(at("rtsp://cam.example.com:9000/x"))
    assert policy.early_refusal(at("rtsp://8.8.8.8/x")) is None
    # A name might resolve into 10/8 or to a public address: its addresses decide later.
    assert policy.early_refusal(at("rtsp://cam.example.com:8554/x")) is None
    assert policy.early_refusal(at("rtsp://cam.example.com/x")) is None


async def test_a_name_is_resolved_and_each_address_checked() -> None:
    localhost = at("rtsp://localhost:8554/x")
    for policy in (DEFAULT_POLICY, DestinationPolicy.parse(["*"])):
        with pytest.raises(DestinationRefusedError, match="does not admit"):
            await policy.resolve(localhost)
    loopback = DestinationPolicy.parse(["127.0.0.1", "::1"])
    resolved = await loopback.resolve(localhost)
    assert ipaddress.ip_address("127.0.0.1") in resolved
    with pytest.raises(DestinationRefusedError, match="does not resolve"):
        await loopback.resolve(at("rtsp://no-such-host.invalid/x"))


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("10.0.0.1/8", "host bits"),
        ("300.1.2.3", "not an address"),
        ("*:0", "1 to 65535"),
        ("*:99999", "1 to 65535"),
        ("cam:8560-8554", "low to high"),
        ("cam:http", "a number"),
        ("[::1:554", "brackets"),
        ("cam_1.example.com", "host name"),
        ("", "host name"),
    ],
)
def test_a_bad_entry_says_what_is_wrong(entry: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_rule(entry)


def test_the_relay_url_keeps_credentials_path_and_query_but_not_the_host() -> None:
    destination = at("rtsps://user:p%40ss@Camera.Example.com:7000/live/ch1?sub=1")
    assert (destination.scheme, destination.host, destination.port) == (
        "rtsps",
        "camera.example.com",
        7000,
    )
    assert destination.via(4321) == "rtsp://user:p%40ss@127.0.0.1:4321/live/ch1?sub=1"
    assert at("rtsp://[fd00::7]/x").literal() == ipaddress.ip_address("fd00::7")
    with pytest.raises(ValueError, match="control character"):
        at("rtsp://cam/x\r\nSET x y")

"""Where an RTSP capture may connect: an allowlist of hosts, networks and ports.

A caller with `ingest:write` makes the service open a connection to the URL it names, from
inside the deployment's network. Unchecked, that is a way into loopback, the pod and office
networks and the cloud metadata address, and a port scanner. So every connection is checked
against `EDGEWAY_RTSP_ALLOWED_DESTINATIONS`, a list of entries `HOST[:PORTS]`:

- `HOST`: `*` (any public address), a host name (`cam1.example.com`) or a wildcard of names
  (`*.cams.example.com`): these admit only public addresses (global unicast, and an IPv4
  address embedded in IPv6 public too). An IP address or CIDR network (`10.20.0.0/16`,
  `[fd00::/8]`) admits the addresses inside it, whatever range they are in: the only way to
  reach loopback, private, link-local, shared, unspecified, multicast or reserved addresses.
- `PORTS`: a port (`554`), a range (`8554-8560`) or `*`; none means any port.

A host name is resolved when the capture connects, and every address it resolves to must be
admitted (a name pointing at 127.0.0.1 is refused like 127.0.0.1); the connection then goes to
a checked address, never through a second resolution (`relay.py`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from edgeway.common.schemas.ingest import check_rtsp_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322}  # RFC 2326 and IANA's rtsps
ANY_PORT = (1, 65535)
# The default: public cameras on the registered RTSP ports. Anything on a private network (most
# cameras) or on another port is listed by the operator.
DEFAULT_DESTINATIONS = ("*:554", "*:322")

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")


class DestinationRefusedError(Exception):
    """A destination the policy does not admit; `reason` is for the log, never the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def normal(address: IPAddress) -> IPAddress:
    """The address as the network treats it: an IPv4-mapped IPv6 address is its IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _public_one(address: IPAddress) -> bool:
    # is_global alone lets multicast through (and IPv6 site-local, on Python 3.11).
    special = (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local)
    )
    return address.is_global and not special


def is_public(address: IPAddress) -> bool:
    """Whether `address` is an ordinary public unicast address.

    A 6to4 address is public to Python, but its traffic ends at the IPv4 address it carries:
    that one must be public too. (NAT64's 64:ff9b::/96 and IPv4-compatible ::/96 are reserved.)
    """
    address = normal(address)
    embedded = address.sixtofour if isinstance(address, ipaddress.IPv6Address) else None
    return _public_one(address) and (embedded is None or _public_one(embedded))


@dataclass(frozen=True)
class DestinationRule:
    """One entry of the allowlist: a network, or host names (public addresses only), and ports."""

    text: str
    ports: tuple[int, int]
    network: IPNetwork | None = None
    name: str | None = None  # "*", "*.example.com" or "cam.example.com", lower case

    def _port(self, port: int) -> bool:
        return self.ports[0] <= port <= self.ports[1]

    def _named(self, host: str) -> bool:
        assert self.name is not None
        host = host.lower().rstrip(".")
        if self.name == "*":
            return True
        if self.name.startswith("*."):
            return host.endswith(self.name[1:])
        return host == self.name

    def admits(self, host: str, address: IPAddress, port: int) -> bool:
        """Whether a connection to `address`, resolved from `host`, on `port` is allowed."""
        if not self._port(port):
            return False
        if self.network is not None:
            return normal(address) in self.network
        return self._named(host) and is_public(address)

    def may_admit(self, host: str, port: int) -> bool:
        """Before resolving: whether some address of the host name could be admitted."""
        return self._port(port) and (self.network is not None or self._named(host))


def _ports(text: str, entry: str) -> tuple[int, int]:
    if text == "*":
        return ANY_PORT
    low, _, high = text.partition("-")
    try:
        ports = (int(low), int(high or low))
    except ValueError:
        raise ValueError(f"{entry!r}: the port must be a number, a range or '*'") from None
    if not 1 <= ports[0] <= ports[1] <= 65535:
        raise ValueError(f"{entry!r}: ports go from 1 to 65535, low to high")
    return ports


def _host_and_ports(entry: str) -> tuple[str, tuple[int, int]]:
    if entry.startswith("["):  # [IPv6] or [IPv6/len], then maybe :ports
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{entry!r}: an IPv6 address goes in brackets, e.g. [fd00::/8]:554")
        return host, _ports(rest[1:], entry) if rest else ANY_PORT
    if entry.count(":") == 1:
        host, _, ports = entry.partition(":")
        return host, _ports(ports, entry)
    return entry, ANY_PORT  # a host, or an IPv6 address or network without brackets


def parse_rule(entry: str) -> DestinationRule:
    """A rule from its text; ValueError saying what is wrong with it."""
    text = entry.strip()
    host, ports = _host_and_ports(text)
    if host == "*":
        return DestinationRule(text, ports, name="*")
    try:
        network = ipaddress.ip_network(host)
    except ValueError as exc:
        if any(character in host for character in "/:") or host.replace(".", "").isdigit():
            raise ValueError(f"{entry!r}: not an address or network ({exc})") from None
    else:
        return DestinationRule(text, ports, network=network)
    name = host.lower().rstrip(".")
    bare = name[2:] if name.startswith("*.") else name
    if not _NAME.fullmatch(bare):
        raise ValueError(
            f"{entry!r}: a host is '*', an address, a network, a host name or '*.' and a domain"
        )
    return DestinationRule(text, ports, name=name)


@dataclass(frozen=True)
class Destination:
    """Where a checked RTSP URL points, and the rest of it as the caller wrote it."""

    scheme: str  # rtsp or rtsps
    host: str  # urlsplit's: lower case, without IPv6 brackets
    port: int
    userinfo: str  # "user:password" as written (percent-encoded), or ""
    rest: str  # path, query and fragment as written

    @classmethod
    def of(cls, url: str) -> Destination:
        """The destination of an RTSP URL; ValueError if the URL is not a safe one."""
        check_rtsp_url(url)
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        assert parts.hostname is not None  # check_rtsp_url: a URL with a host
        userinfo, _, _ = parts.netloc.rpartition("@")
        prefix = len(parts.scheme) + len("://") + len(parts.netloc)
        return cls(
            scheme=scheme,
            host=parts.hostname,
            port=parts.port or DEFAULT_PORTS[scheme],
            userinfo=userinfo,
            rest=url[prefix:],
        )

    def literal(self) -> IPAddress | None:
        """The host as an IP address, when the URL names one."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def via(self, port: int) -> str:
        """The URL with its host and port replaced by a loopback relay's (plain RTSP: the relay
        speaks TLS to an rtsps camera), its credentials, path and query kept."""
        userinfo = f"{self.userinfo}@" if self.userinfo else ""
        return f"rtsp://{userinfo}127.0.0.1:{port}{self.rest}"


class DestinationPolicy:
    """The allowlist (`EDGEWAY_RTSP_ALLOWED_DESTINATIONS`); see the module's docstring."""

    def __init__(self, rules: Sequence[DestinationRule]) -> None:
        self.rules = tuple(rules)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> DestinationPolicy:
        return cls([parse_rule(entry) for entry in entries])

    def refusal(self, destination: Destination, addresses: Sequence[IPAddress]) -> str | None:
        """Why a connection to `destination` at these addresses is refused; None if it is not.

        Every address must be admitted: a name with one address inside the allowlist and one
        outside it is refused, since nothing says which one a connection would reach.
        """
        if not addresses:
            return f"{destination.host} has no address"
        for address in addresses:
            if not any(
                rule.admits(destination.host, address, destination.port) for rule in self.rules
            ):
                return (
                    f"{destination.host} port {destination.port} resolves to {address}, "
                    "which EDGEWAY_RTSP_ALLOWED_DESTINATIONS does not admit"
                )
        return None

    def early_refusal(self, destination: Destination) -> str | None:
        """What can be refused before resolving anything: an address, or a name no rule could
        admit on this port. None means "maybe": the addresses decide when connecting."""
        literal = destination.literal()
        if literal is not None:
            return self.refusal(destination, [literal])
        if not any(rule.may_admit(destination.host, destination.port) for rule in self.rules):
            return (
                f"no entry of EDGEWAY_RTSP_ALLOWED_DESTINATIONS admits {destination.host} "
                f"port {destination.port}"
            )
        return None

    async def resolve(self, destination: Destination) -> list[IPAddress]:
        """Every address the host resolves to, checked: DestinationRefusedError if one is not
        admitted. The caller connects to these addresses, never to the name."""
        loop = asyncio.get_running_loop()
        try:
            found = await loop.getaddrinfo(
                destination.host, destination.port, type=socket.SOCK_STREAM
            )
        except socket.gaierror as exc:
            raise DestinationRefusedError(
                f"{destination.host} does not resolve ({exc.strerror})"
            ) from None
        addresses: list[IPAddress] = []
        for *_, sockaddr in found:
            address = ipaddress.ip_address(str(sockaddr[0]))
            if address not in addresses:
                addresses.append(address)
        refusal = self.refusal(destination, addresses)
        if refusal is not None:
            raise DestinationRefusedError(refusal)
        return addresses


DEFAULT_POLICY = DestinationPolicy.parse(DEFAULT_DESTINATIONS)

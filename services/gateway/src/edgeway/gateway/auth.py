"""Who is calling and what they may do: JWT bearer tokens with scopes.

A token comes as `Authorization: Bearer <jwt>` or, for browsers' WebSockets that cannot set
headers, as a `token` query parameter. Its `scope` claim (space-separated, OAuth style) lists
what it grants, e.g. `occupancy:publish occupancy:subscribe`. Publishing and subscribing are
separate scopes. Without a token a connection gets only the configured anonymous scopes.

A producer's token also names what it may produce for: its `device` claim (phones) or `vin` claim
(vehicle loggers), a string or a list of strings, or else its subject. A token for one phone
cannot stream as another (`Principal.speaks_for`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import jwt
from starlette.requests import HTTPConnection
from starlette.responses import Response

from edgeway.common.errors import ErrorObject
from edgeway.gateway.settings import GatewaySettings


class Scope(StrEnum):
    OCCUPANCY_PUBLISH = "occupancy:publish"
    OCCUPANCY_SUBSCRIBE = "occupancy:subscribe"
    TELEMETRY_PUBLISH = "telemetry:publish"  # loggers: upload, control socket
    TELEMETRY_SUBSCRIBE = "telemetry:subscribe"  # dashboards: /ws, /status
    TELEMETRY_CONTROL = "telemetry:control"  # operators: start, stop, dead zone, clear
    TELEMETRY_ADMIN = "telemetry:admin"  # operators: register, list and retire vehicles
    VIDEO_PUBLISH = "video:publish"  # phones: /ws/phone, /ws/video
    VIDEO_SUBSCRIBE = "video:subscribe"  # consumers and viewers, video status
    VIDEO_CONTROL = "video:control"  # viewer commands to phones, POST /api/restart
    INGEST_WRITE = "ingest:write"  # uploads, RTSP captures and their cancellation
    INGEST_READ = "ingest:read"  # request status, progress sockets
    # Operators: status, progress and cancel of every caller's ingestion requests (others see
    # only their own); with ingest:read and ingest:write, which the endpoints still require.
    INGEST_ADMIN = "ingest:admin"
    TRACKING_ADMIN = "tracking:admin"  # operators: environments, videos, start and stop tasks
    TRACKING_READ = "tracking:read"  # environments, task status, stored tracks
    TRACKING_SUBSCRIBE = "tracking:subscribe"  # /ws/tracking/{task_id}
    TRACKING_PUBLISH = "tracking:publish"  # edge devices: /ws/detections
    # Operators: each service instance's readiness (its failures name hosts and databases).
    SYSTEM_READ = "system:read"


class Identity(StrEnum):
    """The claims that bind a producer's token to what it produces for."""

    DEVICE = "device"  # phones and drones: /ws/phone, /ws/video
    VIN = "vin"  # vehicle loggers: uploads, the control socket


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    scopes: frozenset[str]
    anonymous: bool
    # The token's identity claims, by kind; a kind it does not name falls back to the subject.
    identities: tuple[tuple[Identity, frozenset[str]], ...] = ()

    def speaks_for(self, kind: Identity, name: str) -> bool:
        """Whether this token may produce as `name` (a device id, a VIN).

        An anonymous caller is bound to nothing, so it speaks for nobody: where the anonymous
        scopes let it publish at all, it may never displace a producer that does.
        """
        if self.anonymous:
            return False
        for claimed_kind, names in self.identities:
            if claimed_kind is kind:
                return name in names
        return name == self.subject


class AuthError(Exception):
    """A refused caller: 401 when unauthenticated, 403 when not allowed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def response(self) -> Response:
        """The refusal as an HTTP answer (also a refused WebSocket upgrade's)."""
        if self.status == 401:
            error = ErrorObject(code="unauthorized", reason=self.reason)
            return error.response(401, headers={"WWW-Authenticate": "Bearer"})
        return ErrorObject(code="forbidden", reason=self.reason).response(self.status)


# Verified tokens remembered, at most: a logger or a dashboard sends the same token with every
# request, and checking its signature again cost ~50 us of the gateway's CPU each time.
VERIFIED_CACHE_SIZE = 4096


class _Verified(NamedTuple):
    principal: Principal
    expires: float  # the token's `exp`
    not_before: float  # its `nbf`, or 0


class Verifier:
    """Verifies tokens with the configured keys (HS256 secret, PEM key, or JWKS file).

    A token that verified is remembered, by its whole text (signature included, so no other
    string matches it), until its `exp`; it is accepted again without decoding only while the
    clock is within its `nbf` and `exp`. The oldest remembered token makes room for a new one.
    """

    def __init__(self, settings: GatewaySettings) -> None:
        self._verified: dict[str, _Verified] = {}
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer
        self.anonymous_scopes = settings.anonymous_scopes
        self._secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        self._public_key = (
            settings.jwt_public_key_file.read_text() if settings.jwt_public_key_file else None
        )
        self._jwks: dict[str, Any] = {}
        if settings.jwks_file:
            jwks = jwt.PyJWKSet.from_json(settings.jwks_file.read_text())
            self._jwks = {key.key_id: key for key in jwks.keys if key.key_id}

    def _key_for(self, token: str) -> tuple[Any, list[str]]:
        header = jwt.get_unverified_header(token)
        algorithm, key_id = header.get("alg", ""), header.get("kid", "")
        if not isinstance(algorithm, str) or not isinstance(key_id, str):
            raise jwt.InvalidTokenError("the header's alg and kid must be strings")
        if algorithm.startswith("HS"):
            if self._secret is None:
                raise jwt.InvalidTokenError("shared-secret tokens are not accepted here")
            return self._secret, ["HS256", "HS384", "HS512"]
        if self._jwks:
            key = self._jwks.get(key_id)
            if key is None:
                raise jwt.InvalidTokenError("unknown key id")
            return key.key, [key.algorithm_name]
        if self._public_key is not None:
            return self._public_key, ["RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA"]
        raise jwt.InvalidTokenError("no key accepts this token")

    def verify(self, token: str | None) -> Principal:
        if not token:
            return Principal(subject="anonymous", scopes=self.anonymous_scopes, anonymous=True)
        known = self._verified.get(token)
        if known is not None:
            if known.not_before <= time.time() < known.expires:
                return known.principal
            del self._verified[token]  # expired: decoding it again says so
        principal, expires, not_before = self._decode(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = _Verified(principal, expires, not_before)
        return principal

    def _decode(self, token: str) -> tuple[Principal, float, float]:
        try:
            key, algorithms = self._key_for(token)
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(401, f"invalid token: {_explain(exc)}. {HOW_TO_AUTHENTICATE}") from None
        scopes = claims.get("scope", "")
        if not isinstance(scopes, str):
            raise AuthError(401, "invalid token: scope must be a space-separated string")
        principal = Principal(
            subject=str(claims["sub"]),
            scopes=frozenset(scopes.split()),
            anonymous=False,
            identities=_identities(claims),
        )
        return principal, float(claims["exp"]), float(claims.get("nbf", 0))


def _identities(claims: dict[str, Any]) -> tuple[tuple[Identity, frozenset[str]], ...]:
    found: list[tuple[Identity, frozenset[str]]] = []
    for kind in Identity:
        value = claims.get(kind.value)
        if value is None:
            continue
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise AuthError(401, f"invalid token: {kind.value} must be a string or a list of them")
        # VINs are compared as the wire writes them: trimmed, in capitals.
        if kind is Identity.VIN:
            names = [n.strip().upper() for n in names]
        found.append((kind, frozenset(names)))
    return tuple(found)


# Where a caller that was refused for want of a token gets one.
HOW_TO_AUTHENTICATE = (
    "Get a token with `edgeway-token --subject <you> --scope <scope>` (make run's banner prints "
    "an operator's)"
)


def _explain(error: jwt.PyJWTError) -> str:
    """PyJWT's reason in a caller's words ("Not enough segments" means: not a JWT at all)."""
    match error:
        case jwt.ExpiredSignatureError():
            return "it has expired"
        case jwt.ImmatureSignatureError():
            return "it is not valid yet (nbf or iat in the future)"
        case jwt.InvalidAudienceError():
            return "it was issued for another audience"
        case jwt.InvalidIssuerError():
            return "it was issued by another issuer"
        case jwt.MissingRequiredClaimError():
            return f"it has no {error.claim} claim"
        case jwt.InvalidSignatureError():
            return "its signature does not match this gateway's keys"
        case jwt.InvalidAlgorithmError():
            return "it is signed with an algorithm this gateway does not accept"
        case jwt.DecodeError():
            return "it is not a JWT (three base64url parts joined by dots)"
    return str(error)


def token_from(connection: HTTPConnection) -> str | None:
    """The bearer token of the `Authorization` header, else of the `token` query parameter.

    A header with another scheme, or none, is refused rather than taken as no token at all.
    """
    header = connection.headers.get("authorization", "").strip()
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            raise AuthError(
                401,
                "the Authorization header must be 'Bearer <token>' "
                f"(it has {'no scheme' if not token else f'the scheme {scheme[:20]!r}'})",
            )
        if not token.strip():
            raise AuthError(401, f"the Authorization header holds no token. {HOW_TO_AUTHENTICATE}")
        return token.strip()
    return connection.query_params.get("token") or None


def authorize(verifier: Verifier, connection: HTTPConnection, scope: Scope) -> Principal:
    """The caller if it holds `scope`; raises AuthError (401/403) otherwise."""
    principal = verifier.verify(token_from(connection))
    if scope not in principal.scopes:
        if principal.anonymous:
            raise AuthError(
                401,
                f"a token with scope {scope} is required, as 'Authorization: Bearer <token>' or "
                f"?token=. {HOW_TO_AUTHENTICATE.replace('<scope>', scope)}",
            )
        raise AuthError(403, f"the token lacks scope {scope}")
    return principal


def check_origin(settings: GatewaySettings, connection: HTTPConnection) -> None:
    """Browsers send Origin on WebSocket upgrades; only allowlisted pages may connect, and the
    gateway's own pages (the web console, whose origin is the host it asked)."""
    origin = connection.headers.get("origin")
    if origin is None or "*" in settings.allowed_origins or origin in settings.allowed_origins:
        return
    if origin in (
        f"http://{connection.headers.get('host')}",
        f"https://{connection.headers.get('host')}",
    ):
        return
    raise AuthError(403, f"origin {origin} is not allowed")

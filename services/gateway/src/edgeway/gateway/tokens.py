"""`edgeway-token`: mint a token for a producer, a client or an operator.

    edgeway-token --subject camera-flint --scope occupancy:publish --ttl 30d
    edgeway-token --subject phone-1 --scope video:publish --device phone-1 --ttl 30d
    edgeway-token --subject truck-7 --scope telemetry:publish --vin 5YJ3E1EA1KF000001 --ttl 30d
    edgeway-token --subject ops --scope occupancy:subscribe --private-key key.pem --kid k1

With no key file it signs with EDGEWAY_JWT_SECRET (or the development secret in development:
EDGEWAY_ENVIRONMENT=development, as make run's gateway runs).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from pydantic import ValidationError

from edgeway.gateway.auth import Scope
from edgeway.gateway.settings import GatewaySettings

SCOPES = tuple(scope.value for scope in Scope)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
DEFAULT_TTL = "1h"


def parse_ttl(text: str) -> int:
    """'3600', '90m', '12h', '30d', '2w', '1y' to seconds; ValueError saying why otherwise."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    if not number.isdigit() or int(number) == 0:
        raise ValueError(
            f"lifetime {text!r}: a positive whole number, optionally followed by one of "
            f"{', '.join(_UNITS)} (seconds, minutes, hours, days, weeks, years)"
        )
    return int(number) * _UNITS[unit]


def _ttl(text: str) -> int:
    try:
        return parse_ttl(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _scope(text: str) -> str:
    if text not in SCOPES:
        hint = " (one scope per --scope)" if "," in text or " " in text else ""
        raise argparse.ArgumentTypeError(
            f"unknown scope {text!r}{hint}; the scopes are: {', '.join(SCOPES)}"
        )
    return text


def mint(
    *,
    subject: str,
    scopes: list[str],
    ttl: int,
    key: Any,
    algorithm: str,
    audience: str,
    issuer: str,
    kid: str | None = None,
    identities: dict[str, list[str]] | None = None,
) -> str:
    """A signed token; `identities` adds the `device` and `vin` claims that bind a producer."""
    now = int(time.time())
    claims: dict[str, Any] = {
        **(identities or {}),
        "sub": subject,
        "scope": " ".join(scopes),
        "aud": audience,
        "iss": issuer,
        "iat": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
    }
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def mint_with_secret(
    secret: str,
    *scopes: str,
    subject: str,
    ttl: int,
    device: list[str] | None = None,
    vin: list[str] | None = None,
) -> str:
    """An HS256 token for a gateway that verifies with the shared secret `secret` and the default
    audience and issuer: how tests and local stacks, started with EDGEWAY_JWT_SECRET, get one."""
    defaults = GatewaySettings.model_fields
    return mint(
        subject=subject,
        identities=_identities(device, vin),
        scopes=list(scopes),
        ttl=ttl,
        key=secret,
        algorithm="HS256",
        audience=defaults["jwt_audience"].default,
        issuer=defaults["jwt_issuer"].default,
    )


def _identities(device: list[str] | None, vin: list[str] | None) -> dict[str, list[str]]:
    found = {"device": device, "vin": vin}
    return {claim: names for claim, names in found.items() if names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="edgeway-token",
        description=__doc__.split("\n")[0],
        epilog=f"scopes: {', '.join(SCOPES)}",
    )
    parser.add_argument("--subject", required=True, help="who the token is for")
    parser.add_argument(
        "--scope",
        action="append",
        required=True,
        type=_scope,
        metavar="SCOPE",
        help="one of the scopes below; repeat for each",
    )
    parser.add_argument(
        "--ttl",
        default=DEFAULT_TTL,
        type=_ttl,
        help=f"lifetime: seconds, or 90m, 12h, 30d, 2w, 1y (default {DEFAULT_TTL})",
    )
    parser.add_argument("--private-key", type=Path, help="PEM private key (RS256/ES256/EdDSA)")
    parser.add_argument("--algorithm", default=None, help="default HS256, or RS256 with a key")
    parser.add_argument("--kid", default=None, help="key id, for JWKS verification")
    parser.add_argument(
        "--device", action="append", help="a phone this token streams as (repeat; default: subject)"
    )
    parser.add_argument(
        "--vin", action="append", help="a vehicle this token uploads for (repeat; default: subject)"
    )
    args = parser.parse_args(argv)

    try:
        settings = GatewaySettings()
    except ValidationError as exc:
        reasons = "; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors())
        parser.error(
            f"{reasons}. For the local stack of make run (the development profile, whose secret "
            "is built in): EDGEWAY_ENVIRONMENT=development edgeway-token ..."
        )
    if args.private_key:
        key: Any = args.private_key.read_text()
        algorithm = args.algorithm or "RS256"
    elif settings.jwt_secret:
        key = settings.jwt_secret.get_secret_value()
        algorithm = args.algorithm or "HS256"
    else:
        parser.error("no signing key: pass --private-key or set EDGEWAY_JWT_SECRET")
    token = mint(
        subject=args.subject,
        scopes=args.scope,
        ttl=args.ttl,
        key=key,
        algorithm=algorithm,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        kid=args.kid,
        identities=_identities(args.device, args.vin),
    )
    sys.stdout.write(token + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

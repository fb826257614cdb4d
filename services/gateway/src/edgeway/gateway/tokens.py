"""`edgeway-token`: mint a token for a producer, a client or an operator.

    edgeway-token --subject camera-flint --scope occupancy:publish --ttl 30d
    edgeway-token --subject phone-1 --scope video:publish --device phone-1 --ttl 30d
    edgeway-token --subject truck-7 --scope telemetry:publish --vin 5YJ3E1EA1KF000001 --ttl 30d
    edgeway-token --subject ops --scope occupancy:subscribe --private-key key.pem --kid k1

With no key file it signs with EDGEWAY_JWT_SECRET (or the development secret in development).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jwt

from edgeway.gateway.settings import GatewaySettings

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """'3600', '90m', '12h', '30d' to seconds."""
    if text[-1:] in _UNITS:
        return int(text[:-1]) * _UNITS[text[-1]]
    return int(text)


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
    parser = argparse.ArgumentParser(prog="edgeway-token", description=__doc__.split("\n")[0])
    parser.add_argument("--subject", required=True, help="who the token is for")
    parser.add_argument("--scope", action="append", required=True, help="repeat for each scope")
    parser.add_argument("--ttl", default="1h", help="lifetime: seconds or 90m, 12h, 30d")
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

    settings = GatewaySettings()
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
        ttl=parse_ttl(args.ttl),
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

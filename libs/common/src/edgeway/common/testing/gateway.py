"""The gateway in connected tests: tokens it takes, and a fixture that runs it as a process.

`gateway_fixture(**env)` starts `python -m edgeway.gateway` on the session's RabbitMQ virtual
host, verifying tokens with `TEST_SECRET`; `make_token(*scopes, **claims)` mints one for it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import jwt
import pytest

from edgeway.common.testing.processes import ServiceProcess, free_port

# The shared secret of every test gateway (EDGEWAY_JWT_SECRET); long enough for HS256.
TEST_SECRET = "edgeway-test-gateway-secret-that-is-long-enough-for-hs256"  # noqa: S105
# The gateway's default audience and issuer (`GatewaySettings`; a gateway test holds them equal).
AUDIENCE = "edgeway"
ISSUER = "edgeway"
# A day: a module-level token must outlive the longest test run.
TOKEN_TTL_S = 86_400


def make_token(
    *scopes: str,
    subject: str = "test",
    ttl: int = TOKEN_TTL_S,
    secret: str = TEST_SECRET,
    **claims: Any,
) -> str:
    """An HS256 token with `scopes` for a gateway that verifies with `secret`. `claims` adds
    claims such as `device=[...]` or `vin=[...]` (the producer bindings); None ones are left out."""
    now = int(time.time())
    payload = {name: value for name, value in claims.items() if value is not None}
    payload.update(
        sub=subject,
        scope=" ".join(scopes),
        aud=AUDIENCE,
        iss=ISSUER,
        iat=now,
        exp=now + ttl,
        jti=uuid.uuid4().hex,
    )
    return jwt.encode(payload, secret, algorithm="HS256")


def bearer(*scopes: str, **claims: Any) -> dict[str, str]:
    """An Authorization header with `make_token(*scopes, **claims)`."""
    return {"Authorization": f"Bearer {make_token(*scopes, **claims)}"}


def start_gateway(amqp_url: str, log_dir: Path, **env: str) -> ServiceProcess:
    """A gateway process on `amqp_url` that verifies tokens with `TEST_SECRET`, ready (its
    /readyz answered), with `env` on top."""
    process = ServiceProcess(
        "edgeway.gateway",
        env={
            "EDGEWAY_AMQP_URL": amqp_url,
            "EDGEWAY_JWT_SECRET": TEST_SECRET,
            **env,
        },
        port=free_port(),
        log_path=log_dir / "gateway.log",
    )
    return process.start()


def gateway_fixture(
    *, scope: Literal["session", "module", "function"] = "module", **env: str
) -> Callable[..., Iterator[ServiceProcess]]:
    """A pytest fixture (assign it to a module-level name) that runs one gateway for its
    `scope` with `env` (`start_gateway`) and stops it after."""

    @pytest.fixture(scope=scope)
    def gateway(
        amqp_url: str, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[ServiceProcess]:
        process = start_gateway(amqp_url, tmp_path_factory.mktemp("gateway"), **env)
        try:
            yield process
        finally:
            process.stop()

    return gateway

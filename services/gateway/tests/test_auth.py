"""Token verification, scopes and settings that fail closed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError
from starlette.requests import HTTPConnection

from edgeway.common.testing import TEST_SECRET, make_token
from edgeway.common.testing.gateway import AUDIENCE, ISSUER
from edgeway.gateway.auth import AuthError, Identity, Scope, Verifier, authorize, check_origin
from edgeway.gateway.settings import DEVELOPMENT_SECRET, GatewaySettings
from edgeway.gateway.tokens import main as token_main
from edgeway.gateway.tokens import mint, parse_ttl

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def settings(**overrides: object) -> GatewaySettings:
    return GatewaySettings(**{"jwt_secret": SECRET, **overrides})  # type: ignore[arg-type]


def token(
    scopes: list[str], *, key: object = SECRET, algorithm: str = "HS256", **kw: object
) -> str:
    return mint(
        subject="tester",
        scopes=scopes,
        ttl=int(kw.pop("ttl", 60)),  # type: ignore[call-overload]
        key=key,
        algorithm=algorithm,
        audience=str(kw.pop("audience", "edgeway")),
        issuer=str(kw.pop("issuer", "edgeway")),
        kid=kw.pop("kid", None),  # type: ignore[arg-type]
    )


def connection(*, headers: dict[str, str] | None = None, query: str = "") -> HTTPConnection:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return HTTPConnection({"type": "http", "headers": raw, "query_string": query.encode()})


def test_bearer_header_and_query_parameter_both_work() -> None:
    verifier = Verifier(settings())
    good = token([Scope.OCCUPANCY_PUBLISH])
    by_header = authorize(
        verifier, connection(headers={"Authorization": f"Bearer {good}"}), Scope.OCCUPANCY_PUBLISH
    )
    by_query = authorize(verifier, connection(query=f"token={good}"), Scope.OCCUPANCY_PUBLISH)
    assert by_header.subject == by_query.subject == "tester"
    assert not by_header.anonymous


def test_publish_and_subscribe_are_separate_scopes() -> None:
    verifier = Verifier(settings())
    publish_only = connection(query=f"token={token([Scope.OCCUPANCY_PUBLISH])}")
    with pytest.raises(AuthError) as refused:
        authorize(verifier, publish_only, Scope.OCCUPANCY_SUBSCRIBE)
    assert refused.value.status == 403
    assert "occupancy:subscribe" in refused.value.reason


def test_no_token_is_401_unless_the_scope_is_granted_anonymously() -> None:
    with pytest.raises(AuthError) as refused:
        authorize(Verifier(settings()), connection(), Scope.OCCUPANCY_PUBLISH)
    assert refused.value.status == 401
    open_publish = Verifier(settings(anonymous_scopes={"occupancy:publish"}))
    principal = authorize(open_publish, connection(), Scope.OCCUPANCY_PUBLISH)
    assert principal.anonymous
    with pytest.raises(AuthError):
        authorize(open_publish, connection(), Scope.OCCUPANCY_SUBSCRIBE)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (lambda: token(["occupancy:publish"], key="another-secret-that-is-long-enough!!"), "sig"),
        (lambda: token(["occupancy:publish"], ttl=-10), "expired"),
        (lambda: token(["occupancy:publish"], audience="someone-else"), "audience"),
        (lambda: token(["occupancy:publish"], issuer="someone-else"), "issuer"),
        (lambda: "not-a-jwt", "garbage"),
    ],
)
def test_invalid_tokens_are_401(bad: object, why: str) -> None:
    with pytest.raises(AuthError) as refused:
        authorize(
            Verifier(settings()),
            connection(query=f"token={bad()}"),
            Scope.OCCUPANCY_PUBLISH,  # type: ignore[operator]
        )
    assert refused.value.status == 401, why
    assert "edgeway-token" in refused.value.reason  # and how to get a good one


@pytest.mark.parametrize(
    ("header", "said"),
    [
        ("not-a-jwt", "must be 'Bearer <token>' (it has no scheme)"),
        ("Basic dXNlcjpwYXNz", "the scheme 'Basic'"),
        ("Bearer   ", "holds no token"),
    ],
)
def test_an_authorization_header_that_is_not_a_bearer_token_is_said_so(
    header: str, said: str
) -> None:
    # Not "a token is required", as if nothing had been sent.
    with pytest.raises(AuthError) as refused:
        authorize(
            Verifier(settings()), connection(headers={"Authorization": header}), Scope.VIDEO_PUBLISH
        )
    assert refused.value.status == 401
    assert said in refused.value.reason


def test_reasons_are_in_plain_words() -> None:
    verifier = Verifier(settings())
    cases = {
        "not-a-jwt": "it is not a JWT",
        token(["x"], ttl=-10): "it has expired",
        token(["x"], audience="other"): "another audience",
        token(["x"], key="another-secret-that-is-long-enough!!"): "signature does not match",
    }
    for bad, said in cases.items():
        with pytest.raises(AuthError) as refused:
            verifier.verify(bad)
        assert said in refused.value.reason
        assert "segments" not in refused.value.reason
    with pytest.raises(AuthError) as missing:
        authorize(verifier, connection(), Scope.VIDEO_PUBLISH)
    assert "edgeway-token --subject <you> --scope video:publish" in missing.value.reason


def test_a_remembered_token_is_still_refused_once_it_expires() -> None:
    verifier = Verifier(settings())
    # 2 s: `exp` is whole seconds, so a 1 s token minted late in a second may expire at once.
    short = token(["occupancy:publish"], ttl=2)
    assert verifier.verify(short).scopes == {"occupancy:publish"}
    assert verifier.verify(short).scopes == {"occupancy:publish"}  # remembered
    expires = jwt.decode(short, options={"verify_signature": False})["exp"]
    time.sleep(max(expires - time.time(), 0) + 0.05)
    with pytest.raises(AuthError) as refused:
        verifier.verify(short)
    assert refused.value.status == 401
    assert "expired" in refused.value.reason


def test_only_the_exact_token_that_verified_is_remembered() -> None:
    verifier = Verifier(settings())
    good = token(["occupancy:publish"])
    verifier.verify(good)
    header, payload, signature = good.split(".")
    forged = f"{header}.{payload}.{signature[::-1]}"  # the same claims, another signature
    with pytest.raises(AuthError) as refused:
        verifier.verify(forged)
    assert refused.value.status == 401


def test_alg_none_is_refused() -> None:
    now = int(time.time())
    unsigned = jwt.encode(
        {
            "sub": "x",
            "scope": "occupancy:publish",
            "aud": "edgeway",
            "iss": "edgeway",
            "exp": now + 60,
        },
        None,
        algorithm="none",
    )
    with pytest.raises(AuthError):
        authorize(
            Verifier(settings()), connection(query=f"token={unsigned}"), Scope.OCCUPANCY_PUBLISH
        )


def test_rsa_public_key_file(tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "key.pub").write_bytes(public_pem)
    verifier = Verifier(
        GatewaySettings(environment="production", jwt_public_key_file=tmp_path / "key.pub")  # type: ignore[arg-type]
    )
    good = token([Scope.OCCUPANCY_SUBSCRIBE], key=private, algorithm="RS256")
    assert authorize(verifier, connection(query=f"token={good}"), Scope.OCCUPANCY_SUBSCRIBE)
    # A shared-secret token is not accepted where only the asymmetric key is configured.
    forged = token([Scope.OCCUPANCY_SUBSCRIBE], key=SECRET, algorithm="HS256")
    with pytest.raises(AuthError):
        authorize(verifier, connection(query=f"token={forged}"), Scope.OCCUPANCY_SUBSCRIBE)


def test_jwks_file_picks_the_key_by_kid(tmp_path: Path) -> None:
    keys = {kid: ec.generate_private_key(ec.SECP256R1()) for kid in ("k1", "k2")}
    jwks = {
        "keys": [
            {
                **json.loads(jwt.algorithms.ECAlgorithm.to_jwk(k.public_key())),
                "kid": kid,
                "alg": "ES256",
            }
            for kid, k in keys.items()
        ]
    }
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    verifier = Verifier(
        GatewaySettings(environment="production", jwks_file=tmp_path / "jwks.json")  # type: ignore[arg-type]
    )
    for kid, key in keys.items():
        good = token([Scope.OCCUPANCY_PUBLISH], key=key, algorithm="ES256", kid=kid)
        assert authorize(verifier, connection(query=f"token={good}"), Scope.OCCUPANCY_PUBLISH)
    wrong_kid = token([Scope.OCCUPANCY_PUBLISH], key=keys["k1"], algorithm="ES256", kid="k2")
    with pytest.raises(AuthError):
        authorize(verifier, connection(query=f"token={wrong_kid}"), Scope.OCCUPANCY_PUBLISH)


def test_secrets_fail_closed_outside_development() -> None:
    with pytest.raises(ValidationError, match="no token keys"):
        GatewaySettings(environment="production")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="development JWT secret"):
        GatewaySettings(environment="staging", jwt_secret=DEVELOPMENT_SECRET)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="at least 32"):
        GatewaySettings(environment="production", jwt_secret="short")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="refused outside development"):
        GatewaySettings(environment="production", jwt_secret=SECRET, allowed_origins={"*"})  # type: ignore[arg-type]
    development = GatewaySettings()
    assert development.jwt_secret is not None


def test_a_process_that_says_nothing_is_production(monkeypatch: pytest.MonkeyPatch) -> None:
    # An image started without EDGEWAY_ENVIRONMENT must not accept development-secret tokens.
    monkeypatch.delenv("EDGEWAY_ENVIRONMENT", raising=False)
    with pytest.raises(ValidationError, match="no token keys"):
        GatewaySettings()
    production = GatewaySettings(jwt_secret=SECRET)  # type: ignore[arg-type]
    assert (production.environment, production.docs_enabled) == ("production", False)
    assert production.internal_metrics_port is not None


def test_a_header_whose_alg_or_kid_is_not_a_string_is_401() -> None:
    verifier = Verifier(settings())
    good = token([Scope.OCCUPANCY_PUBLISH])
    _, payload, signature = good.split(".")
    for header in ({"alg": ["HS256"], "typ": "JWT"}, {"alg": 5}, {"alg": "HS256", "kid": {}}):
        encoded = jwt.utils.base64url_encode(json.dumps(header).encode()).decode()
        with pytest.raises(AuthError) as refused:
            verifier.verify(f"{encoded}.{payload}.{signature}")
        assert refused.value.status == 401
        assert "must be" in refused.value.reason


def test_identity_claims_bind_a_producer() -> None:
    verifier = Verifier(settings())
    phone = verifier.verify(
        mint(
            subject="ops",
            scopes=["video:publish"],
            ttl=60,
            key=SECRET,
            algorithm="HS256",
            audience="edgeway",
            issuer="edgeway",
            identities={"device": ["phone-1", "drone-2"], "vin": ["5yj3e1ea1kf000001 "]},
        )
    )
    assert phone.speaks_for(Identity.DEVICE, "drone-2")
    assert not phone.speaks_for(Identity.DEVICE, "ops")  # a claim replaces the subject
    assert phone.speaks_for(Identity.VIN, "5YJ3E1EA1KF000001")
    by_subject = verifier.verify(token(["video:publish"]))
    assert by_subject.speaks_for(Identity.DEVICE, "tester")
    assert not by_subject.speaks_for(Identity.DEVICE, "phone-1")
    anonymous = Verifier(settings(anonymous_scopes={"video:publish"})).verify(None)
    assert not anonymous.speaks_for(Identity.DEVICE, "anonymous")
    bad = mint(
        subject="x",
        scopes=[],
        ttl=60,
        key=SECRET,
        algorithm="HS256",
        audience="edgeway",
        issuer="edgeway",
        identities={"device": [1, 2]},  # type: ignore[list-item]
    )
    with pytest.raises(AuthError, match="device must be a string"):
        verifier.verify(bad)


def test_origin_allowlist() -> None:
    allowed = settings(allowed_origins={"https://dash.example"})
    check_origin(allowed, connection(headers={"Origin": "https://dash.example"}))
    check_origin(allowed, connection())  # not a browser: no Origin, the token decides
    with pytest.raises(AuthError) as refused:
        check_origin(allowed, connection(headers={"Origin": "https://evil.example"}))
    assert refused.value.status == 403


def test_the_gateways_own_pages_may_connect() -> None:
    """The web console is served by the gateway: its origin is the host it asked."""
    nobody = settings()
    own = {"Host": "gw.example:8000", "Origin": "http://gw.example:8000"}
    check_origin(nobody, connection(headers=own))
    with pytest.raises(AuthError) as refused:
        check_origin(nobody, connection(headers={**own, "Origin": "http://evil.example:8000"}))
    assert refused.value.status == 403


def test_token_command_mints_a_verifiable_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGEWAY_JWT_SECRET", SECRET)
    assert token_main(["--subject", "cam-1", "--scope", "occupancy:publish", "--ttl", "2h"]) == 0
    minted = capsys.readouterr().out.strip()
    principal = Verifier(settings()).verify(minted)
    assert principal.subject == "cam-1"
    assert principal.scopes == {"occupancy:publish"}
    claims = jwt.decode(minted, options={"verify_signature": False})
    assert 7100 < claims["exp"] - claims["iat"] <= 7200
    assert "vin" not in claims
    args = ["--subject", "truck", "--scope", "telemetry:publish", "--vin", "5YJ3E1EA1KF000001"]
    assert token_main([*args, "--vin", "5YJ3E1EA1KF000002"]) == 0
    bound = Verifier(settings()).verify(capsys.readouterr().out.strip())
    assert bound.speaks_for(Identity.VIN, "5YJ3E1EA1KF000002")
    assert not bound.speaks_for(Identity.VIN, "truck")


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--scope", "ingest:reed"], "unknown scope 'ingest:reed'"),
        (["--scope", "ingest:read,ingest:write"], "one scope per --scope"),
        (["--scope", "ingest:read", "--ttl", "5q"], "lifetime '5q'"),
        (["--scope", "ingest:read", "--ttl", "0"], "positive whole number"),
    ],
)
def test_the_token_command_refuses_what_would_mint_a_useless_token(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    said: str,
) -> None:
    monkeypatch.setenv("EDGEWAY_JWT_SECRET", SECRET)
    with pytest.raises(SystemExit) as refused:
        token_main(["--subject", "me", *args])
    assert refused.value.code == 2
    error = capsys.readouterr().err
    assert said in error
    assert "ingest:read" in error or "lifetime" in error or "whole number" in error


def test_the_token_command_says_how_to_sign_without_a_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGEWAY_ENVIRONMENT", "production")
    monkeypatch.delenv("EDGEWAY_JWT_SECRET", raising=False)
    with pytest.raises(SystemExit):
        token_main(["--subject", "me", "--scope", "ingest:read"])
    assert "EDGEWAY_ENVIRONMENT=development" in capsys.readouterr().err


def test_parse_ttl() -> None:
    assert parse_ttl("90") == 90
    assert parse_ttl("15m") == 900
    assert parse_ttl("30d") == 30 * 86400
    assert parse_ttl("5y") == 5 * 365 * 86400  # was a traceback


def test_the_tests_tokens_are_what_the_gateway_takes() -> None:
    """`edgeway.common.testing.make_token` mints for the gateway's default audience and issuer,
    with the claims that bind a producer."""
    defaults = GatewaySettings.model_fields
    assert (defaults["jwt_audience"].default, defaults["jwt_issuer"].default) == (AUDIENCE, ISSUER)
    verifier = Verifier(settings(jwt_secret=TEST_SECRET))
    phone = verifier.verify(make_token("video:publish", subject="p", device=["cam-a"]))
    assert (phone.subject, phone.scopes) == ("p", frozenset({"video:publish"}))
    assert phone.speaks_for(Identity.DEVICE, "cam-a")
    assert not phone.speaks_for(Identity.DEVICE, "cam-b")
    with pytest.raises(AuthError):
        verifier.verify(make_token("video:publish", secret=SECRET))  # another gateway's secret

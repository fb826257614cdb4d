"""The settings of a service that reads RTSP cameras, for its settings class to derive from."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator, model_validator

from edgeway.common.rtsp.credentials import check_key
from edgeway.common.rtsp.destinations import DEFAULT_DESTINATIONS, parse_rule
from edgeway.common.settings import CommonSettings


class RtspSettings(CommonSettings):
    """Where a camera connection may go and the key that seals camera URLs at rest."""

    # Where a connection may go (destinations.py): entries HOST[:PORTS]. HOST is '*' or a host
    # name ('*.example.com' too), which admit public addresses only, or an address or CIDR
    # network, which admit any address inside it: the only way to loopback and private ranges.
    # PORTS: 554, 8554-8560 or '*' (the default). The default: public cameras on the RTSP ports.
    rtsp_allowed_destinations: list[str] = Field(default_factory=lambda: list(DEFAULT_DESTINATIONS))
    # Fernet key (urlsafe base64, 32 bytes) sealing RTSP URLs with credentials at rest. In
    # development a key is made once and kept in the data directory; elsewhere it must be set,
    # the same on every replica (any replica may open a URL another sealed).
    credentials_key: SecretStr | None = None

    @field_validator("credentials_key")
    @classmethod
    def _a_fernet_key(cls, value: SecretStr | None) -> SecretStr | None:
        return check_key(value, setting="EDGEWAY_CREDENTIALS_KEY")

    @field_validator("rtsp_allowed_destinations")
    @classmethod
    def _destinations(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_rule(entry)  # a ValueError says which entry and what is wrong with it
        return value

    @model_validator(mode="after")
    def _key_outside_development(self) -> RtspSettings:
        if self.credentials_key is None and not self.is_development:
            raise ValueError(
                "EDGEWAY_CREDENTIALS_KEY must be set outside development (a Fernet key: "
                "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key())')"
            )
        return self

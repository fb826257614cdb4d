"""RTSP URLs at rest: the whole URL sealed with Fernet, the masked form
(`capture.mask_credentials`) for people and logs.

The seed kept camera passwords in plain text. Here a URL's credentials exist in clear only in
the memory of the worker that connects: a service stores `rtsp://***@host/path` for reading and
the full URL encrypted (AES-128-CBC + HMAC-SHA256, cryptography's Fernet).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from pydantic import SecretStr


class CredentialCipher:
    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    def seal(self, url: str) -> str:
        return self._fernet.encrypt(url.encode()).decode("ascii")

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode()
        except InvalidToken:
            raise ValueError(
                "sealed URL does not open with this key (was the key changed?)"
            ) from None


def check_key(value: SecretStr | None, *, setting: str) -> SecretStr | None:
    """A settings validator's check: `value` is a Fernet key (or unset)."""
    if value is not None:
        try:
            Fernet(value.get_secret_value().encode())
        except ValueError:
            raise ValueError(
                f"{setting} is not a Fernet key (32 url-safe base64-encoded bytes)"
            ) from None
    return value


def credentials_key(configured: SecretStr | None, development_file: Path) -> bytes:
    """The configured key, or (development) one made once and kept in `development_file`."""
    if configured is not None:
        return configured.get_secret_value().encode()
    return _development_key(development_file)


def _development_key(path: Path) -> bytes:
    if path.exists():
        return _read_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole beside it (readable by this user only), then linked into place: the link
    # fails if another starting replica got there first, and nobody ever reads a partial key.
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".key-")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(Fernet.generate_key())
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        os.unlink(temporary)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    key = path.read_bytes().strip()
    try:
        Fernet(key)
    except ValueError:
        raise ValueError(
            f"{path} does not hold a Fernet key; delete it to make a new one"
        ) from None
    return key

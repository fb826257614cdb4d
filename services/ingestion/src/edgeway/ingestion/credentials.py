"""RTSP URLs at rest: the masked form for reading (`capture.mask_credentials`), the whole URL
sealed with Fernet.

The seed kept camera passwords in plain text. Here a URL's credentials exist in clear only in the
capture's memory: the row keeps `rtsp://***@host/path` for people and logs, and the full URL
encrypted (AES-128-CBC + HMAC-SHA256, cryptography's Fernet) for the worker that connects.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from edgeway.ingestion.settings import IngestionSettings

KEY_FILE = "ingestion-credentials.key"


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


def load_cipher(settings: IngestionSettings) -> CredentialCipher:
    """The configured key, or in development one made once and kept in the data directory."""
    if settings.credentials_key is not None:
        return CredentialCipher(settings.credentials_key.get_secret_value().encode())
    path = settings.data_dir / KEY_FILE
    return CredentialCipher(_development_key(path))


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

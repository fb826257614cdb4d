"""RTSP URLs at rest: the masked form for reading (`capture.mask_credentials`), the whole URL
sealed with Fernet.

The seed kept camera passwords in plain text. Here a URL's credentials exist in clear only in the
capture's memory: the row keeps `rtsp://***@host/path` for people and logs, and the full URL
encrypted (AES-128-CBC + HMAC-SHA256, cryptography's Fernet) for the worker that connects.
"""

from __future__ import annotations

import os
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
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    # Readable by this user only; created exclusively so two starting replicas cannot disagree.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as file:
        file.write(key)
    return key

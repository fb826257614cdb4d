"""The ingestion service's secrets: the key that seals RTSP URLs at rest
(`edgeway.common.rtsp.credentials`), and the secret that signs the local store's object URLs,
derived from it.

The seed kept camera passwords in plain text. Here a URL's credentials exist in clear only in the
capture's memory: the row keeps `rtsp://***@host/path` for people and logs, and the full URL
encrypted (AES-128-CBC + HMAC-SHA256, cryptography's Fernet) for the worker that connects.
"""

from __future__ import annotations

import hashlib
import hmac

from edgeway.common.rtsp.credentials import CredentialCipher, credentials_key
from edgeway.ingestion.settings import IngestionSettings

KEY_FILE = "ingestion-credentials.key"


def load_cipher(settings: IngestionSettings) -> CredentialCipher:
    """The configured key, or in development one made once and kept in the data directory."""
    return CredentialCipher(_key(settings))


def object_url_secret(settings: IngestionSettings) -> bytes:
    """The key that signs the local store's object URLs: derived from the credentials key (one
    secret to keep), never the same bytes, so neither use can stand in for the other."""
    return hmac.new(_key(settings), b"edgeway-ingestion-object-urls", hashlib.sha256).digest()


def _key(settings: IngestionSettings) -> bytes:
    return credentials_key(settings.credentials_key, settings.data_dir / KEY_FILE)

"""RTSP URLs sealed at rest: only the key opens them, and a development key is made once."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr

from edgeway.common.rtsp.credentials import CredentialCipher
from edgeway.ingestion.keys import KEY_FILE, load_cipher
from edgeway.ingestion.settings import IngestionSettings

PASSWORD = "s3cret/p@ss"  # a made-up camera password
URL = "rtsp://admin:s3cret%2Fp%40ss@10.0.0.7:554/stream1"


def development(data_dir: Path) -> IngestionSettings:
    return IngestionSettings(environment="development", data_dir=data_dir, credentials_key=None)


def test_a_sealed_url_opens_to_the_same_url() -> None:
    cipher = CredentialCipher(Fernet.generate_key())
    assert cipher.open(cipher.seal(URL)) == URL


def test_the_sealed_text_never_shows_the_password() -> None:
    cipher = CredentialCipher(Fernet.generate_key())
    sealed = cipher.seal(URL)
    raw = base64.urlsafe_b64decode(sealed)
    for secret in ("s3cret", "s3cret%2Fp%40ss", PASSWORD, "admin"):
        assert secret not in sealed
        assert secret.encode() not in raw
    # Sealed twice, two texts: equal URLs cannot be spotted in the table.
    assert cipher.seal(URL) != sealed


def test_another_key_refuses_to_open() -> None:
    sealed = CredentialCipher(Fernet.generate_key()).seal(URL)
    with pytest.raises(ValueError, match="does not open with this key"):
        CredentialCipher(Fernet.generate_key()).open(sealed)


def test_a_tampered_sealed_url_is_refused() -> None:
    cipher = CredentialCipher(Fernet.generate_key())
    sealed = bytearray(base64.urlsafe_b64decode(cipher.seal(URL)))
    sealed[-40] ^= 0x01  # one bit of the ciphertext
    with pytest.raises(ValueError, match="does not open"):
        cipher.open(base64.urlsafe_b64encode(bytes(sealed)).decode())


def test_a_configured_key_is_used_and_nothing_is_written(tmp_path: Path) -> None:
    key = Fernet.generate_key()
    settings = IngestionSettings(
        environment="production", data_dir=tmp_path, credentials_key=SecretStr(key.decode())
    )
    sealed = load_cipher(settings).seal(URL)
    assert CredentialCipher(key).open(sealed) == URL
    assert not (tmp_path / KEY_FILE).exists()


def test_the_development_key_is_made_once_private_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"  # not there yet: made on first start
    sealed = load_cipher(development(data_dir)).seal(URL)

    key_file = data_dir / KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_bytes()
    # A restart (or a second replica) opens what the first one sealed, with the same key.
    assert load_cipher(development(data_dir)).open(sealed) == URL
    assert key_file.read_bytes() == key
    assert CredentialCipher(key.strip()).open(sealed) == URL


def test_a_key_file_already_there_is_used(tmp_path: Path) -> None:
    key = Fernet.generate_key()
    (tmp_path / KEY_FILE).write_bytes(key + b"\n")  # as an operator's editor leaves it
    sealed = CredentialCipher(key).seal(URL)
    assert load_cipher(development(tmp_path)).open(sealed) == URL

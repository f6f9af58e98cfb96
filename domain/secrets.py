"""Encryption at rest for webhook signing secrets.

The key is derived from DOORSTROOM_SECRET_KEY with HKDF, so the one configured secret
serves several purposes without reusing the same key material for each.
"""

from __future__ import annotations

import base64
import secrets
from functools import lru_cache

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from domain.settings import get_settings

_WEBHOOK_SECRET_INFO = b"doorstroom webhook signing secrets v1"


@lru_cache
def _fernet(secret_key: str) -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=_WEBHOOK_SECRET_INFO).derive(secret_key.encode())
    return Fernet(base64.urlsafe_b64encode(key))


def encrypt(plaintext: str) -> str:
    return _fernet(get_settings().secret_key).encrypt(plaintext.encode()).decode()


def decrypt(ciphertext: str) -> str:
    return _fernet(get_settings().secret_key).decrypt(ciphertext.encode()).decode()


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()

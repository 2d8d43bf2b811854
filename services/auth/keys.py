"""API keys: how they look, how they are stored, how a presented key is checked.

A key is `sb_<key_id>_<secret>`: a 12-hex-digit id (public, used to find the key and
to revoke it) and 32 random bytes of secret (URL-safe base64). Only the SHA-256 of the
secret is stored. A fast hash is enough because the secret is 256 random bits, not a
password: there is nothing to guess from a dictionary (the same choice GitHub and
Stripe tokens make). The comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

PREFIX = "sb"
_KEY = re.compile(r"sb_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    token: str
    """The whole key, shown once."""
    secret_hash: bytes


def new_key() -> NewKey:
    key_id = secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return NewKey(key_id, f"{PREFIX}_{key_id}_{secret}", hash_secret(secret))


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse(token: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    match = _KEY.fullmatch(token.strip())
    return (match.group(1), match.group(2)) if match else None


def matches(secret: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def presented_key(headers: dict[str, str]) -> str:
    """The key a request carries: `authorization: Bearer <key>` or `x-api-key: <key>`."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key", "").strip()

"""API keys: how they look, how they are stored, how a presented key is checked.

A key is a JSON Web Token the mesh's signing key signed (`signing`): its `jti` is the
key's 12-hex-digit id (public, used to find the key and to revoke it), `kind` says whose
it is (`tenant` or `operator`) and a tenant key's `sub` is its tenant. The edge checks
a tenant key's signature itself and takes the tenant from `sub` (see
`launcher._envoy_keys`), so a tenant's call needs no round trip to the auth service (an
operator credential has an issuer of its own, which the edge does not accept: every
operator call is checked here); it still is a key like any other:
only its SHA-256 is stored, it is shown once, and revoking it works as before.

A mesh without a signing key issues the older form, `sb_<key_id>_<secret>` (32 random
bytes of secret, URL-safe base64), which only the auth service can check; both forms
stay valid. Either way the stored hash is of the secret part (the whole token for a
JWT). A fast hash is enough because the secret is 256 random bits (or an unforgeable
signature), not a password: there is nothing to guess from a dictionary (the same
choice GitHub and Stripe tokens make). The comparison is constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass

from services.auth.signing import OPERATOR_ISSUER, SigningKey

PREFIX = "sb"
_KEY = re.compile(r"sb_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_KEY_ID = re.compile(r"[0-9a-f]{12}")
_JWT = re.compile(r"[A-Za-z0-9_-]+\.([A-Za-z0-9_-]+)\.[A-Za-z0-9_-]+")
MAX_TOKEN_CHARS = 2048
"""Longer is no key of ours (a JWT key is about 330)."""


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    token: str
    """The whole key, shown once."""
    secret_hash: bytes


def new_key(kind: str = "tenant", tenant_id: str = "", signer: SigningKey | None = None) -> NewKey:
    """A new key of `kind` (`tenant`, with its `tenant_id`, or `operator`): a token
    `signer` signs, or without one the older `sb_` form."""
    key_id = secrets.token_hex(6)
    if signer is None:
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        return NewKey(key_id, f"{PREFIX}_{key_id}_{secret}", hash_secret(secret))
    claims: dict[str, object] = {"jti": key_id, "kind": kind, "iat": int(time.time())}
    if kind == "tenant":
        claims["sub"] = tenant_id
    else:
        claims["iss"] = OPERATOR_ISSUER
    token = signer.sign(claims)
    return NewKey(key_id, token, hash_secret(token))


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse(token: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None. A JWT's signature is not
    checked here: its hash is, against the stored one (whatever signed it)."""
    token = token.strip()
    if len(token) > MAX_TOKEN_CHARS:
        return None
    if match := _KEY.fullmatch(token):
        return match.group(1), match.group(2)
    if match := _JWT.fullmatch(token):
        try:
            payload = json.loads(
                base64.urlsafe_b64decode(match.group(1) + "=" * (-len(match.group(1)) % 4))
            )
        except (ValueError, binascii.Error):
            return None
        key_id = payload.get("jti") if isinstance(payload, dict) else None
        if isinstance(key_id, str) and _KEY_ID.fullmatch(key_id):
            return key_id, token
    return None


def matches(secret: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def presented_key(headers: dict[str, str]) -> str:
    """The key a request carries: `authorization: Bearer <key>` or `x-api-key: <key>`."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key", "").strip()

"""The mesh's key-signing key: API keys are JSON Web Tokens it signs (ES256), so that the
edge can check one on its own (Envoy's `jwt_authn`, with only the public half, as a
JWKS) instead of asking the auth service about every call.

The private key is a PEM file (mode 0600) that the launcher creates once per run
directory and only the auth service reads; the control plane reads its public half to
give Envoy. The key id (`kid`) is derived from the public key, so a new signing key is
told apart from the old one, whose tokens then fail the edge's check and fall back to the
auth service's (which checks every key by its hash, whatever signed it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

logger = logging.getLogger(__name__)

ALGORITHM = "ES256"
ISSUER = "switchboard"
"""A tenant key's `iss`; the edge accepts no other."""
OPERATOR_ISSUER = "switchboard-operator"
"""An operator credential's `iss`: the edge's own check refuses it (it never sets the
headers of a call from a token it cannot let through alone), so the auth service checks
every operator call."""


class SigningKey:
    """An ES256 private key, with the JWKS of its public half."""

    def __init__(self, private: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private.curve, ec.SECP256R1):
            raise ValueError("the signing key must be an EC key on P-256 (ES256)")
        self._private = private
        public = private.public_key()
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.kid = hashlib.sha256(der).hexdigest()[:16]
        numbers = public.public_numbers()
        self._jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64(numbers.x.to_bytes(32, "big")),
            "y": _b64(numbers.y.to_bytes(32, "big")),
            "kid": self.kid,
            "alg": ALGORITHM,
            "use": "sig",
        }

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path}: not an EC private key")
        return cls(private)

    @classmethod
    def ensure(cls, path: Path) -> SigningKey:
        """The key at `path`, created (readable by its owner only) if there is none."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
            logger.info("created the mesh's key-signing key %s", path)
        return cls.load(path)

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(
            {"iss": ISSUER, **claims}, self._private, algorithm=ALGORITHM, headers={"kid": self.kid}
        )

    def jwks(self) -> str:
        """The public half as a JWKS document (what Envoy is given)."""
        return json.dumps({"keys": [self._jwk]}, sort_keys=True)


def signing_key(path: Path) -> SigningKey | None:
    """The signing key at `path`, None if there is none (keys are then made in the older
    form, which only the auth service checks)."""
    return SigningKey.load(path) if path.exists() else None


def public_jwks(path: Path) -> str | None:
    """The JWKS of the signing key at `path`, None if there is none (or it is unreadable:
    then the edge checks every key with the auth service, as before keys were tokens)."""
    try:
        return SigningKey.load(path).jwks()
    except (OSError, ValueError) as exc:
        logger.warning(
            "no key-signing key at %s (%s): every key is checked by the auth service", path, exc
        )
        return None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


__all__ = ["ALGORITHM", "ISSUER", "OPERATOR_ISSUER", "SigningKey", "public_jwks", "signing_key"]

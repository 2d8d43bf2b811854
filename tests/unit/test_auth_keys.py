"""API key format, hashing and how a request presents one (pure logic)."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import jwt
import pytest

from services.auth import keys
from services.auth.signing import SigningKey


def test_a_new_key_parses_back_and_only_its_secret_matches():
    key = keys.new_key()
    assert key.token.startswith(f"sb_{key.key_id}_")
    key_id, secret = keys.parse(key.token)
    assert key_id == key.key_id
    assert keys.matches(secret, key.secret_hash)
    assert not keys.matches(secret[:-1] + ("A" if secret[-1] != "A" else "B"), key.secret_hash)
    assert key.secret_hash != secret.encode()  # only the hash is stored
    assert keys.new_key().token != key.token


def test_malformed_keys_do_not_parse():
    good = keys.new_key().token
    for bad in ("", "sb_", good[:-1], good + "x", good.replace("sb_", "sk_"), "Bearer " + good):
        assert keys.parse(bad) is None, bad


def test_the_key_comes_from_a_bearer_token_or_x_api_key():
    assert keys.presented_key({"authorization": "Bearer sb_x"}) == "sb_x"
    assert keys.presented_key({"authorization": "bearer  sb_y "}) == "sb_y"
    assert keys.presented_key({"x-api-key": "sb_z"}) == "sb_z"
    assert keys.presented_key({"authorization": "Basic abc"}) == ""
    assert keys.presented_key({}) == ""


# -- keys as tokens the mesh's signing key signs -------------------------------------------


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return SigningKey.ensure(tmp_path_factory.mktemp("signing") / "key.pem")


def test_the_signing_key_is_created_once_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "auth" / "key.pem"
    first = SigningKey.ensure(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = SigningKey.ensure(path)
    assert again.kid == first.kid and again.jwks() == first.jwks()
    assert SigningKey.ensure(tmp_path / "other.pem").kid != first.kid


def test_a_tenant_key_is_a_token_that_verifies_against_the_public_jwks(signer: SigningKey) -> None:
    key = keys.new_key("tenant", "acme", signer)
    public = jwt.PyJWKSet.from_json(signer.jwks())[signer.kid]
    claims = jwt.decode(key.token, public.key, algorithms=["ES256"], issuer="switchboard")
    assert claims["jti"] == key.key_id and claims["sub"] == "acme" and claims["kind"] == "tenant"
    assert jwt.get_unverified_header(key.token)["kid"] == signer.kid
    assert "d" not in json.loads(signer.jwks())["keys"][0]  # no private part in the JWKS
    key_id, secret = keys.parse(key.token)
    assert key_id == key.key_id and secret == key.token
    assert keys.matches(secret, key.secret_hash)


def test_an_operator_token_names_no_tenant(signer: SigningKey) -> None:
    token = keys.new_key("operator", "", signer).token
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["kind"] == "operator" and "sub" not in claims
    # not the edge's issuer: Envoy leaves an operator's call to the auth service
    assert claims["iss"] == "switchboard-operator"


def test_a_token_changed_in_any_part_no_longer_matches_its_hash(signer: SigningKey) -> None:
    key = keys.new_key("tenant", "acme", signer)
    header, payload, signature = key.token.split(".")
    forged_claims = {**jwt.decode(key.token, options={"verify_signature": False}), "sub": "victim"}
    forged = jwt.encode(forged_claims, "x" * 32, algorithm="HS256").split(".")[1]
    for changed in (f"{header}.{forged}.{signature}", f"{header}.{payload}.{signature[:-2]}AA"):
        parsed = keys.parse(changed)
        assert parsed is not None and parsed[0] == key.key_id
        assert not keys.matches(parsed[1], key.secret_hash)


def test_malformed_tokens_do_not_parse(signer: SigningKey) -> None:
    good = keys.new_key("tenant", "acme", signer).token
    header, _, signature = good.split(".")
    no_jti = jwt.encode({"sub": "acme"}, "x" * 32, algorithm="HS256")
    bad_jti = jwt.encode({"jti": "../etc"}, "x" * 32, algorithm="HS256")
    not_json = f"{header}.{base64.urlsafe_b64encode(b'nope').decode().rstrip('=')}.{signature}"
    for bad in (good[:20], good + ".x", no_jti, bad_jti, not_json, "a.b", good + "A" * 2048):
        assert keys.parse(bad) is None, bad

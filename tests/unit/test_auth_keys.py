"""API key format, hashing and how a request presents one (pure logic)."""

from __future__ import annotations

from services.auth import keys


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

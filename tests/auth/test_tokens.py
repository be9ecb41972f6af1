"""Token verification: every refusal has its reason; claims become an Identity."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest

from broker_node.auth.identity import Identity, TokenRefusal
from broker_node.auth.jwks import JwksKeys
from broker_node.auth.tokens import StaticKey, TokenVerifier
from tests.support.tokens import (
    OTHER_SECRET,
    SECRET,
    KeyPair,
    claims,
    ec_pair,
    ed25519_pair,
    hs256,
    jwks,
    rsa_pair,
    signed,
    unsigned,
)


def secret_verifier(**kwargs: object) -> TokenVerifier:
    return TokenVerifier(StaticKey(SECRET), algorithms=["HS256"], leeway=1, **kwargs)  # type: ignore[arg-type]


def refusal(result: Identity | TokenRefusal) -> str:
    assert isinstance(result, TokenRefusal), result
    return result.reason


def test_a_valid_token_gives_its_identity() -> None:
    token = hs256(claims(sub="alice", roles=["a"], list=["b"], open=["b"], jti="t-1"))
    identity = secret_verifier().verify(token)
    assert isinstance(identity, Identity)
    assert identity.subject == "alice"
    assert identity.roles == {"a"}
    assert identity.may_list == frozenset({"b"}) and identity.may_open == frozenset({"b"})
    assert identity.token_id == "t-1"
    assert identity.expires_at is not None and identity.expires_at > time.time()


def test_absent_list_and_open_claims_are_none_not_empty() -> None:
    identity = secret_verifier().verify(hs256(claims()))
    assert isinstance(identity, Identity)
    assert identity.may_list is None and identity.may_open is None


def test_forged_token_is_refused() -> None:
    token = hs256(claims(), secret=OTHER_SECRET)
    assert refusal(secret_verifier().verify(token)) == "signature verification failed"


def test_tampered_payload_is_refused() -> None:
    header, _, signature = hs256(claims(roles=["a"])).split(".")
    forged_payload = hs256(claims(roles=["admin"])).split(".")[1]
    token = f"{header}.{forged_payload}.{signature}"
    assert refusal(secret_verifier().verify(token)) == "signature verification failed"


def test_expired_token_is_refused_as_expired() -> None:
    result = secret_verifier().verify(hs256(claims(ttl=-30)))
    assert refusal(result) == "expired"
    assert isinstance(result, TokenRefusal) and result.expired


def test_expiry_within_the_leeway_is_accepted() -> None:
    now = int(time.time())
    token = hs256({**claims(), "exp": now})  # expired "now", leeway 1 s on top
    assert isinstance(secret_verifier().verify(token), Identity)


def test_not_yet_valid_token_is_refused() -> None:
    token = hs256(claims(nbf=int(time.time()) + 60))
    assert refusal(secret_verifier().verify(token)) == "not yet valid"


def test_alg_none_is_refused() -> None:
    assert refusal(secret_verifier().verify(unsigned(claims()))) == "algorithm not allowed"


def test_none_can_never_be_allowed() -> None:
    with pytest.raises(ValueError, match="none"):
        TokenVerifier(StaticKey(SECRET), algorithms=["none"])
    with pytest.raises(ValueError):
        TokenVerifier(StaticKey(SECRET), algorithms=[])


def test_algorithm_outside_the_allow_list_is_refused() -> None:
    token = hs256(claims())  # HS256, but only RS256 is allowed
    pair = rsa_pair()
    verifier = TokenVerifier(StaticKey(pair.public_pem), algorithms=["RS256"])
    assert refusal(verifier.verify(token)) == "algorithm not allowed"


def test_public_key_used_as_hmac_secret_is_refused() -> None:
    # The classic confusion attack: sign HS256 with the public key's text.
    pair = rsa_pair()
    header = _b64(b'{"alg":"HS256","typ":"JWT"}')
    body = _b64(json.dumps(claims()).encode())
    mac = hmac.new(pair.public_pem.encode(), f"{header}.{body}".encode(), hashlib.sha256)
    token = f"{header}.{body}.{_b64(mac.digest())}"
    verifier = TokenVerifier(StaticKey(pair.public_pem), algorithms=["RS256", "HS256"])
    assert isinstance(verifier.verify(token), TokenRefusal)


@pytest.mark.parametrize("make_pair", [rsa_pair, ec_pair, ed25519_pair])
def test_public_key_algorithms(make_pair: object) -> None:
    pair: KeyPair = make_pair()  # type: ignore[operator]
    verifier = TokenVerifier(StaticKey(pair.public_pem), algorithms=[pair.algorithm])
    assert isinstance(verifier.verify(signed(pair, claims())), Identity)
    other: KeyPair = make_pair()  # type: ignore[operator]
    assert refusal(verifier.verify(signed(other, claims()))) == "signature verification failed"


def test_wrong_audience_and_issuer_are_refused() -> None:
    verifier = secret_verifier(audience="brokers", issuer="https://issuer")
    good = claims(aud="brokers", iss="https://issuer")
    assert isinstance(verifier.verify(hs256(good)), Identity)
    assert refusal(verifier.verify(hs256({**good, "aud": "others"}))) == "audience not accepted"
    assert refusal(verifier.verify(hs256({**good, "iss": "https://evil"}))) == (
        "issuer not accepted"
    )
    missing_aud = {k: v for k, v in good.items() if k != "aud"}
    assert refusal(verifier.verify(hs256(missing_aud))) == "missing claim aud"


def test_exp_and_sub_are_required() -> None:
    no_exp = {k: v for k, v in claims().items() if k != "exp"}
    assert refusal(secret_verifier().verify(hs256(no_exp))) == "missing claim exp"
    no_sub = {k: v for k, v in claims().items() if k != "sub"}
    assert refusal(secret_verifier().verify(hs256(no_sub))) == "missing claim sub"


def test_ill_typed_claims_are_refused() -> None:
    assert "roles" in refusal(secret_verifier().verify(hs256(claims(roles="a"))))  # type: ignore[arg-type]
    assert "list" in refusal(secret_verifier().verify(hs256(claims(list=[1]))))
    assert "open" in refusal(secret_verifier().verify(hs256(claims(open=[1]))))
    assert refusal(secret_verifier().verify(hs256(claims(sub="")))) == (
        "claim sub must be a non-empty string"
    )


def test_a_key_made_for_one_algorithm_refuses_a_token_of_another() -> None:
    # A key source may hand out PyJWK keys, which know the algorithm they are for.
    pair = rsa_pair()
    published = json.loads(jwt.get_algorithm_by_name("RS256").to_jwk(pair.private.public_key()))
    verifier = TokenVerifier(
        StaticKey(jwt.PyJWK({**published, "alg": "RS256"})), algorithms=["RS256", "RS384"]
    )
    assert isinstance(verifier.verify(jwt.encode(claims(), pair.private, "RS256")), Identity)
    assert refusal(verifier.verify(jwt.encode(claims(), pair.private, "RS384"))) == (
        "algorithm not allowed"
    )


def test_garbage_is_malformed() -> None:
    assert refusal(secret_verifier().verify("not a token")) == "malformed"


def test_revoked_identity_is_refused() -> None:
    verifier = secret_verifier(is_revoked=lambda identity: identity.subject == "mallory")
    assert refusal(verifier.verify(hs256(claims(sub="mallory")))) == "revoked"
    assert isinstance(verifier.verify(hs256(claims(sub="alice"))), Identity)


def test_jwks_picks_the_key_by_kid_and_follows_rotation() -> None:
    first, second = rsa_pair(), ec_pair()
    keys = JwksKeys()
    assert keys.update(jwks(("k1", first))) == 1
    verifier = TokenVerifier(keys, algorithms=["RS256", "ES256"])
    assert isinstance(verifier.verify(signed(first, claims(), kid="k1")), Identity)
    assert refusal(verifier.verify(signed(second, claims(), kid="k2"))) == "signing key not known"
    keys.update(jwks(("k2", second)))
    assert isinstance(verifier.verify(signed(second, claims(), kid="k2")), Identity)
    assert refusal(verifier.verify(signed(first, claims(), kid="k1"))) == "signing key not known"


def test_jwks_key_is_not_used_for_another_algorithm() -> None:
    pair = rsa_pair()
    keys = JwksKeys()
    keys.update(jwks(("k1", pair)))
    assert keys.key_for("k1", "RS256") is not None
    assert keys.key_for("k1", "RS512") is None


def test_a_jwks_without_usable_keys_keeps_the_old_ones() -> None:
    pair = rsa_pair()
    keys = JwksKeys()
    keys.update(jwks(("k1", pair)))
    with pytest.raises(ValueError):
        keys.update('{"keys": [{"kty": "nope"}]}')
    assert keys.key_for("k1", "RS256") is not None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

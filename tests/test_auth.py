"""Authentication and authorization: Supabase tokens, JWKS handling, staff roles, bot keys."""

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

import auth
from tests.conftest import (
    ENV_BOT_KEY,
    ENV_OWNER,
    HS_SECRET,
    Harness,
    JWKSServer,
    Keys,
    Tokens,
    b64,
    claims_for,
    clean_database,
    problem,
    start_harness,
)
from tests.factories import create_group

pytestmark = pytest.mark.anyio

ME = "/api/v1/me"
GROUP_ID = -1001000000001
CHANNEL_ID = -1002000000001
LINKED_CHANNEL_ID = -1002000000002
P384 = ec.generate_private_key(ec.SECP384R1())
ED25519 = ed25519.Ed25519PrivateKey.generate()


# ---------------------------------------------------------------- helpers


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A token with exactly this header, payload and signature (PyJWT refuses some of these)."""
    return (
        f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(signature)}"
    )


def hs256_with(secret: bytes, user_id: str, **header_fields: Any) -> str:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", **header_fields}).encode())
    payload = b64(json.dumps(claims_for(user_id)).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def public_pem(private: Any) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def unauthorized(response: httpx.Response, detail: str | None = None) -> dict[str, Any]:
    body = problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")
    if detail is not None:
        assert body["detail"] == detail
    return body


class Clock:
    """Moves the auth module's monotonic clock forward, so caches and throttles can expire
    without sleeping. Only auth.py sees the shifted time."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    fake = Clock()
    monkeypatch.setattr(auth, "time", SimpleNamespace(monotonic=fake.monotonic))
    yield fake


BOT_KEY_NEEDED = "bot routes need a bot key (cgk_…)"
POLICY_URL = f"/api/v1/bot/groups/{GROUP_ID}/policy"


async def policy_for_bot(harness: Harness, owner: dict[str, str]) -> str:
    """The URL of a real bot route: the policy of a group created for it."""
    await create_group(harness.client, owner, GROUP_ID, title="Bot group")
    return POLICY_URL


# ---------------------------------------------------------------- token rejections


def _rotated_same_kid(tokens: Tokens, keys: Keys) -> str:
    return jwt.encode(claims_for(str(uuid.uuid4())), keys.rotated_ec, "ES256", {"kid": "ec-1"})


def _none(alg: str) -> Callable[[Tokens, Keys], str]:
    return lambda tokens, keys: forge({"alg": alg, "typ": "JWT"}, claims_for(str(uuid.uuid4())))


def _signed(alg: str, key: Callable[[Keys], Any], kid: str | None) -> Callable[[Tokens, Keys], str]:
    headers = {"kid": kid} if kid else None
    return lambda tokens, keys: jwt.encode(
        claims_for(str(uuid.uuid4())), key(keys), alg, headers=headers
    )


def relative(claims: dict[str, Any]) -> dict[str, Any]:
    """`exp_in=-60` → `exp` 60 s ago, computed when the token is minted, not at collection."""
    now = int(time.time())
    return {
        name.removesuffix("_in"): now + value if name.endswith("_in") else value
        for name, value in claims.items()
    }


def _mint(**claims: Any) -> Callable[[Tokens, Keys], str]:
    return lambda tokens, keys: tokens.mint(str(uuid.uuid4()), **relative(claims))


def _no_kid(tokens: Tokens, keys: Keys) -> str:
    return jwt.encode(claims_for(str(uuid.uuid4())), keys.ec, "ES256")


REJECTED_TOKENS = [
    pytest.param(lambda t, k: "not-a-jwt", "malformed token", id="malformed"),
    pytest.param(lambda t, k: "a.b.c", "malformed token", id="garbage-segments"),
    pytest.param(
        lambda t, k: f"{b64(b'[1, 2]')}.{b64(b'{}')}.", "malformed token", id="header-not-object"
    ),
    pytest.param(_rotated_same_kid, "bad token signature", id="bad-signature"),
    pytest.param(_none("none"), "token algorithm 'none' is not accepted", id="alg-none"),
    pytest.param(_none("None"), "token algorithm 'None' is not accepted", id="alg-None"),
    pytest.param(_none("NONE"), "token algorithm 'NONE' is not accepted", id="alg-NONE"),
    pytest.param(
        lambda t, k: hs256_with(public_pem(k.ec), str(uuid.uuid4())),
        "bad token signature",
        id="hs256-signed-with-ec-public-pem",
    ),
    pytest.param(
        lambda t, k: hs256_with(public_pem(k.rsa), str(uuid.uuid4())),
        "bad token signature",
        id="hs256-signed-with-rsa-public-pem",
    ),
    pytest.param(
        _signed("ES384", lambda k: P384, "ec-1"),
        "token algorithm 'ES384' is not accepted",
        id="alg-es384",
    ),
    pytest.param(
        _signed("PS256", lambda k: k.rsa, "rsa-1"),
        "token algorithm 'PS256' is not accepted",
        id="alg-ps256",
    ),
    pytest.param(
        _signed("RS512", lambda k: k.rsa, "rsa-1"),
        "token algorithm 'RS512' is not accepted",
        id="alg-rs512",
    ),
    pytest.param(
        _signed("HS512", lambda k: HS_SECRET * 2, None),
        "token algorithm 'HS512' is not accepted",
        id="alg-hs512",
    ),
    pytest.param(
        _signed("EdDSA", lambda k: ED25519, "ec-1"),
        "token algorithm 'EdDSA' is not accepted",
        id="alg-eddsa",
    ),
    pytest.param(
        _mint(alg="RS256", kid="ec-1"),
        "token algorithm does not match its key",
        id="rs256-with-ec-kid",
    ),
    pytest.param(
        _mint(alg="ES256", kid="rsa-1"),
        "token algorithm does not match its key",
        id="es256-with-rsa-kid",
    ),
    pytest.param(_no_kid, "token has no key id", id="es256-without-kid"),
    pytest.param(_mint(kid="no-such-key"), "unknown signing key", id="unknown-kid"),
    pytest.param(_mint(exp_in=-60), "token expired", id="expired-beyond-leeway"),
    pytest.param(_mint(alg="HS256", exp_in=-60), "token expired", id="hs256-expired"),
    pytest.param(
        _mint(iat_in=3600),
        "invalid token: The token is not yet valid (iat)",
        id="iat-in-future",
    ),
    pytest.param(
        _mint(iss="https://other.supabase.test/auth/v1"),
        "invalid token: Invalid issuer",
        id="wrong-iss",
    ),
    pytest.param(_mint(aud="service"), "invalid token: Audience doesn't match", id="wrong-aud"),
    pytest.param(
        _mint(aud=["service", "other"]),
        "invalid token: Audience doesn't match",
        id="wrong-aud-list",
    ),
    pytest.param(
        _mint(sub=None), 'invalid token: Token is missing the "sub" claim', id="missing-sub"
    ),
    pytest.param(
        _mint(exp=None), 'invalid token: Token is missing the "exp" claim', id="missing-exp"
    ),
    pytest.param(
        _mint(iat=None), 'invalid token: Token is missing the "iat" claim', id="missing-iat"
    ),
    pytest.param(
        lambda t, k: t.mint("not-a-uuid"), "token subject is not a user id", id="sub-not-uuid"
    ),
    pytest.param(_mint(role="anon"), "token role must be 'authenticated'", id="role-anon"),
    pytest.param(
        _mint(role="service_role"), "token role must be 'authenticated'", id="role-service"
    ),
    pytest.param(_mint(role=None), "token role must be 'authenticated'", id="role-missing"),
    pytest.param(
        _mint(is_anonymous=True), "anonymous sign-ins are not accepted", id="is-anonymous"
    ),
]


@pytest.mark.parametrize(("make_token", "detail"), REJECTED_TOKENS)
async def test_rejected_token_is_401(
    harness: Harness,
    tokens: Tokens,
    keys: Keys,
    make_token: Callable[[Tokens, Keys], str],
    detail: str,
) -> None:
    response = await harness.client.get(ME, headers=bearer(make_token(tokens, keys)))
    unauthorized(response, detail)


def wrong(claim: str, value: Any, detail: str, name: str | None = None) -> Any:
    return pytest.param(claim, value, detail, id=f"{claim}={name or json.dumps(value)}")


def must_be(claim: str, what: str) -> str:
    return f"invalid token: the {claim!r} claim must be {what}"


NOT_AN_EXP = "invalid token: Expiration Time claim (exp) must be an integer."
TOO_LONG = must_be("email", "at most 320 characters, without NUL")
# Every claim channelgate reads, with a value of the wrong JSON type: each was a 500 (or
# worse, accepted) while the token's signature was good.
WRONG_CLAIMS = [
    wrong("email", {"address": "a@example.com"}, must_be("email", "a string")),
    wrong("email", ["a@example.com"], must_be("email", "a string")),
    wrong("email", 7, must_be("email", "a string")),
    wrong("email", "a" * 310 + "@example.com", TOO_LONG, "321-chars"),
    wrong("email", "a\u0000@example.com", TOO_LONG, "with-NUL"),
    wrong("aal", {"level": 2}, must_be("aal", "a string")),
    wrong("aal", ["aal2"], must_be("aal", "a string")),
    wrong("role", ["authenticated"], must_be("role", "a string")),
    wrong("role", {"name": "authenticated"}, must_be("role", "a string")),
    wrong("is_anonymous", [], must_be("is_anonymous", "true or false")),
    wrong("is_anonymous", "false", must_be("is_anonymous", "true or false")),
    wrong("is_anonymous", 0, must_be("is_anonymous", "true or false")),
    wrong("exp", "9999999999", must_be("exp", "a number")),
    wrong("iat", "0", must_be("iat", "a number")),
    wrong("iat", True, must_be("iat", "a number")),
    wrong("nbf", "0", must_be("nbf", "a number")),
    # PyJWT refuses these first, in its own words
    wrong("exp", {"at": 9999999999}, NOT_AN_EXP),
    wrong("exp", [9999999999], NOT_AN_EXP),
    wrong("iat", [0], "invalid token: Issued At claim (iat) must be an integer."),
    wrong("sub", [ENV_OWNER], "invalid token: Subject must be a string"),
    wrong("sub", {"id": ENV_OWNER}, "invalid token: Subject must be a string"),
]  # fmt: skip


@pytest.mark.parametrize(("claim", "value", "detail"), WRONG_CLAIMS)
async def test_claim_of_the_wrong_type_is_401(
    harness: Harness, claim: str, value: Any, detail: str
) -> None:
    """Signed for an environment owner, so nothing but the claim stands in the way."""
    for path in (ME, "/api/v1/audit"):
        unauthorized(
            await harness.client.get(path, headers=harness.auth(ENV_OWNER, **{claim: value})),
            detail,
        )


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"Authorization": "Bearer"}, id="empty-bearer"),
        pytest.param({"Authorization": "Basic dXNlcjpwYXNz"}, id="basic-scheme"),
    ],
)
async def test_missing_token_is_401(harness: Harness, headers: dict[str, str]) -> None:
    unauthorized(await harness.client.get(ME, headers=headers), "missing bearer token")


async def test_rejected_token_owner_id_still_401(harness: Harness, tokens: Tokens) -> None:
    """Being listed in OWNER_USER_IDS does not excuse a bad token."""
    token = tokens.mint(ENV_OWNER, **relative({"exp_in": -60}))
    unauthorized(await harness.client.get(ME, headers=bearer(token)), "token expired")


async def test_hs256_rejected_without_secret(
    database_url: str, jwks_server: JWKSServer, tokens: Tokens, keys: Keys
) -> None:
    await clean_database(database_url)
    async for h in start_harness(database_url, jwks_server.url, tokens, supabase_jwt_secret=""):
        for token in (
            tokens.mint(ENV_OWNER, alg="HS256"),
            hs256_with(public_pem(keys.ec), ENV_OWNER),
            hs256_with(b"", ENV_OWNER),
        ):
            response = await h.client.get(ME, headers=bearer(token))
            unauthorized(response, "token algorithm 'HS256' is not accepted")
        assert (await h.client.get(ME, headers=h.auth(ENV_OWNER))).status_code == 200


# ---------------------------------------------------------------- accepted tokens


@pytest.mark.parametrize("alg", ["ES256", "RS256", "HS256"])
async def test_accepted_token_for_staff(harness: Harness, tokens: Tokens, alg: str) -> None:
    user_id = str(uuid.uuid4())
    await harness.add_staff("editor", user_id)
    token = tokens.mint(user_id, alg=alg, email="ed@example.com", aal="aal2")
    response = await harness.client.get(ME, headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json() == {
        "user_id": user_id,
        "email": "ed@example.com",
        "role": "editor",
        "aal": "aal2",
    }


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"exp_in": -10}, id="expired-within-leeway"),
        pytest.param({"aud": ["other", "authenticated"]}, id="aud-list-containing"),
        pytest.param({"is_anonymous": None}, id="no-is-anonymous"),
        pytest.param({"iat_in": 10}, id="iat-within-leeway"),
    ],
)
async def test_accepted_edge_claims(
    harness: Harness, tokens: Tokens, claims: dict[str, Any]
) -> None:
    token = tokens.mint(ENV_OWNER, **relative(claims))
    response = await harness.client.get(ME, headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == ENV_OWNER


async def test_uppercase_uuid_subject_is_normalised(harness: Harness) -> None:
    user_id = str(uuid.uuid4())
    await harness.add_staff("viewer", user_id)
    response = await harness.client.get(ME, headers=harness.auth(user_id.upper()))
    assert response.status_code == 200, response.text
    assert response.json()["user_id"] == user_id and response.json()["role"] == "viewer"


# ---------------------------------------------------------------- JWKS


def jwks_with(keys: Keys, *extra: dict[str, Any]) -> dict[str, Any]:
    return {"keys": [*keys.jwks()["keys"], *extra]}


def rotated_token(keys: Keys, kid: str, user_id: str = ENV_OWNER) -> dict[str, str]:
    return bearer(jwt.encode(claims_for(user_id), keys.rotated_ec, "ES256", {"kid": kid}))


async def test_jwks_fetched_once_and_cached(harness: Harness, jwks_server: JWKSServer) -> None:
    for alg in ("ES256", "RS256", "ES256"):
        token = harness.tokens.mint(ENV_OWNER, alg=alg)
        assert (await harness.client.get(ME, headers=bearer(token))).status_code == 200
    assert jwks_server.hits == 1


async def test_unknown_kid_refetches_after_rotation(
    harness: Harness, jwks_server: JWKSServer, keys: Keys, clock: Clock
) -> None:
    assert (await harness.client.get(ME, headers=harness.auth(ENV_OWNER))).status_code == 200
    assert jwks_server.hits == 1
    clock.advance(31)  # past the refetch throttle, well within the 10 minute cache
    jwks_server.jwks = jwks_with(keys, keys.jwk(keys.rotated_ec, "ec-2", "ES256"))
    response = await harness.client.get(ME, headers=rotated_token(keys, "ec-2"))
    assert response.status_code == 200, response.text
    assert jwks_server.hits == 2
    # the old keys came along and still work, without another fetch
    assert (await harness.client.get(ME, headers=harness.auth(ENV_OWNER))).status_code == 200
    assert jwks_server.hits == 2


async def test_unknown_kid_refetch_is_throttled(
    harness: Harness, jwks_server: JWKSServer, keys: Keys, clock: Clock
) -> None:
    assert (await harness.client.get(ME, headers=harness.auth(ENV_OWNER))).status_code == 200
    unauthorized(
        await harness.client.get(ME, headers=rotated_token(keys, "nope-1")), "unknown signing key"
    )
    hits = jwks_server.hits
    # now the JWKS has the key, but a second unknown kid within 30 s must not refetch
    jwks_server.jwks = jwks_with(keys, keys.jwk(keys.rotated_ec, "ec-3", "ES256"))
    for _ in range(3):
        unauthorized(
            await harness.client.get(ME, headers=rotated_token(keys, "ec-3")),
            "unknown signing key",
        )
    assert jwks_server.hits == hits
    clock.advance(31)
    assert (await harness.client.get(ME, headers=rotated_token(keys, "ec-3"))).status_code == 200
    assert jwks_server.hits == hits + 1


async def test_jwks_refetched_when_cache_expires(
    harness: Harness, jwks_server: JWKSServer, keys: Keys, clock: Clock
) -> None:
    assert (await harness.client.get(ME, headers=harness.auth(ENV_OWNER))).status_code == 200
    jwks_server.jwks = {"keys": [keys.jwk(keys.rotated_ec, "ec-2", "ES256")]}  # ec-1 retired
    clock.advance(601)
    unauthorized(
        await harness.client.get(ME, headers=harness.auth(ENV_OWNER)), "unknown signing key"
    )
    assert jwks_server.hits == 2
    assert (await harness.client.get(ME, headers=rotated_token(keys, "ec-2"))).status_code == 200


async def test_jwks_down_cached_keys_keep_working(
    harness: Harness, jwks_server: JWKSServer, tokens: Tokens, keys: Keys, clock: Clock
) -> None:
    assert (await harness.client.get(ME, headers=harness.auth(ENV_OWNER))).status_code == 200
    jwks_server.down = True
    clock.advance(601)  # the cache is stale, so the service tries the endpoint, which fails
    for alg in ("ES256", "RS256"):
        token = tokens.mint(ENV_OWNER, alg=alg)
        response = await harness.client.get(ME, headers=bearer(token))
        assert response.status_code == 200, response.text
    assert jwks_server.hits == 2
    # a kid that was never seen has no usable key: 401, not 503 (keys were fetched before)
    unauthorized(
        await harness.client.get(ME, headers=rotated_token(keys, "ec-9")), "unknown signing key"
    )


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param({"down": True}, id="endpoint-down"),
        pytest.param({"jwks": {"not-keys": []}}, id="no-keys-member"),
        pytest.param({"jwks": ["not", "an", "object"]}, id="json-array"),
    ],
)
async def test_jwks_never_fetched_is_503(
    database_url: str,
    jwks_server: JWKSServer,
    tokens: Tokens,
    breakage: dict[str, Any],
) -> None:
    for name, value in breakage.items():
        setattr(jwks_server, name, value)
    await clean_database(database_url)
    async for h in start_harness(database_url, jwks_server.url, tokens):
        for alg in ("ES256", "RS256"):
            response = await h.client.get(ME, headers=bearer(tokens.mint(ENV_OWNER, alg=alg)))
            body = problem(response, 503)
            assert body["detail"] == "token signing keys are unavailable"
            assert int(response.headers["retry-after"]) > 0
        # HS256 does not need the JWKS
        hs = bearer(tokens.mint(ENV_OWNER, alg="HS256"))
        assert (await h.client.get(ME, headers=hs)).status_code == 200


@pytest.mark.parametrize(
    "bad_keys",
    [
        pytest.param(["a string, not a key"], id="non-object-entry"),
        pytest.param([{"kid": "x", "kty": "EC"}], id="ec-key-without-curve"),
        pytest.param([{"kid": "x"}], id="no-kty"),
        pytest.param([{"kid": "x", "kty": "OKP", "crv": "Ed25519", "x": "!"}], id="bad-okp"),
        pytest.param([{"kid": "x", "kty": "EC", "alg": "ES999"}], id="unknown-alg"),
        pytest.param([{"kid": "x", "kty": "oct", "k": b64(b"secret")}], id="symmetric-key"),
    ],
)
async def test_unusable_jwks_entries_are_skipped(
    harness: Harness, jwks_server: JWKSServer, keys: Keys, bad_keys: list[Any]
) -> None:
    """One unusable entry in the JWKS must not cost the good keys, nor ever be a 500."""
    jwks_server.jwks = {"keys": [*bad_keys, *keys.jwks()["keys"]]}
    response = await harness.client.get(ME, headers=harness.auth(ENV_OWNER))
    assert response.status_code == 200, response.text
    # an HS256 token "signed" with the JWKS's symmetric key is checked against the secret only
    forged = bearer(hs256_with(b"secret", ENV_OWNER, kid="x"))
    unauthorized(await harness.client.get(ME, headers=forged), "bad token signature")


# ---------------------------------------------------------------- authorization


async def test_valid_token_of_non_staff_is_403(harness: Harness, tokens: Tokens) -> None:
    for alg in ("ES256", "RS256", "HS256"):
        token = tokens.mint(str(uuid.uuid4()), alg=alg)
        body = problem(await harness.client.get(ME, headers=bearer(token)), 403)
        assert body["detail"] == "this account is not channelgate staff"


async def test_environment_owner_works_on_empty_database(harness: Harness) -> None:
    owner = harness.auth(ENV_OWNER, email="boss@example.com")
    me = await harness.client.get(ME, headers=owner)
    assert me.status_code == 200
    assert me.json() == {
        "user_id": ENV_OWNER,
        "email": "boss@example.com",
        "role": "owner",
        "aal": "aal1",
    }
    staff = await harness.client.get("/api/v1/staff", headers=owner)
    assert staff.status_code == 200, staff.text
    assert [(s["user_id"], s["role"], s["source"]) for s in staff.json()["items"]] == [
        (ENV_OWNER, "owner", "environment")
    ]


async def test_aal2_required_for_owner_routes(
    database_url: str, jwks_server: JWKSServer, tokens: Tokens
) -> None:
    await clean_database(database_url)
    async for h in start_harness(
        database_url, jwks_server.url, tokens, require_aal2_for_owners=True
    ):
        db_owner = str(uuid.uuid4())
        await h.add_staff("owner", db_owner)
        for owner_id in (ENV_OWNER, db_owner):
            for aal in ("aal1", None):
                response = await h.client.get("/api/v1/staff", headers=h.auth(owner_id, aal=aal))
                body = problem(response, 403)
                assert body["detail"] == "owner actions need multi-factor sign-in (aal2)"
            aal2 = h.auth(owner_id, aal="aal2")
            assert (await h.client.get("/api/v1/staff", headers=aal2)).status_code == 200
        # editor and viewer routes do not need aal2, not even for owners
        aal1 = h.auth(ENV_OWNER)
        await create_group(h.client, aal1, GROUP_ID)
        viewer = await h.add_staff("viewer")
        for headers in (aal1, viewer):
            assert (await h.client.get("/api/v1/groups", headers=headers)).status_code == 200
            assert (await h.client.get(ME, headers=headers)).status_code == 200


async def test_role_comes_from_database_at_each_request(harness: Harness) -> None:
    """Demoting or removing a staff member takes effect on their very next request."""
    user_id = str(uuid.uuid4())
    editor = await harness.add_staff("editor", user_id)
    owner = harness.auth(ENV_OWNER)
    await create_group(harness.client, editor, GROUP_ID)
    put = await harness.client.put(
        f"/api/v1/staff/{user_id}", json={"role": "viewer"}, headers=owner
    )
    assert put.status_code == 200, put.text
    patch = {"title": "Renamed"}
    response = await harness.client.patch(f"/api/v1/groups/{GROUP_ID}", json=patch, headers=editor)
    assert problem(response, 403)["detail"] == "this needs the editor role"
    assert (
        await harness.client.delete(f"/api/v1/staff/{user_id}", headers=owner)
    ).status_code == 204
    response = await harness.client.get(ME, headers=editor)
    assert problem(response, 403)["detail"] == "this account is not channelgate staff"


# ---------------------------------------------------------------- role matrix

RANK = {"viewer": 1, "editor": 2, "owner": 3}
NEW_STAFF = "11111111-1111-4111-8111-111111111111"
OLD_STAFF = "22222222-2222-4222-8222-222222222222"

# (method, path, body, minimum role, status of a real success)
ROUTES = [
    ("GET", "/api/v1/me", None, "viewer", 200),
    ("GET", "/api/v1/groups", None, "viewer", 200),
    ("POST", "/api/v1/groups", {"chat_id": -1001000000009, "title": "New"}, "editor", 201),
    ("GET", f"/api/v1/groups/{GROUP_ID}", None, "viewer", 200),
    ("PATCH", f"/api/v1/groups/{GROUP_ID}", {"title": "Renamed"}, "editor", 200),
    ("DELETE", f"/api/v1/groups/{GROUP_ID}", None, "editor", 204),
    ("PUT", f"/api/v1/groups/{GROUP_ID}/channels/{CHANNEL_ID}", None, "editor", 201),
    ("DELETE", f"/api/v1/groups/{GROUP_ID}/channels/{LINKED_CHANNEL_ID}", None, "editor", 204),
    ("GET", f"/api/v1/groups/{GROUP_ID}/members", None, "viewer", 200),
    ("GET", "/api/v1/channels", None, "viewer", 200),
    ("POST", "/api/v1/channels", {"chat_id": -1002000000009, "title": "New"}, "editor", 201),
    ("GET", f"/api/v1/channels/{CHANNEL_ID}", None, "viewer", 200),
    ("PATCH", f"/api/v1/channels/{CHANNEL_ID}", {"title": "Renamed"}, "editor", 200),
    ("DELETE", f"/api/v1/channels/{CHANNEL_ID}", None, "editor", 204),
    ("GET", "/api/v1/staff", None, "owner", 200),
    ("PUT", f"/api/v1/staff/{NEW_STAFF}", {"role": "viewer"}, "owner", 201),
    ("DELETE", f"/api/v1/staff/{OLD_STAFF}", None, "owner", 204),
    ("GET", "/api/v1/bot-keys", None, "owner", 200),
    ("POST", "/api/v1/bot-keys", {"name": "second"}, "owner", 201),
    ("DELETE", "/api/v1/bot-keys/{key_id}", None, "owner", 204),
    ("GET", "/api/v1/audit", None, "owner", 200),
    ("GET", "/api/v1/bots", None, "viewer", 200),
]


async def seed(harness: Harness) -> dict[str, Any]:
    """A group linked to one channel, a free channel, a staff member and a bot key."""
    owner = harness.auth(ENV_OWNER)
    client = harness.client
    calls: list[tuple[str, str, Any]] = [
        ("POST", "/api/v1/groups", {"chat_id": GROUP_ID, "title": "Group"}),
        ("POST", "/api/v1/channels", {"chat_id": CHANNEL_ID, "title": "Free"}),
        ("POST", "/api/v1/channels", {"chat_id": LINKED_CHANNEL_ID, "title": "Linked"}),
        ("PUT", f"/api/v1/groups/{GROUP_ID}/channels/{LINKED_CHANNEL_ID}", None),
        ("PUT", f"/api/v1/staff/{OLD_STAFF}", {"role": "viewer"}),
        ("POST", "/api/v1/bot-keys", {"name": "first"}),
    ]
    response = None
    for method, path, body in calls:
        response = await client.request(method, path, json=body, headers=owner)
        assert response.status_code == 201, response.text
    assert response is not None
    return {"key_id": response.json()["id"]}


@pytest.mark.parametrize(
    ("method", "path", "body", "minimum", "success"),
    [pytest.param(*route, id=f"{route[0]} {route[1]}") for route in ROUTES],
)
async def test_role_matrix(
    harness: Harness,
    tokens: Tokens,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    minimum: str,
    success: int,
) -> None:
    path = path.format(**await seed(harness))
    client = harness.client

    async def call(headers: dict[str, str]) -> httpx.Response:
        return await client.request(method, path, json=body, headers=headers)

    unauthorized(await call({}), "missing bearer token")
    response = await call(bearer(tokens.mint(str(uuid.uuid4()))))
    assert problem(response, 403)["detail"] == "this account is not channelgate staff"
    succeeded = False
    for role in ("viewer", "editor", "owner"):
        response = await call(await harness.add_staff(role))
        if RANK[role] < RANK[minimum]:
            assert problem(response, 403)["detail"] == f"this needs the {minimum} role", role
        elif not succeeded or method == "GET":
            # the first allowed caller meets the seeded data: a real success
            assert response.status_code == success, (role, response.text)
            succeeded = True
        else:
            # a later caller may find it done already (404/409), but is never refused
            assert response.status_code not in (401, 403), (role, response.text)


# ---------------------------------------------------------------- bot keys on dashboard routes


async def test_bot_keys_are_401_on_dashboard_routes(harness: Harness) -> None:
    owner = harness.auth(ENV_OWNER)
    created = await harness.client.post("/api/v1/bot-keys", json={"name": "b"}, headers=owner)
    assert created.status_code == 201, created.text
    for key in (created.json()["key"], ENV_BOT_KEY, "cgk_" + "x" * 43, "cgk_short"):
        for path in (ME, "/api/v1/groups", "/api/v1/bot-keys"):
            response = await harness.client.get(path, headers=bearer(key))
            unauthorized(response, "bot keys are not accepted on dashboard routes")


async def test_created_key_shown_once_and_revocation_listed(harness: Harness) -> None:
    owner = harness.auth(ENV_OWNER)
    created = await harness.client.post("/api/v1/bot-keys", json={"name": "b"}, headers=owner)
    assert created.status_code == 201, created.text
    key = created.json()
    assert key["key"].startswith("cgk_") and len(key["key"]) == 47
    assert key["prefix"] == key["key"][:12]
    revoke = await harness.client.delete(f"/api/v1/bot-keys/{key['id']}", headers=owner)
    assert revoke.status_code == 204
    listed = (await harness.client.get("/api/v1/bot-keys", headers=owner)).json()["items"]
    assert [k["id"] for k in listed] == [key["id"]]
    assert "key" not in listed[0] and listed[0]["revoked_at"] is not None


# ---------------------------------------------------------------- bot routes


async def test_bot_key_works_and_revocation_is_immediate(harness: Harness) -> None:
    owner = harness.auth(ENV_OWNER)
    url = await policy_for_bot(harness, owner)
    created = await harness.client.post("/api/v1/bot-keys", json={"name": "b"}, headers=owner)
    key = created.json()
    bot = bearer(key["key"])
    response = await harness.client.get(url, headers=bot)
    assert response.status_code == 200, response.text
    assert response.json()["chat_id"] == GROUP_ID
    revoke = await harness.client.delete(f"/api/v1/bot-keys/{key['id']}", headers=owner)
    assert revoke.status_code == 204
    unauthorized(await harness.client.get(url, headers=bot), "unknown or revoked bot key")


async def test_environment_bot_key_works(harness: Harness) -> None:
    url = await policy_for_bot(harness, harness.auth(ENV_OWNER))
    response = await harness.client.get(url, headers=bearer(ENV_BOT_KEY))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("key", "detail"),
    [
        pytest.param("cgk_" + "A" * 43, "unknown or revoked bot key", id="unknown-key"),
        pytest.param("cgk_" + "A" * 42, BOT_KEY_NEEDED, id="too-short"),
        pytest.param("cgk_" + "A" * 44, BOT_KEY_NEEDED, id="too-long"),
        pytest.param("cgk_" + "A" * 42 + "=", BOT_KEY_NEEDED, id="bad-char"),
        pytest.param("CGK_" + "A" * 43, BOT_KEY_NEEDED, id="bad-prefix"),
    ],
)
async def test_malformed_or_unknown_bot_key_is_401(harness: Harness, key: str, detail: str) -> None:
    url = await policy_for_bot(harness, harness.auth(ENV_OWNER))
    unauthorized(await harness.client.get(url, headers=bearer(key)), detail)


async def test_supabase_token_on_bot_route_is_401(harness: Harness, tokens: Tokens) -> None:
    url = await policy_for_bot(harness, harness.auth(ENV_OWNER))
    unauthorized(await harness.client.get(url), "missing bot key")
    for headers in (harness.auth(ENV_OWNER), bearer(tokens.mint(ENV_OWNER, alg="HS256"))):
        unauthorized(await harness.client.get(url, headers=headers), BOT_KEY_NEEDED)


BOT_ROUTES = [
    ("GET", f"/api/v1/bot/groups/{GROUP_ID}/policy", None),
    ("PUT", f"/api/v1/bot/groups/{GROUP_ID}", {"title": "Group"}),
    ("PUT", f"/api/v1/bot/channels/{CHANNEL_ID}", {"title": "Channel"}),
    ("PUT", f"/api/v1/bot/groups/{GROUP_ID}/channels/{CHANNEL_ID}", None),
    ("DELETE", f"/api/v1/bot/groups/{GROUP_ID}/channels/{CHANNEL_ID}", None),
    ("POST", f"/api/v1/bot/groups/{GROUP_ID}/migrate", {"new_chat_id": -1001000000002}),
    ("GET", f"/api/v1/bot/channels/{CHANNEL_ID}/groups", None),
    ("POST", "/api/v1/bot/verifications", {"events": []}),
    ("GET", f"/api/v1/bot/groups/{GROUP_ID}/members/12345", None),
    ("POST", "/api/v1/bot/heartbeat", {"instance_id": "i-1", "version": "1", "stats": {}}),
]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [pytest.param(*route, id=f"{route[0]} {route[1]}") for route in BOT_ROUTES],
)
async def test_bot_routes_take_only_bot_keys(
    harness: Harness, tokens: Tokens, method: str, path: str, body: dict[str, Any] | None
) -> None:
    async def call(headers: dict[str, str]) -> httpx.Response:
        return await harness.client.request(method, path, json=body, headers=headers)

    unauthorized(await call({}), "missing bot key")
    for token in (tokens.mint(ENV_OWNER), tokens.mint(ENV_OWNER, alg="HS256")):
        unauthorized(await call(bearer(token)), BOT_KEY_NEEDED)
    response = await call(bearer(ENV_BOT_KEY))
    assert response.status_code not in (401, 403), response.text


@pytest.mark.parametrize("path", ["/api/v1/groups/-1009", "/api/v1/groups/-1009/members"])
async def test_auth_comes_before_lookups(client, path):
    """An unknown group is 401 for a caller without a token, not 404: nothing leaks."""
    body = problem(await client.get(path), 401)
    assert body["detail"] == "missing bearer token"

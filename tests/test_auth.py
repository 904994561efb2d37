"""auth.py and the auth settings, without sockets: tokens, refresh, expiry order, keys checked at start."""

from __future__ import annotations

import base64
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway import cli, config
from gateway.auth import Authenticator, AuthError, ExpiryQueue, KeyConfigError, load_public_key

SECRET = "s3cret-for-tests-only-0123456789abcdef"
NOW = 1_800_000_000.0


def token(secret: str = SECRET, alg: str = "HS256", **claims: object) -> str:
    body = {"sub": "alice", "exp": int(NOW) + 60, **claims}
    return jwt.encode(body, secret, algorithm=alg)


def unsigned(claims: dict[str, object], header: dict[str, object]) -> str:
    def b64(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{b64(header)}.{b64(claims)}."


def hs256_with_raw_key(claims: dict[str, object], key: bytes) -> str:
    """An HS256 token keyed with any bytes (PyJWT itself refuses to sign with a PEM as the secret)."""
    import hashlib
    import hmac

    head_body = unsigned(claims, {"alg": "HS256", "typ": "JWT"})[:-1]
    sig = hmac.new(key, head_body.encode(), hashlib.sha256).digest()
    return head_body + "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyJWT reads the wall clock; pin it so exp/leeway cases are exact."""
    import jwt.api_jwt as api_jwt

    class FakeDatetime(api_jwt.datetime):  # type: ignore[name-defined,misc]
        @classmethod
        def now(cls, tz: object = None) -> api_jwt.datetime:  # type: ignore[name-defined]
            return api_jwt.datetime.fromtimestamp(NOW, tz=api_jwt.timezone.utc)

    monkeypatch.setattr(api_jwt, "datetime", FakeDatetime)


def auth(**kw: object) -> Authenticator:
    kw.setdefault("secret", SECRET)
    return Authenticator(clock=lambda: NOW, **kw)  # type: ignore[arg-type]


def test_principal_carries_exp() -> None:
    p = auth().authenticate(token(exp=int(NOW) + 30))
    assert (p.subject, p.exp) == ("alice", NOW + 30)


@pytest.mark.parametrize("tok", [
    None,
    "",
    "garbage",
    token(secret="wrong-secret-wrong-secret-wrong-00"),                  # forged
    token(exp=int(NOW) - 10),                                            # expired beyond the leeway
    unsigned({"sub": "alice", "exp": int(NOW) + 60}, {"alg": "none", "typ": "JWT"}),
    jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),            # no exp
    jwt.encode({"exp": int(NOW) + 60}, SECRET, algorithm="HS256"),      # no sub
    token(sub=5),
    token(exp=1e400),                                                    # inf: int() overflows
    token(exp=10**400),                                                  # an int no float holds
    token(exp="soon"),
    token(sub_allow="/a/>"),
    token(sub_allow=["/matches/>/x"]),
])
def test_bad_tokens(tok: str | None) -> None:
    with pytest.raises(AuthError):
        auth(leeway=5).authenticate(tok)


def test_leeway() -> None:
    tok = token(exp=int(NOW) - 3)
    with pytest.raises(AuthError):
        auth(leeway=0).authenticate(tok)
    assert auth(leeway=5).authenticate(tok).subject == "alice"
    a = auth(leeway=5)
    p = a.authenticate(tok)
    assert not a.expired(p, NOW) and a.expired(p, NOW + 2)


def test_audience_and_issuer() -> None:
    a = auth(audience="gw", issuer="https://idp")
    assert a.authenticate(token(aud="gw", iss="https://idp")).subject == "alice"
    assert a.authenticate(token(aud=["other", "gw"], iss="https://idp")).subject == "alice"
    for bad in (token(aud="other", iss="https://idp"), token(iss="https://idp"),
                token(aud="gw", iss="https://evil"), token(aud="gw")):
        with pytest.raises(AuthError):
            a.authenticate(bad)


def test_max_lifetime_refuses_far_future_exp() -> None:
    year_36812 = 1_099_511_627_776
    assert auth().authenticate(token(exp=year_36812)).exp == year_36812  # no limit configured
    a = auth(max_lifetime=3600, leeway=5)
    assert a.authenticate(token(exp=int(NOW) + 3600)).subject == "alice"
    for exp in (year_36812, int(NOW) + 3606):
        with pytest.raises(AuthError, match="ahead"):
            a.authenticate(token(exp=exp))
    with pytest.raises(AuthError):
        a.authenticate(token(exp=10**400))


def test_refresh_needs_the_same_sub() -> None:
    a = auth()
    old = a.authenticate(token(exp=int(NOW) + 10))
    new = a.refresh(old, token(exp=int(NOW) + 100, sub_allow=["/a/>"]))
    assert new.exp == NOW + 100 and new.sub_allow is not None and len(new.sub_allow) == 1
    with pytest.raises(AuthError, match="sub"):
        a.refresh(old, token(sub="mallory"))
    with pytest.raises(AuthError):
        a.refresh(old, token(exp=int(NOW) - 60))


def test_auth_off_and_empty_secret() -> None:
    off = Authenticator()
    assert not off.enabled and off.authenticate("anything").exp is None
    with pytest.raises(KeyConfigError):
        Authenticator(secret="")
    with pytest.raises(KeyConfigError):
        Authenticator(public_key_pem=b"")


def test_public_key_types_pick_their_algorithms() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def pem(k: object) -> bytes:
        return k.public_key().public_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                                           serialization.PublicFormat.SubjectPublicKeyInfo)

    assert load_public_key(pem(ec_key))[1] == ["ES256", "ES384", "ES512"]
    assert load_public_key(pem(rsa_key))[1][0] == "RS256"
    a = auth(secret=None, public_key_pem=pem(rsa_key))
    assert a.authenticate(token(secret=rsa_key, alg="RS256")).subject == "alice"  # type: ignore[arg-type]
    for bad in (token(secret=ec_key, alg="ES256"), token(alg="HS256"),  # type: ignore[arg-type]
                hs256_with_raw_key({"sub": "alice", "exp": int(NOW) + 60}, pem(rsa_key))):  # key confusion
        with pytest.raises(AuthError):
            a.authenticate(bad)
    for junk in (b"not a key", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", b"  \n"):
        with pytest.raises(KeyConfigError):
            load_public_key(junk)


def test_expiry_queue_pops_in_time_order_and_compacts() -> None:
    q: ExpiryQueue[str] = ExpiryQueue()
    for deadline, item in ((30.0, "c"), (10.0, "a"), (20.0, "b"), (10.0, "a2")):
        q.push(deadline, item)
    assert q.due(5.0) == []
    assert q.due(10.0) == [(10.0, "a"), (10.0, "a2")]
    assert q.due(25.0) == [(20.0, "b")] and len(q) == 1
    q.push(40.0, "d")
    q.compact(lambda d, item: item != "c")
    assert len(q) == 1 and q.due(100.0) == [(40.0, "d")]


# ---- settings: given but empty is an error, a bad key is one line at start ---------------------------

def _pem_file(tmp_path, content: bytes) -> str:  # type: ignore[no-untyped-def]
    path = tmp_path / "key.pem"
    path.write_bytes(content)
    return str(path)


def test_empty_secret_from_flag_env_or_file_is_an_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(config.ConfigError, match="empty"):
        config.load({"jwt_secret": ""}, env={})
    with pytest.raises(config.ConfigError, match="empty"):
        config.load({}, env={"GATEWAY_JWT_SECRET": ""})
    with pytest.raises(config.ConfigError, match="empty"):
        config.load({}, env={"GATEWAY_JWT_PUBLIC_KEY": ""})
    f = tmp_path / "gw.toml"
    f.write_text('jwt_secret = ""\n')
    with pytest.raises(config.ConfigError, match="empty"):
        config.load({}, env={}, file=str(f))
    # other empty variables still mean "not set"
    assert config.load({}, env={"GATEWAY_KAFKA": ""}).kafka is None


@pytest.mark.parametrize("content", [b"", b"hello\n", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"])
def test_bad_key_file_exits_2_with_one_line(tmp_path, capsys, content: bytes) -> None:  # type: ignore[no-untyped-def]
    code = cli.main(["serve", "--port", "0", "--jwt-public-key", _pem_file(tmp_path, content)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--jwt-public-key" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["serve", "--jwt-secret", ""],
    ["serve", "--jwt-leeway-ms", "-1"],
    ["serve", "--jwt-max-lifetime-s", "soon"],
])
def test_bad_auth_flags_exit_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err and "Traceback" not in err

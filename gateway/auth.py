"""Tokens -> principals. Sans-I/O; JWT verification by PyJWT.

With a secret (HMAC) or a public key (RSA/ECDSA) configured, `connect` must carry a JWT with `sub`
and `exp`; `sub_allow` / `pub_allow` list the subject patterns the holder may subscribe / publish to
(an absent list allows nothing). Without auth configured everything is allowed and tokens are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import jwt

from .subjects import Pattern, PatternError, Subject

HMAC_ALGORITHMS = ["HS256", "HS384", "HS512"]
PUBLIC_KEY_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]


class AuthError(Exception):
    """The token is missing, malformed, expired, badly signed or carries a bad pattern."""


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str | None               # the token's `sub`; None when auth is off
    sub_allow: tuple[Pattern, ...] | None  # None = everything allowed
    pub_allow: tuple[Pattern, ...] | None

    def may_subscribe(self, subject: Subject) -> bool:
        return self.sub_allow is None or any(p.matches(subject) for p in self.sub_allow)

    def may_publish(self, subject: Subject) -> bool:
        return self.pub_allow is None or any(p.matches(subject) for p in self.pub_allow)


ANONYMOUS = Principal(None, None, None)


class Authenticator:
    def __init__(self, *, secret: str | None = None, public_key_pem: str | None = None) -> None:
        if secret and public_key_pem:
            raise ValueError("a secret or a public key, not both")
        self._key: str | None = secret or public_key_pem
        self._algorithms = HMAC_ALGORITHMS if secret else PUBLIC_KEY_ALGORITHMS

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def authenticate(self, token: str | None) -> Principal:
        if self._key is None:
            return ANONYMOUS
        if not token:
            raise AuthError("a token is required")
        try:
            claims = jwt.decode(token, self._key, algorithms=self._algorithms,
                                options={"require": ["exp", "sub"]})
        except jwt.PyJWTError as exc:
            raise AuthError(f"bad token: {exc}") from None
        if not isinstance(claims.get("sub"), str):
            raise AuthError("bad token: 'sub' must be a string")
        return Principal(claims["sub"], _patterns(claims, "sub_allow"), _patterns(claims, "pub_allow"))


def _patterns(claims: dict[str, object], name: str) -> tuple[Pattern, ...]:
    raw = claims.get(name, [])
    if not isinstance(raw, list):
        raise AuthError(f"bad token: '{name}' must be a list of patterns")
    try:
        return tuple(Pattern(p) for p in raw)
    except PatternError as exc:
        raise AuthError(f"bad token: {exc}") from None

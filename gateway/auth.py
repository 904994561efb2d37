"""Tokens -> principals, and when they expire. Sans-I/O; JWT verification by PyJWT.

With a secret (HMAC) or a public key (RSA/ECDSA) configured, `connect` must carry a JWT with `sub`
and `exp`; `sub_allow` / `pub_allow` list the subject patterns the holder may subscribe / publish to
(an absent list allows nothing). Without auth configured everything is allowed and tokens are ignored.

A session's token is checked once, at `connect` (or `refresh`); its `exp` then goes into an
ExpiryQueue, which the gateway's liveness sweep drains: a session whose token ran out without a
refresh is closed 4001 (PROTOCOL.md 1.1, Session 5), also when it sends nothing.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .subjects import Pattern, PatternError, Subject

HMAC_ALGORITHMS = ["HS256", "HS384", "HS512"]
RSA_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
EC_ALGORITHMS = ["ES256", "ES384", "ES512"]
PUBLIC_KEY_ALGORITHMS = RSA_ALGORITHMS + EC_ALGORITHMS


class AuthError(Exception):
    """The token is missing, malformed, expired, badly signed or carries a bad pattern."""


class KeyConfigError(ValueError):
    """The configured secret or public key is unusable (empty, not PEM, unsupported type)."""


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str | None               # the token's `sub`; None when auth is off
    sub_allow: tuple[Pattern, ...] | None  # None = everything allowed
    pub_allow: tuple[Pattern, ...] | None
    exp: float | None = None          # the token's `exp` (Unix seconds); None when auth is off

    def may_subscribe(self, subject: Subject) -> bool:
        return self.sub_allow is None or any(p.matches(subject) for p in self.sub_allow)

    def may_publish(self, subject: Subject) -> bool:
        return self.pub_allow is None or any(p.matches(subject) for p in self.pub_allow)


ANONYMOUS = Principal(None, None, None)


def load_public_key(pem: str | bytes) -> tuple[Any, list[str]]:
    """A PEM public key -> (key object, the algorithms it may verify). Raises KeyConfigError with one line."""
    data = pem.encode() if isinstance(pem, str) else pem
    if not data.strip():
        raise KeyConfigError("the public key file is empty")
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KeyConfigError(f"not a PEM public key ({first})") from None
    # The key's type picks the algorithms: an RSA key never verifies an ES* token and vice versa.
    if isinstance(key, rsa.RSAPublicKey):
        return key, list(RSA_ALGORITHMS)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key, list(EC_ALGORITHMS)
    raise KeyConfigError(f"unsupported public key type {type(key).__name__} (RSA or EC only)")


class Authenticator:
    def __init__(self, *, secret: str | None = None, public_key_pem: str | bytes | None = None,
                 audience: str | None = None, issuer: str | None = None, leeway: float = 0.0,
                 max_lifetime: float | None = None, clock: Callable[[], float] = time.time) -> None:
        """`secret` / `public_key_pem`: None = auth off; given but empty (or a bad PEM): KeyConfigError,
        never "auth off". `max_lifetime`: refuse tokens whose exp lies further ahead (seconds)."""
        if secret is not None and public_key_pem is not None:
            raise ValueError("a secret or a public key, not both")
        self._key: Any = None
        self._algorithms: list[str] = []
        if secret is not None:
            if not secret:
                raise KeyConfigError("the JWT secret is empty")
            self._key, self._algorithms = secret, list(HMAC_ALGORITHMS)
        elif public_key_pem is not None:
            self._key, self._algorithms = load_public_key(public_key_pem)
        self.audience = audience or None
        self.issuer = issuer or None
        self.leeway = leeway
        self.max_lifetime = max_lifetime or None
        self.clock = clock

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def authenticate(self, token: str | None) -> Principal:
        if self._key is None:
            return ANONYMOUS
        if not token:
            raise AuthError("a token is required")
        require = ["exp", "sub"]
        if self.audience:
            require.append("aud")
        if self.issuer:
            require.append("iss")
        try:
            claims = jwt.decode(token, self._key, algorithms=self._algorithms, audience=self.audience,
                                issuer=self.issuer, leeway=self.leeway, options={"require": require})
        except jwt.PyJWTError as exc:
            raise AuthError(f"bad token: {exc}") from None
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. "exp": 1e400 is inf to int()
            raise AuthError(f"bad token: {type(exc).__name__}") from None
        if not isinstance(claims.get("sub"), str):
            raise AuthError("bad token: 'sub' must be a string")
        try:
            # PyJWT checked it is a number and not in the past (with the leeway); an integer beyond
            # what a float holds (10**400) is refused like "exp": 1e400, not an exception past the session
            exp = float(claims["exp"])
        except OverflowError:
            raise AuthError("bad token: exp is out of range") from None
        if self.max_lifetime is not None and exp - self.clock() > self.max_lifetime + self.leeway:
            raise AuthError(f"bad token: exp is more than {self.max_lifetime:g} s ahead")
        return Principal(claims["sub"], _patterns(claims, "sub_allow"), _patterns(claims, "pub_allow"), exp)

    def refresh(self, current: Principal, token: str | None) -> Principal:
        """The principal of a refresh token: valid, and for the same `sub` as the session's."""
        new = self.authenticate(token)
        if new.subject != current.subject:
            raise AuthError("refresh token is for another 'sub'")
        return new

    def expired(self, principal: Principal, now: float) -> bool:
        return principal.exp is not None and now >= principal.exp + self.leeway


def _patterns(claims: dict[str, object], name: str) -> tuple[Pattern, ...]:
    raw = claims.get(name, [])
    if not isinstance(raw, list):
        raise AuthError(f"bad token: '{name}' must be a list of patterns")
    try:
        return tuple(Pattern(p) for p in raw)
    except PatternError as exc:
        raise AuthError(f"bad token: {exc}") from None


T = TypeVar("T")


class ExpiryQueue(Generic[T]):
    """Items due at a time, popped in time order: one heap for all sessions (cheaper per connection
    than a timer each). Entries are never removed early: `due()` yields (deadline, item) and the
    caller checks that the item still holds that deadline (a refresh pushes a new one; a closed
    session is skipped). `compact(keep)` drops stale entries when the heap outgrows the live set."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._seq = itertools.count()  # ties never compare the items

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, deadline: float, item: T) -> None:
        heapq.heappush(self._heap, (deadline, next(self._seq), item))

    def due(self, now: float) -> list[tuple[float, T]]:
        out: list[tuple[float, T]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, item = heapq.heappop(heap)
            out.append((deadline, item))
        return out

    def compact(self, keep: Callable[[float, T], bool]) -> None:
        self._heap = [e for e in self._heap if keep(e[0], e[2])]
        heapq.heapify(self._heap)

"""Passwords (argon2id), session tokens (only their SHA-256 is stored) and a login rate limiter."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


def default_hasher() -> PasswordHasher:
    """argon2id with the library's recommended parameters (RFC 9106 low-memory profile)."""
    return PasswordHasher()


def new_password() -> str:
    """A random one-time password: 16 URL-safe characters (~96 bits)."""
    return secrets.token_urlsafe(12)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def verify_password(hasher: PasswordHasher, stored: str, password: str) -> bool:
    try:
        return hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


# A real hash to verify against when the user does not exist, so timing does not reveal names.
_DUMMY_HASH: dict[int, str] = {}


def dummy_verify(hasher: PasswordHasher, password: str) -> None:
    key = id(hasher)
    if key not in _DUMMY_HASH:
        _DUMMY_HASH[key] = hasher.hash(new_password())
    verify_password(hasher, _DUMMY_HASH[key], password)


def same_token(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two tokens (False when either is missing)."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


class RateLimiter:
    """At most ``limit`` events per ``window_s`` seconds per key (sliding window, in memory).

    Used for failed login attempts per client address and per user name; a single server process holds it.
    """

    def __init__(self, limit: int = 10, window_s: float = 300.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _prune(self, key: str, now: float) -> deque[float]:
        q = self._events.setdefault(key, deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def blocked(self, key: str) -> float | None:
        """Seconds until ``key`` may try again, or None when it is under the limit."""
        now = time.monotonic()
        with self._lock:
            q = self._prune(key, now)
            return q[0] + self.window_s - now if len(q) >= self.limit else None

    def hit(self, key: str) -> None:
        """Count one event (a failed login) for ``key``."""
        now = time.monotonic()
        with self._lock:
            self._prune(key, now).append(now)
            if len(self._events) > 100_000:  # bound memory under a flood of distinct keys
                self._events = {k: v for k, v in self._events.items() if v and v[-1] > now - self.window_s}

    def reset(self, key: str) -> None:
        with self._lock:
            self._events.pop(key, None)

"""Passwords (argon2id, a bounded number at once per process), session tokens (only their SHA-256 is
stored) and the login limiter (in memory for one process, or in the database for several)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session

from heed.feedback.store import LoginAttempt, Store

# argon2 takes ~64 MiB and most of a core per hash: at most this many run at once in a process, so a
# flood of logins queues instead of exhausting memory.
HASH_SLOTS = threading.BoundedSemaphore(2)


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


def hash_password(hasher: PasswordHasher, password: str) -> str:
    with HASH_SLOTS:
        return hasher.hash(password)


def verify_password(hasher: PasswordHasher, stored: str, password: str) -> bool:
    try:
        with HASH_SLOTS:
            return hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


# A real hash to verify against when the user does not exist, so timing does not reveal names.
_DUMMY_HASH: dict[int, str] = {}


def dummy_verify(hasher: PasswordHasher, password: str) -> None:
    key = id(hasher)
    if key not in _DUMMY_HASH:
        _DUMMY_HASH[key] = hash_password(hasher, new_password())
    verify_password(hasher, _DUMMY_HASH[key], password)


def same_token(a: str | None, b: str | None) -> bool:
    """Constant-time comparison of two tokens (False when either is missing)."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def login_wait(
    fails: int, last_fail: float | None, inflight: int, limit: int, now: float, policy: tuple[float, float]
) -> float | None:
    """The login limiter's rule for one key: None when one more attempt may go ahead, else seconds to
    wait. ``fails`` failures in the window (the last at ``last_fail``) plus ``inflight`` attempts
    being checked below ``limit``: go ahead; at the limit with attempts in flight: 1 s; else a
    backoff of ``base_s * 2**(fails - limit)`` (at most ``max_backoff_s``) after the last failure,
    ``policy = (base_s, max_backoff_s)``."""
    if fails + inflight < limit:
        return None
    if fails < limit or inflight:  # the remaining attempts are being checked right now
        return 1.0
    assert last_fail is not None
    base_s, max_backoff_s = policy
    wait = last_fail + min(base_s * 2 ** (fails - limit), max_backoff_s) - now
    return wait if wait > 0 else None


class LoginLimiter:
    """Failed logins, limited per (user name, client address) and per client address, counted
    *before* the password is hashed.

    :meth:`acquire` reserves an attempt and :meth:`release` settles it, so concurrent guesses count
    while their hashes run: with ``limit`` 10, thirty guesses sent at once get ten hashes and twenty
    429s. A key with ``limit`` failures in the last ``window_s`` seconds backs off: one attempt at a
    time, ``base_s * 2**(failures - limit)`` seconds after its last failure, at most ``max_backoff_s``
    (30 s): a guesser elsewhere cannot lock anyone out, and the owner of the right password waits
    seconds, never minutes. A success clears its (name, address) failures. Names ignore case.
    In memory, for one server process; :class:`SharedLoginLimiter` keeps the same counts in the
    database for ``heed annotate serve --workers N``.
    """

    def __init__(
        self,
        limit: int = 10,
        window_s: float = 300.0,
        *,
        address_limit: int | None = None,
        base_s: float = 2.0,
        max_backoff_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = {"pair": limit, "address": address_limit or 10 * limit}
        self.window_s, self.policy = window_s, (base_s, max_backoff_s)
        self.clock = clock
        self._fails: dict[tuple, deque[float]] = {}
        self._inflight: dict[tuple, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _keys(name: str, address: str) -> dict[str, tuple]:
        return {"pair": ("pair", name.lower(), address), "address": ("address", address)}

    def _wait(self, key: tuple, limit: int, now: float) -> float | None:
        q = self._fails.get(key)
        while q and q[0] <= now - self.window_s:
            q.popleft()
        last = q[-1] if q else None
        return login_wait(len(q) if q else 0, last, self._inflight.get(key, 0), limit, now, self.policy)

    def acquire(self, name: str, address: str) -> float | None:
        """Reserve one attempt: None when it may go ahead (then call :meth:`release`), else the
        seconds to wait before trying again."""
        now = self.clock()
        keys = self._keys(name, address)
        with self._lock:
            waits = [w for kind, key in keys.items() if (w := self._wait(key, self.limits[kind], now))]
            if waits:
                return max(waits)
            for key in keys.values():
                self._inflight[key] = self._inflight.get(key, 0) + 1
            return None

    def release(self, name: str, address: str, *, ok: bool | None) -> None:
        """Settle an attempt reserved by :meth:`acquire`: ``ok=False`` counts a failure, ``True`` clears
        the pair's failures, ``None`` does neither (the attempt never reached a password check)."""
        now = self.clock()
        keys = self._keys(name, address)
        with self._lock:
            for key in keys.values():
                n = self._inflight.get(key, 0) - 1
                if n > 0:
                    self._inflight[key] = n
                else:
                    self._inflight.pop(key, None)
            if ok:
                self._fails.pop(keys["pair"], None)
            elif ok is False:
                for key in keys.values():
                    self._fails.setdefault(key, deque()).append(now)
            if len(self._fails) > 100_000:  # bound memory under a flood of distinct keys
                self._fails = {k: v for k, v in self._fails.items() if v and v[-1] > now - self.window_s}


# a pending attempt older than this belongs to a worker that died mid-check: it counts as a failure
PENDING_MAX_S = 60.0
PRUNE_EVERY = 100  # each process prunes expired attempts of all addresses at its 1st, 101st, ... acquire
PRUNE_LOCK = 0x68656564_6C6F67  # the pruners' advisory lock key on PostgreSQL ("heedlog")


class SharedLoginLimiter:
    """:class:`LoginLimiter`'s counts kept in the database (``heed_login_attempts``), so every worker
    process of ``heed annotate serve --workers N`` sees every attempt: an attacker gets the limit,
    not N times it. Same rule (:func:`login_wait`), same count-before-hash order: :meth:`acquire`
    inserts a ``pending`` row in the transaction that counted, :meth:`release` settles it.

    Attempts of one client address are serialised (SQLite: its single writer; PostgreSQL: a
    transaction-scoped advisory lock on the address, which both keys contain), so concurrent
    guesses cannot all read "below the limit". A worker SIGKILLed mid-check leaves its row
    ``pending``; after :data:`PENDING_MAX_S` it counts as a failure. Times are wall-clock
    (``time.time``), shared by the processes.
    """

    def __init__(
        self,
        store: Store,
        limit: int = 10,
        window_s: float = 300.0,
        *,
        address_limit: int | None = None,
        base_s: float = 2.0,
        max_backoff_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limits = {"pair": limit, "address": address_limit or 10 * limit}
        self.window_s, self.policy, self.clock = window_s, (base_s, max_backoff_s), clock
        self.horizon_s = max(window_s, PENDING_MAX_S)  # older rows no longer count (and are pruned)
        self._acquires = 0

    def _prune(self, session: Session, now: float) -> None:
        """Delete the rows past the horizon, all addresses. One pruner at a time on PostgreSQL, and
        no other statement touches rows that old, so two transactions never wait on each other."""
        lock = text("SELECT pg_try_advisory_xact_lock(:k)")
        if not self.store.is_sqlite and not session.execute(lock, {"k": PRUNE_LOCK}).scalar():
            return
        session.execute(delete(LoginAttempt).where(LoginAttempt.at <= now - self.horizon_s))

    def _lock_address(self, session: Session, address: str) -> None:
        if not self.store.is_sqlite:  # (SQLite: the write transaction already holds the only lock)
            key = int.from_bytes(
                hashlib.sha256(b"heed-login:" + address.encode()).digest()[:8], "big", signed=True
            )
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})

    def acquire(self, name: str, address: str) -> float | None:
        """Reserve one attempt: None when it may go ahead (then call :meth:`release`), else the
        seconds to wait before trying again."""
        now, name = self.clock(), name.lower()
        with self.store.write() as s:
            self._lock_address(s, address)
            self._acquires += 1
            if self._acquires % PRUNE_EVERY == 1:
                self._prune(s, now)
            rows = s.execute(
                select(LoginAttempt.name, LoginAttempt.state, LoginAttempt.at).where(
                    LoginAttempt.address == address, LoginAttempt.at > now - self.horizon_s
                )
            ).all()
            counts = {"pair": [0, None, 0], "address": [0, None, 0]}  # fails, last fail, in flight
            for row_name, state, at in rows:
                kinds = ("address", "pair") if row_name == name else ("address",)
                for kind in kinds:
                    if kind == "pair" and state == "cleared":
                        continue
                    c = counts[kind]
                    if state == "pending" and at > now - PENDING_MAX_S:
                        c[2] += 1
                    elif at > now - self.window_s:
                        c[0] += 1
                        c[1] = at if c[1] is None else max(c[1], at)
            waits = [
                w
                for kind, (fails, last, inflight) in counts.items()
                if (w := login_wait(fails, last, inflight, self.limits[kind], now, self.policy))
            ]
            if waits:
                return max(waits)
            s.add(LoginAttempt(name=name, address=address, state="pending", at=now))
            return None

    def release(self, name: str, address: str, *, ok: bool | None) -> None:
        """Settle an attempt reserved by :meth:`acquire`: ``ok=False`` counts a failure, ``True`` clears
        the pair's failures, ``None`` does neither (the attempt never reached a password check)."""
        now, name = self.clock(), name.lower()
        pair = (
            LoginAttempt.name == name,
            LoginAttempt.address == address,
            LoginAttempt.at > now - self.horizon_s,
        )
        with self.store.write() as s:
            self._lock_address(s, address)
            # the newest pending row is this attempt's or a twin's (concurrent, as good); older ones
            # may be strays of a dead worker
            pending = s.execute(
                select(LoginAttempt.id)
                .where(*pair, LoginAttempt.state == "pending")
                .order_by(LoginAttempt.id.desc())
                .limit(1)
            ).scalar()
            if ok is False:
                if pending is not None:
                    s.execute(
                        update(LoginAttempt).where(LoginAttempt.id == pending).values(state="failed", at=now)
                    )
                return
            if pending is not None:
                s.execute(delete(LoginAttempt).where(LoginAttempt.id == pending))
            if ok:  # forgive the pair's failures, a dead worker's stale pending ones included
                stale = (LoginAttempt.state == "pending") & (LoginAttempt.at <= now - PENDING_MAX_S)
                s.execute(
                    update(LoginAttempt)
                    .where(*pair, (LoginAttempt.state == "failed") | stale)
                    .values(state="cleared")
                )

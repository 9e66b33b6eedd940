"""The annotation service: every action of the web app as a plain Python method.

The HTTP API calls these methods and nothing else, so a script (or ``heed demo``'s simulated
annotators) can drive the very same code path without a server::

    from heed.feedback.service import Feedback

    fb = Feedback("sqlite:///labels.db")
    fb.create_project("helpful", task="ranking", overlap=2, guidelines="Prefer the correct answer.")
    fb.import_records("helpful", [{"prompt": "2+2?", "responses": ["4", "5", "four"]}])
    fb.add_user("ann1")                                  # returns (UserInfo, one-time password)
    a = fb.next_assignment("ann1", "helpful")            # None when nothing is left for ann1
    fb.submit("ann1", "helpful", a.record_id, ranks=a.display_ranks([1, 3, 1]), key="ann1-0001")
    rows = fb.export("helpful", "pairs")                 # DESIGN.md pair records with a weight

Users are given by name, id or :class:`UserInfo`; projects by name. Errors are
:class:`heed.errors.HeedError` subclasses with a message meant for the user.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from heed.errors import DataError, HeedError
from heed.feedback import aggregate as agg
from heed.feedback import auth
from heed.feedback.records import RecordIn, check_text, iter_records, parse_record, write_rows
from heed.feedback.records import file_format as records_file_format
from heed.feedback.store import (
    Annotation,
    AuthSession,
    Lease,
    Membership,
    Project,
    Record,
    Skip,
    Store,
    User,
    utcnow,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MIN_PASSWORD = 10  # characters in a password a user chooses
Task = Literal["pairwise", "ranking"]
Role = Literal["annotator", "admin"]
PAIRWISE_CHOICES = ("A", "B", "tie", "discard")


class NotFoundError(HeedError):
    """A project, record or user that does not exist (HTTP 404)."""


class ConflictError(HeedError):
    """The action clashes with the current state, e.g. a record already full (HTTP 409)."""


class ForbiddenError(HeedError):
    """The user may not do this (HTTP 403)."""


@dataclass(frozen=True)
class UserInfo:
    id: int
    name: str
    role: str
    must_change_password: bool = False  # still on a one-time password: may only change it
    active: bool = True

    @classmethod
    def of(cls, u: User) -> UserInfo:
        return cls(u.id, u.name, u.role, bool(u.must_change_password), bool(u.active))


@dataclass(frozen=True)
class ProjectInfo:
    name: str
    task: str
    guidelines: str
    overlap: int
    lease_seconds: int
    allow_tie: bool
    allow_discard: bool
    rationale: str  # off | optional | required
    num_records: int = 0


@dataclass(frozen=True)
class Assignment:
    """A record leased to one annotator, its responses in the order they are shown to them.

    ``order[p]`` is the stored index of the response shown at position ``p``; submissions speak
    in display positions (A = first shown; ``ranks[p]`` for the response shown at ``p``).
    """

    project: str
    task: str
    record_id: int
    prompt: Any
    responses: list[str]
    order: list[int]
    expires_at: dt.datetime
    meta: dict[str, Any] = field(default_factory=dict)

    def display_ranks(self, ranks_by_index: Sequence[float]) -> list[float]:
        """Turn ranks given per stored response into ranks per display position."""
        return [ranks_by_index[i] for i in self.order]

    def display_choice(self, winner_index: int | None) -> str:
        """``"A"`` / ``"B"`` for the stored response ``winner_index`` (``None`` gives ``"tie"``)."""
        if winner_index is None:
            return "tie"
        return "AB"[self.order.index(winner_index)]


@dataclass(frozen=True)
class Submitted:
    annotation_id: int
    record_id: int
    duplicate: bool  # True when this idempotency key had been stored before (nothing new written)


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise DataError(
            f"{what} {name!r}: use 1-64 letters, digits, '_', '.', '-' (starting with a letter or digit)"
        )
    return name


class Feedback:
    """The annotation service over one database (SQLite path/URL or PostgreSQL URL)."""

    def __init__(
        self,
        db: str | Path,
        *,
        hasher: Any = None,
        seed: int | None = None,
        allow_name_clashes: bool = False,
    ) -> None:
        self.store = Store(db, allow_name_clashes=allow_name_clashes)
        self.hasher = hasher or auth.default_hasher()
        self._rng = random.Random(seed)

    def close(self) -> None:
        self.store.close()

    # ---------------------------------------------------------------- users

    def add_user(
        self, name: str, role: Role = "annotator", password: str | None = None
    ) -> tuple[UserInfo, str]:
        """Create a user; returns it with its password.

        Without ``password`` a random one-time password is made, which the user must change at
        first login. Names ignore case: ``ANN1`` clashes with an existing ``ann1``.
        """
        _check_name(name, "user")
        if role not in ("annotator", "admin"):
            raise DataError(f"role {role!r}: expected annotator or admin")
        one_time = password is None
        password = password or auth.new_password()
        digest = auth.hash_password(self.hasher, password)
        try:
            with self.store.write() as s:
                if s.scalar(select(User.name).where(func.lower(User.name) == name.lower())):
                    raise ConflictError(f"user {name!r} already exists (names ignore case)")
                user = User(
                    name=name, role=role, password_hash=digest, active=True, must_change_password=one_time
                )
                s.add(user)
                s.flush()
                info = UserInfo.of(user)
        except IntegrityError as exc:
            raise ConflictError(f"user {name!r} already exists (names ignore case)") from exc
        return info, password

    def set_password(self, name: str | int | UserInfo, password: str | None = None) -> str:
        """Replace a user's password and end their sessions. Without ``password`` a random one-time
        password is made, which the user must change at their next login."""
        one_time = password is None
        password = password or auth.new_password()
        digest = auth.hash_password(self.hasher, password)
        with self.store.write() as s:
            user = self._user(s, name)
            user.password_hash = digest
            user.must_change_password = one_time
            s.execute(delete(AuthSession).where(AuthSession.user_id == user.id))
        return password

    def change_password(
        self, user: str | int | UserInfo, current: str, new: str, *, keep_session: str | None = None
    ) -> None:
        """Self-service: replace the password after checking the current one. Ends the user's other
        sessions (``keep_session`` is the token of the one making the change)."""
        if not isinstance(new, str) or len(new) < MIN_PASSWORD or len(new) > 256:
            raise DataError(f"new_password: expected {MIN_PASSWORD} to 256 characters")
        if new == current:
            raise DataError("new_password: must differ from the current password")
        with self.store.read() as s:
            u = self._user(s, user)
            stored, name = u.password_hash, u.name
        if new.lower() == name.lower():
            raise DataError("new_password: must not be the user name")
        if not auth.verify_password(self.hasher, stored, current):
            raise ForbiddenError("current_password: wrong password")
        digest = auth.hash_password(self.hasher, new)
        with self.store.write() as s:
            u = self._user(s, user)
            u.password_hash = digest
            u.must_change_password = False
            q = delete(AuthSession).where(AuthSession.user_id == u.id)
            if keep_session:
                q = q.where(AuthSession.token_hash != auth.token_hash(keep_session))
            s.execute(q)

    def set_active(self, user: str | int | UserInfo, active: bool) -> UserInfo:
        """Disable (``active=False``: no login, sessions ended, pending records released) or enable a
        user. Their stored annotations stay. The last active admin cannot be disabled."""
        with self.store.write() as s:
            u = self._user(s, user)
            if not active and u.role == "admin" and u.active:
                admins = s.scalar(
                    select(func.count()).select_from(User).where(User.role == "admin", User.active.is_(True))
                )
                if (admins or 0) <= 1:
                    raise ConflictError(f"user {u.name!r} is the last active admin; add another admin first")
            u.active = bool(active)
            if not active:
                s.execute(delete(AuthSession).where(AuthSession.user_id == u.id))
                s.execute(delete(Lease).where(Lease.user_id == u.id))
            s.flush()
            return UserInfo.of(u)

    def rename_user(self, old: str | int | UserInfo, new: str) -> UserInfo:
        """Give a user a new name (e.g. to resolve two names that differ only in case)."""
        _check_name(new, "user")
        try:
            with self.store.write() as s:
                u = self._user(s, old, exact=True)
                clash = s.scalar(select(User.id).where(func.lower(User.name) == new.lower(), User.id != u.id))
                if clash is not None:
                    raise ConflictError(f"user {new!r} already exists (names ignore case)")
                u.name = new
                s.flush()
                return UserInfo.of(u)
        except IntegrityError as exc:
            raise ConflictError(f"user {new!r} already exists (names ignore case)") from exc

    def users(self) -> list[UserInfo]:
        with self.store.read() as s:
            return [UserInfo.of(u) for u in s.scalars(select(User).order_by(User.id))]

    def user(self, user: str | int | UserInfo) -> UserInfo:
        with self.store.read() as s:
            return UserInfo.of(self._user(s, user))

    def authenticate(self, name: str, password: str) -> UserInfo | None:
        """The (active) user when the password matches (argon2 verify), else None. The name ignores case;
        an unknown name costs the same hash, so timing does not reveal which names exist."""
        with self.store.read() as s:
            u = (
                s.scalar(select(User).where(func.lower(User.name) == name.lower(), User.active.is_(True)))
                if isinstance(name, str) and NAME_RE.match(name)
                else None
            )
            stored = u.password_hash if u else None
            info = UserInfo.of(u) if u else None
        if stored is None:
            auth.dummy_verify(self.hasher, password)
            return None
        return info if auth.verify_password(self.hasher, stored, password) else None

    def open_session(
        self, user: str | int | UserInfo, kind: str = "cookie", hours: float = 12.0
    ) -> tuple[str, str]:
        """Start a session; returns ``(token, csrf_token)``. Only the token's hash is stored."""
        token, csrf = auth.new_token(), auth.new_token()
        with self.store.write() as s:
            u = self._user(s, user)
            s.execute(delete(AuthSession).where(AuthSession.expires_at < utcnow()))
            s.add(
                AuthSession(
                    token_hash=auth.token_hash(token),
                    user_id=u.id,
                    csrf_token=csrf,
                    kind=kind,
                    expires_at=utcnow() + dt.timedelta(hours=hours),
                )
            )
        return token, csrf

    def session_user(self, token: str) -> tuple[UserInfo, str, str] | None:
        """``(user, csrf_token, kind)`` for a live session token, else None."""
        with self.store.read() as s:
            row = s.execute(
                select(User, AuthSession)
                .join(AuthSession, AuthSession.user_id == User.id)
                .where(
                    AuthSession.token_hash == auth.token_hash(token),
                    AuthSession.expires_at > utcnow(),
                    User.active.is_(True),
                )
            ).first()
            if row is None:
                return None
            u, sess = row
            return UserInfo.of(u), sess.csrf_token, sess.kind

    def close_session(self, token: str) -> None:
        with self.store.write() as s:
            s.execute(delete(AuthSession).where(AuthSession.token_hash == auth.token_hash(token)))

    # ---------------------------------------------------------------- projects

    def create_project(
        self,
        name: str,
        task: Task = "pairwise",
        *,
        guidelines: str = "",
        overlap: int = 1,
        allow_tie: bool = True,
        allow_discard: bool = True,
        rationale: Literal["off", "optional", "required"] = "optional",
        lease_seconds: int = 600,
    ) -> ProjectInfo:
        """Create a project. ``overlap`` = annotations wanted per record; a handed-out record is
        reserved for its annotator for ``lease_seconds``."""
        _check_name(name, "project")
        if task not in ("pairwise", "ranking"):
            raise DataError(f"task {task!r}: expected pairwise or ranking")
        if not 1 <= int(overlap) <= 100:
            raise DataError(f"overlap {overlap}: expected 1 to 100 annotations per record")
        if not 10 <= int(lease_seconds) <= 7 * 24 * 3600:
            raise DataError(f"lease_seconds {lease_seconds}: expected 10 to 604800")
        if rationale not in ("off", "optional", "required"):
            raise DataError(f"rationale {rationale!r}: expected off, optional or required")
        check_text(guidelines, "guidelines", allow_nul=False, max_chars=100_000)
        options = {"allow_tie": bool(allow_tie), "allow_discard": bool(allow_discard), "rationale": rationale}
        try:
            with self.store.write() as s:
                p = Project(
                    name=name,
                    task=task,
                    guidelines=guidelines,
                    options=options,
                    overlap=int(overlap),
                    lease_seconds=int(lease_seconds),
                )
                s.add(p)
                s.flush()
                return self._project_info(p, 0)
        except IntegrityError as exc:
            raise ConflictError(f"project {name!r} already exists") from exc

    def project(self, name: str) -> ProjectInfo:
        with self.store.read() as s:
            p = self._project(s, name)
            n = s.scalar(select(func.count()).select_from(Record).where(Record.project_id == p.id)) or 0
            return self._project_info(p, n)

    def projects(self, user: str | int | UserInfo | None = None) -> list[ProjectInfo]:
        """Every project, or those ``user`` may open (an admin: all; an annotator: their memberships)."""
        with self.store.read() as s:
            counts = dict(
                s.execute(select(Record.project_id, func.count()).group_by(Record.project_id)).all()
            )
            q = select(Project).order_by(Project.id)
            if user is not None:
                u = self._user(s, user)
                if u.role != "admin":
                    q = q.join(Membership, Membership.project_id == Project.id).where(
                        Membership.user_id == u.id
                    )
            return [self._project_info(p, counts.get(p.id, 0)) for p in s.scalars(q)]

    # ---------------------------------------------------------------- membership

    def add_member(self, project: str, user: str | int | UserInfo) -> bool:
        """Let an annotator work on a project; returns False when they already could."""
        with self.store.write() as s:
            p, u = self._project(s, project), self._user(s, user)
            if s.get(Membership, (p.id, u.id)) is not None:
                return False
            s.add(Membership(project_id=p.id, user_id=u.id))
            return True

    def remove_member(self, project: str, user: str | int | UserInfo) -> bool:
        """Take a project away from an annotator (their stored annotations stay; pending records are
        released). Returns False when they were not a member."""
        with self.store.write() as s:
            p, u = self._project(s, project), self._user(s, user)
            s.execute(delete(Lease).where(Lease.project_id == p.id, Lease.user_id == u.id))
            return bool(
                s.execute(
                    delete(Membership).where(Membership.project_id == p.id, Membership.user_id == u.id)
                ).rowcount
            )

    def members(self, project: str) -> list[str]:
        """Names of the project's members, in the order they were added."""
        with self.store.read() as s:
            p = self._project(s, project)
            return list(
                s.scalars(
                    select(User.name)
                    .join(Membership, Membership.user_id == User.id)
                    .where(Membership.project_id == p.id)
                    .order_by(Membership.created_at, User.id)
                )
            )

    def can_access(self, user: str | int | UserInfo, project: str) -> bool:
        """True when the project exists and the user is an admin or one of its members."""
        with self.store.read() as s:
            u = self._user(s, user)
            p = s.scalar(select(Project).where(Project.name == project)) if isinstance(project, str) else None
            if p is None:
                return False
            return u.role == "admin" or s.get(Membership, (p.id, u.id)) is not None

    # ---------------------------------------------------------------- records

    def import_records(
        self, project: str, records: Iterable[dict[str, Any] | RecordIn], *, batch_size: int = 500
    ) -> int:
        """Validate and add records (dicts in any accepted form, or :class:`RecordIn`); returns the count.

        All records are validated before any is stored (one transaction); a bad record raises
        :class:`DataError` naming it.
        """
        info = self.project(project)
        # Validate everything first: a bad record stores nothing and names itself.
        batch: list[RecordIn] = []
        for i, raw in enumerate(records):
            rec = raw if isinstance(raw, RecordIn) else parse_record(raw, f"record {i}", task=info.task)
            if info.task == "pairwise" and len(rec.responses) != 2:
                raise DataError(f"record {i}: responses: a pairwise project needs exactly 2")
            batch.append(rec)
        with self.store.write() as s:
            pid = self._project(s, project).id
            for start in range(0, len(batch), batch_size):
                s.add_all(
                    Record(
                        project_id=pid,
                        external_id=r.external_id,
                        prompt=r.prompt,
                        responses=r.responses,
                        meta=r.meta,
                        priority=0.0,
                        n_done=0,
                    )
                    for r in batch[start : start + batch_size]
                )
                s.flush()
        return len(batch)

    def import_file(self, project: str, path: str | Path, fmt: str | None = None) -> int:
        """Import a JSONL file, Parquet file or ``datasets`` folder; errors name file:line and field."""
        return self.import_records(project, iter_records(path, task=self.project(project).task, fmt=fmt))

    def set_priorities(self, project: str, score: Callable[[list[Any], list[str]], list[float]]) -> int:
        """Show the most uncertain records first: priority = smallest gap between two responses'
        reward-model scores (``score(prompts, responses) -> list[float]``, one call per record batch).

        Returns the number of records scored.
        """
        from heed.feedback.uncertainty import min_score_gap

        with self.store.read() as s:
            pid = self._project(s, project).id
            rows = s.execute(
                select(Record.id, Record.prompt, Record.responses).where(Record.project_id == pid)
            ).all()
        gaps = {}
        for rid, prompt, responses in rows:
            gaps[rid] = min_score_gap(score, prompt, responses)
        with self.store.write() as s:
            for rid, gap in gaps.items():
                s.execute(update(Record).where(Record.id == rid).values(priority=gap))
        return len(gaps)

    def record(self, project: str, record_id: int) -> dict[str, Any]:
        with self.store.read() as s:
            p = self._project(s, project)
            r = s.get(Record, record_id)
            if r is None or r.project_id != p.id:
                raise NotFoundError(f"record {record_id} not found in project {project!r}")
            return {
                "record_id": r.id,
                "id": r.external_id,
                "prompt": r.prompt,
                "responses": r.responses,
                "metadata": r.meta,
                "n_done": r.n_done,
            }

    # ---------------------------------------------------------------- assignment

    def next_assignment(self, user: str | int | UserInfo, project: str) -> Assignment | None:
        """The record this annotator should label next, leased to them; None when none is left.

        A pending lease is returned again (same order). Otherwise: records the annotator has neither
        done nor skipped whose annotations plus live leases are below ``overlap``, fewest first, then
        by priority (e.g. reward-model uncertainty), then in import order.
        """
        with self.store.write() as s:
            u = self._user(s, user)
            p = self._project(s, project)
            now = utcnow()
            s.execute(
                delete(Lease).where(Lease.project_id == p.id, Lease.user_id == u.id, Lease.expires_at <= now)
            )
            lease = s.scalar(
                select(Lease)
                .where(Lease.project_id == p.id, Lease.user_id == u.id)
                .order_by(Lease.id.desc())
                .limit(1)
            )
            if lease is not None:
                lease.expires_at = now + dt.timedelta(seconds=p.lease_seconds)
                return self._assignment(s, p, lease)
            live = (
                select(func.count())
                .select_from(Lease)
                .where(Lease.record_id == Record.id, Lease.expires_at > now)
                .correlate(Record)
                .scalar_subquery()
            )
            mine = select(Annotation.id).where(Annotation.record_id == Record.id, Annotation.user_id == u.id)
            skipped = select(Skip.id).where(Skip.record_id == Record.id, Skip.user_id == u.id)
            load = Record.n_done + live
            candidates = (
                s.execute(
                    select(Record.id)
                    .where(
                        Record.project_id == p.id,
                        Record.n_done < p.overlap,
                        ~mine.exists(),
                        ~skipped.exists(),
                        load < p.overlap,
                    )
                    .order_by(load, Record.priority, Record.id)
                    .limit(25)
                )
                .scalars()
                .all()
            )
            for rid in candidates:
                rec = s.get(Record, rid, with_for_update=not self.store.is_sqlite, populate_existing=True)
                # Under the row lock (PostgreSQL) or the write lock (SQLite), count again.
                taken = (
                    s.scalar(
                        select(func.count())
                        .select_from(Lease)
                        .where(Lease.record_id == rid, Lease.expires_at > now)
                    )
                    or 0
                )
                if rec is None or rec.n_done + taken >= p.overlap:
                    continue
                order = list(range(len(rec.responses)))
                self._rng.shuffle(order)
                lease = Lease(
                    project_id=p.id,
                    record_id=rid,
                    user_id=u.id,
                    display_order=order,
                    leased_at=now,
                    expires_at=now + dt.timedelta(seconds=p.lease_seconds),
                )
                s.add(lease)
                s.flush()
                return self._assignment(s, p, lease)
            return None

    def release(self, user: str | int | UserInfo, project: str) -> int:
        """Give back the annotator's pending leases (e.g. on logout); returns how many."""
        with self.store.write() as s:
            u, p = self._user(s, user), self._project(s, project)
            return (
                s.execute(delete(Lease).where(Lease.project_id == p.id, Lease.user_id == u.id)).rowcount or 0
            )

    def skip(self, user: str | int | UserInfo, project: str, record_id: int) -> bool:
        """Pass over the record leased to this annotator: no vote is stored, the lease (and so the
        slot) is released for others, and the record is not offered to this annotator again.
        Returns False when it had been skipped already (a retry)."""
        with self.store.write() as s:
            u, p = self._user(s, user), self._project(s, project)
            if s.scalar(select(Skip.id).where(Skip.record_id == record_id, Skip.user_id == u.id)):
                return False
            lease = s.scalar(
                select(Lease).where(
                    Lease.project_id == p.id, Lease.record_id == record_id, Lease.user_id == u.id
                )
            )
            if lease is None:
                raise ConflictError(
                    f"record {record_id} is not assigned to you; fetch the next assignment first"
                )
            s.delete(lease)
            s.add(Skip(project_id=p.id, record_id=record_id, user_id=u.id))
            return True

    # ---------------------------------------------------------------- submissions

    def submit(
        self,
        user: str | int | UserInfo,
        project: str,
        record_id: int,
        *,
        choice: str | None = None,
        ranks: Sequence[float] | None = None,
        discard: bool = False,
        rationale: str | None = None,
        key: str | None = None,
        duration_ms: int | None = None,
    ) -> Submitted:
        """Store one judgement, exactly once per idempotency ``key``.

        Pairwise: ``choice`` is ``"A"`` (first shown), ``"B"``, ``"tie"`` or ``"discard"``.
        Ranking: ``ranks`` per display position (lower is better, equal = tie), or ``discard=True``.
        Re-sending a stored key returns the stored annotation with ``duplicate=True``.
        """
        key = key or auth.new_token()
        if not isinstance(key, str) or not 1 <= len(key) <= 128 or not key.isprintable():
            raise DataError("idempotency key: expected 1-128 printable characters")
        if rationale is not None:
            check_text(rationale, "rationale", allow_nul=False, max_chars=10_000)
        if duration_ms is not None and not 0 <= int(duration_ms) <= 2**31 - 1:
            raise DataError("duration_ms: expected 0 to 2147483647")
        try:
            return self._submit(user, project, record_id, choice, ranks, discard, rationale, key, duration_ms)
        except IntegrityError:
            # A concurrent request with the same key (or for the same record) won the race.
            with self.store.read() as s:
                u = self._user(s, user)
                done = s.scalar(
                    select(Annotation).where(Annotation.user_id == u.id, Annotation.idempotency_key == key)
                )
                if done is not None and done.record_id == record_id:
                    return Submitted(done.id, done.record_id, True)
            raise ConflictError(f"record {record_id}: you have already annotated it") from None

    def _submit(
        self, user, project, record_id, choice, ranks, discard, rationale, key, duration_ms
    ) -> Submitted:  # type: ignore[no-untyped-def]
        with self.store.write() as s:
            u = self._user(s, user)
            p = self._project(s, project)
            # step 1: a replay of a stored submission returns it unchanged
            done = s.scalar(
                select(Annotation).where(Annotation.user_id == u.id, Annotation.idempotency_key == key)
            )
            if done is not None:
                if done.record_id != record_id:
                    raise ConflictError(
                        f"idempotency key {key!r} was already used for record {done.record_id}"
                    )
                return Submitted(done.id, done.record_id, True)
            # step 2: the record, the annotator's lease on it, and room left
            rec = s.get(Record, record_id, with_for_update=not self.store.is_sqlite)
            if rec is None or rec.project_id != p.id:
                raise NotFoundError(f"record {record_id} not found in project {p.name!r}")
            mine = s.scalar(
                select(Annotation).where(Annotation.record_id == rec.id, Annotation.user_id == u.id)
            )
            if mine is not None:
                # Under the row lock: a retry that raced its original (PostgreSQL, READ COMMITTED)
                # finds the original here, committed while it waited; same key, same answer.
                if mine.idempotency_key == key:
                    return Submitted(mine.id, mine.record_id, True)
                raise ConflictError(f"record {record_id}: you have already annotated it")
            now = utcnow()
            lease = s.scalar(select(Lease).where(Lease.record_id == rec.id, Lease.user_id == u.id))
            if lease is None:
                raise ConflictError(
                    f"record {record_id} is not assigned to you; fetch the next assignment first"
                )
            if lease.expires_at <= now:
                others = (
                    s.scalar(
                        select(func.count())
                        .select_from(Lease)
                        .where(Lease.record_id == rec.id, Lease.user_id != u.id, Lease.expires_at > now)
                    )
                    or 0
                )
                if rec.n_done + others >= p.overlap:
                    s.delete(lease)
                    raise ConflictError(f"record {record_id}: your lease expired and the record is now full")
            # step 3: the judgement, mapped from display positions to stored response indices
            order = list(lease.display_order)
            label, stored_ranks = self._judgement(p, order, choice, ranks, discard)
            opts = p.options or {}
            if opts.get("rationale") == "required" and not (rationale or "").strip() and label != "discard":
                raise DataError("rationale: required by this project")
            if opts.get("rationale") == "off":
                rationale = None
            # step 4: take the slot atomically; never more than `overlap` annotations per record
            taken = s.execute(
                update(Record)
                .where(Record.id == rec.id, Record.n_done < p.overlap)
                .values(n_done=Record.n_done + 1)
            ).rowcount
            if not taken:
                raise ConflictError(f"record {record_id} already has {p.overlap} annotations")
            ann = Annotation(
                project_id=p.id,
                record_id=rec.id,
                user_id=u.id,
                idempotency_key=key,
                label=label,
                ranks=stored_ranks,
                display_order=order,
                rationale=rationale,
                duration_ms=duration_ms,
                created_at=now,
            )
            s.add(ann)
            s.delete(lease)
            s.flush()
            return Submitted(ann.id, rec.id, False)

    @staticmethod
    def _judgement(p: Project, order: list[int], choice, ranks, discard) -> tuple[str, list[float] | None]:  # type: ignore[no-untyped-def]
        opts = p.options or {}
        k = len(order)
        if p.task == "pairwise":
            if ranks is not None:
                raise DataError("ranks: this is a pairwise project; send choice A, B, tie or discard")
            if discard:
                choice = "discard"
            if choice not in PAIRWISE_CHOICES:
                raise DataError(f"choice {choice!r}: expected one of A, B, tie, discard")
            if choice == "tie" and not opts.get("allow_tie", True):
                raise DataError("choice 'tie': ties are turned off in this project")
            if choice == "discard" and not opts.get("allow_discard", True):
                raise DataError("choice 'discard': discarding is turned off in this project")
            if choice in ("A", "B"):
                winner = order["AB".index(choice)]
                stored = [1.0, 1.0]
                stored[1 - winner] = 2.0
                return str(winner), stored
            return choice, ([1.0, 1.0] if choice == "tie" else None)
        if choice is not None and choice != "discard":
            raise DataError("choice: this is a ranking project; send ranks (or discard)")
        if discard or choice == "discard":
            if not opts.get("allow_discard", True):
                raise DataError("discard: discarding is turned off in this project")
            return "discard", None
        if ranks is None:
            raise DataError(f"ranks: missing; send one rank per response ({k}), lower is better")
        if len(ranks) != k:
            raise DataError(f"ranks: {len(ranks)} given; expected {k}, one per response")
        values = []
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, int | float) or not 1 <= r <= k:
                raise DataError(f"ranks: {r!r} is not a rank between 1 and {k}")
            values.append(float(r))
        if len(set(values)) < k and not opts.get("allow_tie", True):
            raise DataError("ranks: ties are turned off in this project")
        stored = [0.0] * k
        for pos, idx in enumerate(order):
            stored[idx] = values[pos]
        return "rank", stored

    def undo_last(self, user: str | int | UserInfo, project: str) -> int | None:
        """Take back the annotator's latest submission in the project; the record becomes their
        current assignment again (same display order). Returns its record id, or None."""
        with self.store.write() as s:
            u, p = self._user(s, user), self._project(s, project)
            ann = s.scalar(
                select(Annotation)
                .where(Annotation.project_id == p.id, Annotation.user_id == u.id)
                .order_by(Annotation.id.desc())
                .limit(1)
            )
            if ann is None:
                return None
            s.execute(delete(Lease).where(Lease.project_id == p.id, Lease.user_id == u.id))
            s.execute(update(Record).where(Record.id == ann.record_id).values(n_done=Record.n_done - 1))
            now = utcnow()
            s.add(
                Lease(
                    project_id=p.id,
                    record_id=ann.record_id,
                    user_id=u.id,
                    display_order=list(ann.display_order),
                    leased_at=now,
                    expires_at=now + dt.timedelta(seconds=p.lease_seconds),
                )
            )
            rid = ann.record_id
            s.delete(ann)
            return rid

    # ---------------------------------------------------------------- revisiting past labels

    def history(
        self, user: str | int | UserInfo, project: str, *, limit: int = 50, offset: int = 0
    ) -> list[dict[str, Any]]:
        """The annotator's own labels in the project, newest first, each in the terms they were given
        in (display positions): ``{annotation_id, record_id, prompt, choice | ranks | discard,
        rationale, created_at}``."""
        with self.store.read() as s:
            u, p = self._user(s, user), self._project(s, project)
            rows = s.execute(
                select(Annotation, Record.prompt)
                .join(Record, Record.id == Annotation.record_id)
                .where(Annotation.project_id == p.id, Annotation.user_id == u.id)
                .order_by(Annotation.id.desc())
                .limit(max(1, min(int(limit), 500)))
                .offset(max(0, int(offset)))
            ).all()
            return [{**self._display_label(p.task, a), "prompt": prompt} for a, prompt in rows]

    def past_annotation(self, user: str | int | UserInfo, project: str, annotation_id: int) -> dict[str, Any]:
        """One of the annotator's own labels with its record, responses in the order they saw them."""
        with self.store.read() as s:
            u, p = self._user(s, user), self._project(s, project)
            a = self._own_annotation(s, u, p, annotation_id)
            rec = s.get(Record, a.record_id)
            assert rec is not None
            order = list(a.display_order)
            return {
                **self._display_label(p.task, a),
                "prompt": rec.prompt,
                "responses": [rec.responses[i] for i in order],
            }

    def edit(
        self,
        user: str | int | UserInfo,
        project: str,
        annotation_id: int,
        *,
        choice: str | None = None,
        ranks: Sequence[float] | None = None,
        discard: bool = False,
        rationale: str | None = None,
    ) -> Submitted:
        """Change one of the annotator's own past labels in place (same record, same display order,
        same slot): the new judgement replaces the old one."""
        if rationale is not None:
            check_text(rationale, "rationale", allow_nul=False, max_chars=10_000)
        with self.store.write() as s:
            u, p = self._user(s, user), self._project(s, project)
            a = self._own_annotation(s, u, p, annotation_id)
            label, stored = self._judgement(p, list(a.display_order), choice, ranks, discard)
            opts = p.options or {}
            if opts.get("rationale") == "required" and not (rationale or "").strip() and label != "discard":
                raise DataError("rationale: required by this project")
            a.label, a.ranks = label, stored
            a.rationale = None if opts.get("rationale") == "off" else rationale
            return Submitted(a.id, a.record_id, False)

    def _own_annotation(self, s: Session, u: User, p: Project, annotation_id: int) -> Annotation:
        a = s.get(Annotation, annotation_id) if isinstance(annotation_id, int) else None
        if a is None or a.user_id != u.id or a.project_id != p.id:
            raise NotFoundError(f"annotation {annotation_id} not found among your labels in {p.name!r}")
        return a

    @staticmethod
    def _display_label(task: str, a: Annotation) -> dict[str, Any]:
        """An annotation as its annotator gave it: ``choice`` A/B/tie/discard (pairwise) or ``ranks``
        per display position / ``discard`` (ranking)."""
        order = list(a.display_order)
        out: dict[str, Any] = {
            "annotation_id": a.id,
            "record_id": a.record_id,
            "rationale": a.rationale,
            "created_at": a.created_at.isoformat() + "Z",
            "choice": None,
            "ranks": None,
            "discard": a.label == "discard",
        }
        if task == "pairwise":
            out["choice"] = "AB"[order.index(int(a.label))] if a.label in ("0", "1") else a.label
        elif a.ranks is not None:
            out["ranks"] = [int(r) if float(r).is_integer() else r for r in (a.ranks[i] for i in order)]
        return out

    # ---------------------------------------------------------------- progress and statistics

    def progress(self, project: str, user: str | int | UserInfo | None = None) -> dict[str, Any]:
        """Counts for the progress bar (``done`` / ``assigned`` / ``total`` for an annotator) or,
        without a user, the project's totals and per-annotator counts."""
        with self.store.read() as s:
            p = self._project(s, project)
            total = s.scalar(select(func.count()).select_from(Record).where(Record.project_id == p.id)) or 0
            complete = (
                s.scalar(
                    select(func.count())
                    .select_from(Record)
                    .where(Record.project_id == p.id, Record.n_done >= p.overlap)
                )
                or 0
            )
            annotations = (
                s.scalar(select(func.count()).select_from(Annotation).where(Annotation.project_id == p.id))
                or 0
            )
            out: dict[str, Any] = {
                "project": p.name,
                "total": total,
                "complete_records": complete,
                "annotations": annotations,
                "target": total * p.overlap,
            }
            if user is not None:
                u = self._user(s, user)
                done = (
                    s.scalar(
                        select(func.count())
                        .select_from(Annotation)
                        .where(Annotation.project_id == p.id, Annotation.user_id == u.id)
                    )
                    or 0
                )
                pending = (
                    s.scalar(
                        select(func.count())
                        .select_from(Lease)
                        .where(Lease.project_id == p.id, Lease.user_id == u.id, Lease.expires_at > utcnow())
                    )
                    or 0
                )
                mine = select(Annotation.id).where(
                    Annotation.record_id == Record.id, Annotation.user_id == u.id
                )
                skipped_q = select(Skip.id).where(Skip.record_id == Record.id, Skip.user_id == u.id)
                open_ = (
                    s.scalar(
                        select(func.count())
                        .select_from(Record)
                        .where(
                            Record.project_id == p.id,
                            Record.n_done < p.overlap,
                            ~mine.exists(),
                            ~skipped_q.exists(),
                        )
                    )
                    or 0
                )
                skipped = (
                    s.scalar(
                        select(func.count())
                        .select_from(Skip)
                        .where(Skip.project_id == p.id, Skip.user_id == u.id)
                    )
                    or 0
                )
                out.update({"done": done, "assigned": done + pending, "available": open_, "skipped": skipped})
                return out
            per = s.execute(
                select(User.name, func.count(Annotation.id), func.avg(Annotation.duration_ms))
                .join(Annotation, Annotation.user_id == User.id)
                .where(Annotation.project_id == p.id)
                .group_by(User.name)
                .order_by(User.name)
            ).all()
            out["annotators"] = [
                {"user": n, "done": c, "mean_ms": float(m) if m is not None else None} for n, c, m in per
            ]
            return out

    def judgements(self, project: str) -> list[agg.Judgement]:
        """Every stored annotation of the project, in submission order."""
        with self.store.read() as s:
            p = self._project(s, project)
            rows = s.execute(
                select(Annotation, User.name)
                .join(User, User.id == Annotation.user_id)
                .where(Annotation.project_id == p.id)
                .order_by(Annotation.id)
            ).all()
            return [
                agg.Judgement(
                    a.record_id,
                    name,
                    a.label,
                    tuple(a.ranks) if a.ranks is not None else None,
                    tuple(a.display_order),
                )
                for a, name in rows
            ]

    def annotations(self, project: str, user: str | int | UserInfo | None = None) -> list[dict[str, Any]]:
        """Raw annotations (admin view), optionally of one annotator."""
        with self.store.read() as s:
            p = self._project(s, project)
            q = (
                select(Annotation, User.name)
                .join(User, User.id == Annotation.user_id)
                .where(Annotation.project_id == p.id)
                .order_by(Annotation.id)
            )
            if user is not None:
                q = q.where(Annotation.user_id == self._user(s, user).id)
            return [
                {
                    "annotation_id": a.id,
                    "record_id": a.record_id,
                    "user": name,
                    "label": a.label,
                    "ranks": a.ranks,
                    "display_order": a.display_order,
                    "rationale": a.rationale,
                    "duration_ms": a.duration_ms,
                    "created_at": a.created_at.isoformat(),
                }
                for a, name in s.execute(q).all()
            ]

    def aggregate(
        self,
        project: str,
        method: Literal["mean_rank", "borda"] = "mean_rank",
        aggregate: str | None = None,
    ) -> list[agg.Aggregate]:
        """The consensus of every annotated record: ``aggregate`` = majority (pairwise), mean-rank
        (rankings; ``method`` mean rank or Borda) or dawid-skene; ``None`` = the task's default."""
        return agg.aggregate_records(self.project(project).task, self.judgements(project), aggregate, method)

    def agreement(self, project: str) -> agg.AgreementReport:
        """Inter-annotator agreement, agreement with the majority per annotator, position bias."""
        return agg.agreement_report(self.project(project).task, self.judgements(project))

    def disagreements(self, project: str, limit: int = 200) -> list[dict[str, Any]]:
        rows = agg.disagreements(self.project(project).task, self.judgements(project), limit)
        if rows:
            with self.store.read() as s:
                prompts = dict(
                    s.execute(
                        select(Record.id, Record.prompt).where(Record.id.in_([r["record_id"] for r in rows]))
                    ).all()
                )
            for r in rows:
                r["prompt"] = prompts.get(r["record_id"])
        return rows

    def summary(self, project: str, aggregate: str | None = None) -> dict[str, Any]:
        """Aggregation outcome counts: records with a majority per label and without one."""
        counts: dict[str, int] = {}
        for a in self.aggregate(project, aggregate=aggregate):
            key = a.label if a.label is not None else "no_majority"
            counts[key] = counts.get(key, 0) + 1
        return counts

    # ---------------------------------------------------------------- export

    def export(
        self,
        project: str,
        format: Literal["pairs", "ranked"] = "pairs",
        *,
        method: Literal["mean_rank", "borda"] = "mean_rank",
        complete_only: bool = False,
        aggregate: str | None = None,
    ) -> list[dict[str, Any]]:
        """Consensus records in the DESIGN.md formats (``aggregate``: see :meth:`aggregate`).

        ``pairs``: ``{"prompt", "chosen", "rejected", "weight", ...}`` (TRL-compatible; a chat prompt
        gives conversational ``chosen`` / ``rejected`` lists); a ranking yields every pair its
        consensus orders, weighted by the share of annotators who ordered it so.
        ``ranked``: ``{"prompt", "responses", "ranks", "weight", ...}`` with dense ranks (1 = best).
        Records without a majority or discarded by majority are left out (see :meth:`summary`).
        Extra columns: ``id``, ``num_annotations`` and the record's metadata.
        """
        if format not in ("pairs", "ranked"):
            raise DataError(f"format {format!r}: expected pairs or ranked")
        p = self.project(project)
        all_judgements = self.judgements(project)
        judgements = agg.by_record(all_judgements)
        consensus = {a.record_id: a for a in agg.aggregate_records(p.task, all_judgements, aggregate, method)}
        with self.store.read() as s:
            pid = self._project(s, project).id
            recs = {r.id: r for r in s.scalars(select(Record).where(Record.project_id == pid))}
        rows: list[dict[str, Any]] = []
        for rid in sorted(judgements):
            js, rec, a = judgements[rid], recs[rid], consensus[rid]
            if complete_only and rec.n_done < p.overlap:
                continue
            if a.ranks is None:
                continue
            extra = {
                "id": rec.external_id if rec.external_id is not None else str(rec.id),
                "num_annotations": a.num_annotations,
            }
            extra.update(
                {k: v for k, v in (rec.meta or {}).items() if k not in extra and k not in _EXPORT_KEYS}
            )
            chat = isinstance(rec.prompt, list)
            if format == "ranked":
                rows.append(
                    {
                        "prompt": rec.prompt,
                        "responses": list(rec.responses),
                        "ranks": a.ranks,
                        "weight": round(a.weight, 6),
                        **extra,
                    }
                )
                continue
            if a.pairs is not None:  # Dawid-Skene: each pair weighted by its posterior
                pairs = a.pairs
            elif p.task == "pairwise":
                if a.label not in ("0", "1"):
                    continue
                pairs = [(int(a.label), 1 - int(a.label), a.weight)]
            else:
                pairs = agg.pairs_of(js, a.ranks)
            for better, worse, weight in pairs:
                chosen, rejected = rec.responses[better], rec.responses[worse]
                if chat:
                    chosen = [{"role": "assistant", "content": chosen}]
                    rejected = [{"role": "assistant", "content": rejected}]
                rows.append(
                    {
                        "prompt": rec.prompt,
                        "chosen": chosen,
                        "rejected": rejected,
                        "weight": round(weight, 6),
                        **extra,
                    }
                )
        return rows

    def export_file(
        self,
        project: str,
        format: Literal["pairs", "ranked"],
        out: str | Path,
        file_format: str | None = None,
        **kwargs: Any,
    ) -> tuple[Path, int]:
        """Write :meth:`export` to JSONL, Parquet or a ``datasets`` folder; returns (path, rows).

        Parquet and ``datasets`` need one type per column: a project that mixes chat and plain-text
        prompts is written there all in chat form (:func:`one_prompt_form`); JSONL keeps each as it is.
        """
        rows = self.export(project, format, **kwargs)
        if records_file_format(Path(out), file_format) != "jsonl":
            rows = one_prompt_form(rows)
        return write_rows(rows, out, file_format), len(rows)

    # ---------------------------------------------------------------- helpers

    def _user(self, s: Session, user: str | int | UserInfo, *, exact: bool = False) -> User:
        if isinstance(user, UserInfo):
            u = s.get(User, user.id)
        elif isinstance(user, int) and not isinstance(user, bool):
            u = s.get(User, user)
        elif exact:  # the spelling as stored (renaming one of two names that differ only in case)
            u = s.scalar(select(User).where(User.name == str(user)))
        else:  # names ignore case
            u = s.scalar(select(User).where(func.lower(User.name) == str(user).lower()))
        if u is None:
            raise NotFoundError(f"user {user if not isinstance(user, UserInfo) else user.name!r} not found")
        return u

    def _project(self, s: Session, name: str) -> Project:
        p = s.scalar(select(Project).where(Project.name == name)) if isinstance(name, str) else None
        if p is None:
            raise NotFoundError(f"project {name!r} not found")
        return p

    @staticmethod
    def _project_info(p: Project, n: int) -> ProjectInfo:
        o = p.options or {}
        return ProjectInfo(
            p.name,
            p.task,
            p.guidelines or "",
            p.overlap,
            p.lease_seconds,
            bool(o.get("allow_tie", True)),
            bool(o.get("allow_discard", True)),
            str(o.get("rationale", "optional")),
            n,
        )

    @staticmethod
    def _assignment(s: Session, p: Project, lease: Lease) -> Assignment:
        rec = s.get(Record, lease.record_id)
        assert rec is not None
        order = list(lease.display_order)
        return Assignment(
            p.name,
            p.task,
            rec.id,
            rec.prompt,
            [rec.responses[i] for i in order],
            order,
            lease.expires_at,
            dict(rec.meta or {}),
        )

    # ---------------------------------------------------------------- reliability (Dawid-Skene)

    def reliability(self, project: str) -> agg.rel.DawidSkene:
        """Each annotator's estimated reliability: a Dawid-Skene fit (:class:`heed.feedback.reliability.DawidSkene`)
        over the project's pairwise preferences (a ranking counts as its C(K, 2) pairs)."""
        return agg.fit_reliability(self.judgements(project))


_EXPORT_KEYS = {"prompt", "chosen", "rejected", "responses", "ranks", "weight"}


def one_prompt_form(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """When some prompts are chat messages and some are text, turn the text ones (and their
    ``chosen`` / ``rejected``) into the conversational form; otherwise return ``rows`` unchanged."""
    chat = [isinstance(r["prompt"], list) for r in rows]
    if all(chat) or not any(chat):
        return rows
    out = []
    for r, is_chat in zip(rows, chat, strict=True):
        if not is_chat:
            r = {**r, "prompt": [{"role": "user", "content": r["prompt"]}]}
            for k in ("chosen", "rejected"):
                if k in r:
                    r[k] = [{"role": "assistant", "content": r[k]}]
        out.append(r)
    return out

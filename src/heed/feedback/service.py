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
import itertools
import json
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import delete, func, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from heed.errors import DataError, HeedError
from heed.feedback import auth
from heed.feedback.agreement import dense_ranks
from heed.feedback.kinds import COMPARISONS, THUMBS, Kinds, parse_kinds, parse_scale, parse_scale_labels
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

if TYPE_CHECKING:  # the aggregation (numpy) is imported where used: serving never needs it
    from heed.feedback import aggregate as agg

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MIN_PASSWORD = 10  # characters in a password a user chooses
Task = str  # a feedback kind or several joined by commas (heed.feedback.kinds), e.g. "ranking,critique"
Role = Literal["annotator", "admin"]
PAIRWISE_CHOICES = ("A", "B", "tie", "discard")
MAX_CRITIQUE = 10_000  # characters
SUGGEST_SHOW = ("scores", "ranking")
EXPORT_FORMATS = ("pairs", "ranked", "rankings", "kto", "sft", "critiques")


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
    kinds: tuple[str, ...] = ()  # every kind asked on each record, judgement first
    scale: tuple[int, int] | None = None  # rating: the Likert scale's lowest and highest point
    scale_labels: tuple[str, str] | None = None  # rating: names of the low and high ends
    diff: bool = False  # show how two answers differ
    suggest: str | None = None  # None, or how a model's suggestion is shown: scores | ranking
    suggest_rate: float = 0.0  # share of handed-out records that show it (the rest measure without)


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
    # the model's suggestion when shown to this annotator: {"scores": [per display position],
    # "ranks": [...], "label"?: "up" | "down"}; None when not shown
    suggestion: dict[str, Any] | None = None

    def display_ranks(self, ranks_by_index: Sequence[float]) -> list[float]:
        """Turn ranks given per stored response into ranks per display position."""
        return [ranks_by_index[i] for i in self.order]

    def display_choice(self, winner_index: int | None) -> str:
        """``"A"`` / ``"B"`` for the stored response ``winner_index`` (``None`` gives ``"tie"``)."""
        if winner_index is None:
            return "tie"
        return "AB"[self.order.index(winner_index)]


@dataclass(frozen=True)
class LabelIn:
    """What an annotator submits, in display positions; only the fields of the project's kinds.

    ``choice`` (pairwise: A, B, tie, discard), ``ranks`` (ranking: per display position),
    ``thumb`` (binary: up / down), ``rating`` (a point of the project's scale), ``critique`` (text),
    ``edit`` (the corrected answer), ``discard`` (any kind), ``rationale`` (free text).
    """

    choice: str | None = None
    ranks: Sequence[float] | None = None
    discard: bool = False
    thumb: str | None = None
    rating: float | None = None
    critique: str | None = None
    edit: str | None = None
    rationale: str | None = None


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
        scale: str | tuple[int, int] | None = None,
        scale_labels: str | Sequence[str] | None = None,
        diff: bool = False,
        suggest: dict[str, Any] | None = None,
    ) -> ProjectInfo:
        """Create a project. ``task``: one feedback kind or several joined by commas
        (:mod:`heed.feedback.kinds`, e.g. ``"ranking,critique"``); ``overlap`` = annotations wanted
        per record; a handed-out record is reserved for its annotator for ``lease_seconds``.

        Rating projects take a Likert ``scale`` (``"1-7"``, default 1-5) with optional names of its
        ends (``scale_labels="harmful,excellent"``). ``diff`` shows how two answers differ.
        ``suggest`` shows a model's suggestion: ``{"model": DIR, "show": "scores" | "ranking",
        "rate": share of records that show it (default 1)}``; scores come from :meth:`set_suggestions`.
        """
        _check_name(name, "project")
        kinds = parse_kinds(task)
        if scale is not None and not kinds.has("rating"):
            raise DataError(f"scale: only a rating project has a scale (task {kinds})")
        lo, hi = parse_scale(scale)
        ends = parse_scale_labels(scale_labels)  # type: ignore[arg-type]
        if suggest is not None:
            suggest = _check_suggest(suggest, kinds)
        if not 1 <= int(overlap) <= 100:
            raise DataError(f"overlap {overlap}: expected 1 to 100 annotations per record")
        if not 10 <= int(lease_seconds) <= 7 * 24 * 3600:
            raise DataError(f"lease_seconds {lease_seconds}: expected 10 to 604800")
        if rationale not in ("off", "optional", "required"):
            raise DataError(f"rationale {rationale!r}: expected off, optional or required")
        check_text(guidelines, "guidelines", allow_nul=False, max_chars=100_000)
        options: dict[str, Any] = {
            "allow_tie": bool(allow_tie),
            "allow_discard": bool(allow_discard),
            "rationale": rationale,
            "kinds": list(kinds.kinds),
            "diff": bool(diff),
        }
        if kinds.has("rating"):
            options["scale"] = [lo, hi]
            options["scale_labels"] = list(ends) if ends else None
        if suggest is not None:
            options["suggest"] = suggest
        try:
            with self.store.write() as s:
                p = Project(
                    name=name,
                    task=kinds.primary,
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

    def suggest_options(self, project: str) -> dict[str, Any] | None:
        """The project's ``suggest`` settings (``{"model", "show", "rate"}``), or None."""
        with self.store.read() as s:
            return (self._project(s, project).options or {}).get("suggest") or None

    def kinds(self, project: str) -> Kinds:
        """The feedback kinds the project asks (:mod:`heed.feedback.kinds`)."""
        return _kinds_of_info(self.project(project))

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
        if not isinstance(project, str):
            return False
        with self.store.read() as s:
            if isinstance(user, UserInfo):  # the request's session already read the user: one query
                row = s.execute(
                    select(Project.id, Membership.user_id)
                    .outerjoin(
                        Membership, (Membership.project_id == Project.id) & (Membership.user_id == user.id)
                    )
                    .where(Project.name == project)
                ).first()
                return row is not None and (user.role == "admin" or row[1] is not None)
            u = self._user(s, user)
            p = s.scalar(select(Project).where(Project.name == project))
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
        kinds = self.kinds(project)
        lo, hi = kinds.response_counts()
        # Validate everything first: a bad record stores nothing and names itself.
        batch: list[RecordIn] = []
        for i, raw in enumerate(records):
            rec = raw if isinstance(raw, RecordIn) else parse_record(raw, f"record {i}", task=kinds)
            if not lo <= len(rec.responses) <= hi:
                want = f"exactly {lo}" if lo == hi else f"{lo} to {hi}"
                raise DataError(
                    f"record {i}: responses: {len(rec.responses)} given; a {kinds} project needs {want}"
                )
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
        return self.import_records(project, iter_records(path, task=self.kinds(project), fmt=fmt))

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
        if len(rows) and all(len(r[2]) == 1 for r in rows):
            # one answer per record: closest to the median score first (the model's coin flips)
            scores = {rid: float(score([prompt], list(responses))[0]) for rid, prompt, responses in rows}
            mid = _median(list(scores.values()))
            gaps = {rid: abs(x - mid) for rid, x in scores.items()}
        for rid, prompt, responses in rows:
            if rid not in gaps:
                gaps[rid] = min_score_gap(score, prompt, responses)
        with self.store.write() as s:
            for rid, gap in gaps.items():
                s.execute(update(Record).where(Record.id == rid).values(priority=gap))
        return len(gaps)

    def set_suggestions(
        self, project: str, score: Callable[[list[Any], list[str]], list[float]], *, batch_size: int = 64
    ) -> int:
        """Score every record's answers with a model (``score(prompts, responses) -> list[float]``,
        e.g. ``heed.load_reward_model(path).score``) for the project's suggestions; returns how many.

        Stored per record as ``{"scores": [...]}``; a binary project also gets the suggested thumb,
        ``"up"`` when the answer scores at least the median of the project's answers. Shown to
        annotators only when the project was created with ``suggest`` (a share ``rate`` of them).
        """
        with self.store.read() as s:
            pid = self._project(s, project).id
            rows = s.execute(
                select(Record.id, Record.prompt, Record.responses)
                .where(Record.project_id == pid)
                .order_by(Record.id)
            ).all()
        kinds = self.kinds(project)
        scores: dict[int, list[float]] = {}
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            prompts = [prompt for _, prompt, responses in chunk for _ in responses]
            answers = [a for _, _, responses in chunk for a in responses]
            flat = [float(x) for x in score(prompts, answers)]
            if len(flat) != len(answers) or any(not math.isfinite(x) for x in flat):
                raise DataError(
                    f"suggest: the scorer returned {len(flat)} scores (or non-finite ones) for {len(answers)} answers"
                )
            at = 0
            for rid, _, responses in chunk:
                scores[rid] = flat[at : at + len(responses)]
                at += len(responses)
        mid = _median([v[0] for v in scores.values()]) if scores and kinds.judgement == "binary" else None
        with self.store.write() as s:
            for rid, values in scores.items():
                suggestion: dict[str, Any] = {"scores": values}
                if mid is not None:
                    suggestion["label"] = "up" if values[0] >= mid else "down"
                s.execute(update(Record).where(Record.id == rid).values(suggestion=suggestion))
        return len(scores)

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
            u, p = self._user_and_project(s, user, project)
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
                suggest = (p.options or {}).get("suggest")
                shown = None  # the record has nothing to suggest (or the project shows nothing)
                if suggest and rec.suggestion:
                    shown = self._rng.random() < float(suggest.get("rate", 1.0))
                lease = Lease(
                    project_id=p.id,
                    record_id=rid,
                    user_id=u.id,
                    display_order=order,
                    suggestion_shown=shown,
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
        thumb: str | None = None,
        rating: float | None = None,
        critique: str | None = None,
        edit: str | None = None,
    ) -> Submitted:
        """Store one judgement, exactly once per idempotency ``key``.

        Pairwise: ``choice`` is ``"A"`` (first shown), ``"B"``, ``"tie"`` or ``"discard"``.
        Ranking: ``ranks`` per display position (lower is better, equal = tie). Binary: ``thumb``
        ``"up"`` or ``"down"``. Rating: ``rating``, a point of the project's scale. Critique: the
        ``critique`` text; edit: the corrected answer ``edit`` (both of the answer the judgement puts
        first when the project compares several). Any kind: ``discard=True``.
        Re-sending a stored key returns the stored annotation with ``duplicate=True``.
        """
        key = key or auth.new_token()
        if not isinstance(key, str) or not 1 <= len(key) <= 128 or not key.isprintable():
            raise DataError("idempotency key: expected 1-128 printable characters")
        if duration_ms is not None and not 0 <= int(duration_ms) <= 2**31 - 1:
            raise DataError("duration_ms: expected 0 to 2147483647")
        given = _checked_label(LabelIn(choice, ranks, discard, thumb, rating, critique, edit, rationale))
        try:
            return self._submit(user, project, record_id, given, key, duration_ms)
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
        self,
        user: str | int | UserInfo,
        project: str,
        record_id: int,
        given: LabelIn,
        key: str,
        duration_ms: int | None,
    ) -> Submitted:
        with self.store.write() as s:
            u, p = self._user_and_project(s, user, project)
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
            values = self._judgement(p, order, given, rec.responses)
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
                display_order=order,
                duration_ms=duration_ms,
                created_at=now,
                suggestion_shown=lease.suggestion_shown,
                **values,
            )
            s.add(ann)
            s.delete(lease)
            s.flush()
            return Submitted(ann.id, rec.id, False)

    @staticmethod
    def _judgement(p: Project, order: list[int], given: LabelIn, responses: Sequence[str]) -> dict[str, Any]:
        """The stored columns (label, ranks, rating, critique, corrected, target, rationale) of a
        submission, or a :class:`DataError` naming the field at fault."""
        opts = p.options or {}
        kinds = _kinds_of(p)
        judgement = kinds.judgement
        _refuse_foreign_fields(kinds, given)
        discard = given.discard or given.choice == "discard"
        if discard and not opts.get("allow_discard", True):
            raise DataError(
                "choice 'discard': discarding is turned off in this project"
                if judgement == "pairwise"
                else "discard: discarding is turned off in this project"
            )
        out: dict[str, Any] = {
            "ranks": None,
            "rating": None,
            "critique": None,
            "corrected": None,
            "target": None,
        }
        if discard:
            out["label"] = "discard"
        elif judgement in COMPARISONS:
            out["label"], out["ranks"] = _comparison_label(judgement, opts, order, given)
        elif judgement == "binary":
            if given.thumb is None:
                raise DataError("thumb: missing; send up or down (or discard)")
            out["label"] = given.thumb
        elif judgement == "rating":
            lo, hi = (opts.get("scale") or (1, 5))[:2]
            if given.rating is None:
                raise DataError(f"rating: missing; send a point of the scale {lo}-{hi} (or discard)")
            if not lo <= given.rating <= hi or float(given.rating) != int(given.rating):
                raise DataError(
                    f"rating: {_number(given.rating)!r} is outside this project's scale {lo}-{hi}"
                )
            out["label"], out["rating"] = "rating", float(given.rating)
        else:
            out["label"] = kinds.kinds[0]  # critique or edit alone
        if not discard and (kinds.has("critique") or kinds.has("edit")):
            target = _target(out["ranks"], order) if kinds.comparison else 0
            out["target"] = target
            if kinds.has("critique"):
                if given.critique is None or not given.critique.strip():
                    raise DataError("critique: empty; this project asks for a critique of the answer")
                out["critique"] = given.critique
            if kinds.has("edit"):
                if given.edit is None or not given.edit.strip():
                    raise DataError(
                        "edit: empty; send the corrected answer (unchanged if it needs no correction)"
                    )
                out["corrected"] = given.edit
        rationale = given.rationale
        if opts.get("rationale") == "required" and not (rationale or "").strip() and not discard:
            raise DataError("rationale: required by this project")
        out["rationale"] = None if opts.get("rationale") == "off" else rationale
        return out

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
                    suggestion_shown=ann.suggestion_shown,  # the record comes back as it was shown
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
        thumb: str | None = None,
        rating: float | None = None,
        critique: str | None = None,
        edit: str | None = None,
    ) -> Submitted:
        """Change one of the annotator's own past labels in place (same record, same display order,
        same slot): the new judgement replaces the old one (fields as in :meth:`submit`)."""
        given = _checked_label(LabelIn(choice, ranks, discard, thumb, rating, critique, edit, rationale))
        with self.store.write() as s:
            u, p = self._user(s, user), self._project(s, project)
            a = self._own_annotation(s, u, p, annotation_id)
            rec = s.get(Record, a.record_id)
            assert rec is not None
            values = self._judgement(p, list(a.display_order), given, rec.responses)
            for k, v in values.items():
                setattr(a, k, v)
            return Submitted(a.id, a.record_id, False)

    def _own_annotation(self, s: Session, u: User, p: Project, annotation_id: int) -> Annotation:
        a = s.get(Annotation, annotation_id) if isinstance(annotation_id, int) else None
        if a is None or a.user_id != u.id or a.project_id != p.id:
            raise NotFoundError(f"annotation {annotation_id} not found among your labels in {p.name!r}")
        return a

    @staticmethod
    def _display_label(task: str, a: Annotation) -> dict[str, Any]:
        """An annotation as its annotator gave it: ``choice`` A/B/tie/discard (pairwise), ``ranks``
        per display position (ranking), ``thumb``, ``rating``, ``critique``, ``edit``, ``discard``."""
        order = list(a.display_order)
        out: dict[str, Any] = {
            "annotation_id": a.id,
            "record_id": a.record_id,
            "rationale": a.rationale,
            "created_at": a.created_at.isoformat() + "Z",
            "choice": None,
            "ranks": None,
            "discard": a.label == "discard",
            "thumb": a.label if a.label in THUMBS else None,
            "rating": _number(a.rating),
            "critique": a.critique,
            "edit": a.corrected,
        }
        if task == "pairwise":
            out["choice"] = "AB"[order.index(int(a.label))] if a.label in ("0", "1") else a.label
        elif a.ranks is not None:
            out["ranks"] = [_number(a.ranks[i]) for i in order]
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
        from heed.feedback import aggregate as agg

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
                    a.rating,
                    a.suggestion_shown,
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
                    "rating": a.rating,
                    "critique": a.critique,
                    "edit": a.corrected,
                    "target": a.target,
                    "suggestion_shown": a.suggestion_shown,
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
        from heed.feedback import aggregate as agg

        return agg.aggregate_records(self.project(project).task, self.judgements(project), aggregate, method)

    def agreement(self, project: str) -> agg.AgreementReport:
        """Inter-annotator agreement, agreement with the majority per annotator, position bias."""
        from heed.feedback import aggregate as agg

        return agg.agreement_report(self.project(project).task, self.judgements(project))

    def suggestion_agreement(self, project: str) -> dict[str, Any]:
        """Agreement of the labels with the model's suggestion, with it shown and hidden
        (:func:`heed.feedback.aggregate.suggestion_agreement`); ``{}`` when the project has none."""
        from heed.feedback import aggregate as agg

        with self.store.read() as s:
            pid = self._project(s, project).id
            suggestions = dict(
                s.execute(
                    select(Record.id, Record.suggestion).where(
                        Record.project_id == pid, Record.suggestion.is_not(None)
                    )
                ).all()
            )
        if not suggestions:
            return {}
        return agg.suggestion_agreement(self.project(project).task, self.judgements(project), suggestions)

    def disagreements(self, project: str, limit: int = 200) -> list[dict[str, Any]]:
        from heed.feedback import aggregate as agg

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
        format: str = "pairs",
        *,
        method: Literal["mean_rank", "borda"] = "mean_rank",
        complete_only: bool = False,
        aggregate: str | None = None,
    ) -> list[dict[str, Any]]:
        """Consensus records in the DESIGN.md formats (``aggregate``: see :meth:`aggregate`).

        Which formats a project has follows from its kinds (:func:`export_formats`):

        - ``pairs``: ``{"prompt", "chosen", "rejected", "weight", ...}`` (TRL-compatible; a chat
          prompt gives conversational ``chosen`` / ``rejected`` lists). Pairwise / ranking: every pair
          the consensus orders, weighted by the share of annotators who ordered it so. Rating: every
          two answers to the same prompt whose mean ratings differ, with ``margin`` = the difference.
          Binary: thumbs-up ≻ thumbs-down answers to the same prompt. Edit: corrected ≻ original.
        - ``ranked`` (``rankings``): ``{"prompt", "responses", "ranks", "weight", ...}`` with dense
          ranks (1 = best); a rating project groups the answers to one prompt, ranked by mean rating
          (``ratings`` holds the means; a prompt with one rated answer is left out).
        - ``kto``: ``{"prompt", "completion", "label": true | false, "weight", ...}`` (TRL's unpaired
          format), the majority thumb (or Dawid-Skene) of each binary record.
        - ``sft``: every correction as ``{"prompt", "completion"}`` (a chat prompt: ``{"messages"}``).
        - ``critiques``: every critique as ``{"prompt", "completion", "critique"}``, the answer it is about.

        Records without a majority or discarded by majority are left out (see :meth:`summary`).
        Extra columns: ``id``, ``num_annotations``, ``critiques`` (when the project asks for them)
        and the record's metadata.
        """
        from heed.feedback import aggregate as agg

        kinds = self.kinds(project)
        allowed = export_formats(kinds)
        fmt = "ranked" if format == "rankings" else format
        if fmt not in allowed:
            raise DataError(f"format {format!r}: a {kinds} project exports {', '.join(allowed)}")
        p = self.project(project)
        all_judgements = self.judgements(project)
        judgements = agg.by_record(all_judgements)
        consensus = {a.record_id: a for a in agg.aggregate_records(p.task, all_judgements, aggregate, method)}
        with self.store.read() as s:
            pid = self._project(s, project).id
            recs = {r.id: r for r in s.scalars(select(Record).where(Record.project_id == pid))}
            notes = s.execute(
                select(Annotation.record_id, Annotation.target, Annotation.critique, Annotation.corrected)
                .where(Annotation.project_id == pid, Annotation.label != "discard")
                .where((Annotation.critique.is_not(None)) | (Annotation.corrected.is_not(None)))
                .order_by(Annotation.id)
            ).all()
        done = [rid for rid in sorted(judgements) if not (complete_only and recs[rid].n_done < p.overlap)]
        critiques: dict[int, list[str]] = {}
        for rid, _, critique, _ in notes:
            if critique is not None:
                critiques.setdefault(rid, []).append(critique)

        def extra(rec: Record, a: agg.Aggregate | None) -> dict[str, Any]:
            out: dict[str, Any] = {
                "id": rec.external_id if rec.external_id is not None else str(rec.id),
                "num_annotations": a.num_annotations if a else len(judgements.get(rec.id, [])),
            }
            if kinds.has("critique"):
                out["critiques"] = critiques.get(rec.id, [])
            out.update({k: v for k, v in (rec.meta or {}).items() if k not in out and k not in _EXPORT_KEYS})
            return out

        keep = set(done)
        if fmt == "sft":
            return [
                {**_sft_row(recs[rid].prompt, fixed), **extra(recs[rid], consensus.get(rid))}
                for rid, _, _, fixed in notes
                if fixed is not None and rid in keep
            ]
        if fmt == "critiques":
            return [
                {
                    **_completion_row(recs[rid].prompt, recs[rid].responses[target or 0]),
                    "critique": critique,
                    **extra(recs[rid], consensus.get(rid)),
                }
                for rid, target, critique, _ in notes
                if critique is not None and rid in keep
            ]
        rows: list[dict[str, Any]] = []
        if kinds.judgement == "binary":
            decided = [(recs[rid], consensus[rid]) for rid in done if consensus[rid].label in THUMBS]
            if fmt == "kto":
                for rec, a in decided:
                    rows.append(
                        {
                            **_completion_row(rec.prompt, rec.responses[0]),
                            "label": a.label == "up",
                            "weight": round(a.weight, 6),
                            **extra(rec, a),
                        }
                    )
            else:
                for group in _by_prompt(decided):
                    ups = [(r, a) for r, a in group if a.label == "up"]
                    downs = [(r, a) for r, a in group if a.label == "down"]
                    for (good, ga), (bad, ba) in itertools.product(ups, downs):
                        rows.append(
                            _pair_row(
                                good.prompt, good.responses[0], bad.responses[0], min(ga.weight, ba.weight)
                            )
                            | _group_extra([extra(good, ga), extra(bad, ba)])
                        )
        elif kinds.judgement == "rating":
            rated = [(recs[rid], consensus[rid]) for rid in done if consensus[rid].mean_rating is not None]
            for group in _by_prompt(rated):
                if len(group) < 2:
                    continue
                means = [a.mean_rating for _, a in group]
                more = _group_extra([extra(r, a) for r, a in group])
                if fmt == "ranked":
                    rows.append(
                        {
                            "prompt": group[0][0].prompt,
                            "responses": [r.responses[0] for r, _ in group],
                            "ranks": agg.ag.dense_ranks(means, lower_is_better=False),  # type: ignore[arg-type]
                            "ratings": [round(m, 6) for m in means],  # type: ignore[arg-type]
                            "weight": round(min(a.weight for _, a in group), 6),
                            **more,
                        }
                    )
                    continue
                for (ri, ai), (rj, aj) in itertools.combinations(group, 2):
                    if ai.mean_rating == aj.mean_rating:
                        continue
                    (good, ga), (bad, ba) = (
                        ((ri, ai), (rj, aj)) if ai.mean_rating > aj.mean_rating else ((rj, aj), (ri, ai))
                    )  # type: ignore[operator]
                    row = _pair_row(
                        good.prompt, good.responses[0], bad.responses[0], min(ga.weight, ba.weight)
                    )
                    row["margin"] = round(ga.mean_rating - ba.mean_rating, 6)  # type: ignore[operator]
                    rows.append(row | _group_extra([extra(good, ga), extra(bad, ba)]))
        elif kinds.comparison:
            for rid in done:
                js, rec, a = judgements[rid], recs[rid], consensus[rid]
                if a.ranks is None:
                    continue
                if fmt == "ranked":
                    rows.append(
                        {
                            "prompt": rec.prompt,
                            "responses": list(rec.responses),
                            "ranks": a.ranks,
                            "weight": round(a.weight, 6),
                            **extra(rec, a),
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
                    rows.append(
                        _pair_row(rec.prompt, rec.responses[better], rec.responses[worse], weight)
                        | extra(rec, a)
                    )
        if fmt == "pairs" and kinds.has("edit"):
            # every correction beats the answer it corrects (an unchanged answer makes no pair)
            for rid, target, _, fixed in notes:
                original = recs[rid].responses[target or 0]
                if fixed is None or rid not in keep or fixed.strip() == original.strip():
                    continue
                rows.append(
                    _pair_row(recs[rid].prompt, fixed, original, 1.0)
                    | {"feedback": "edit"}
                    | extra(recs[rid], consensus.get(rid))
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

    def _user_and_project(self, s: Session, user: str | int | UserInfo, project: str) -> tuple[User, Project]:
        """:meth:`_user` and :meth:`_project` in one query when the user is known by id (every
        request of an annotator); otherwise, or when either is missing, the two lookups."""
        uid = user.id if isinstance(user, UserInfo) else user
        if isinstance(uid, int) and not isinstance(uid, bool) and isinstance(project, str):
            row = s.execute(
                select(User, Project).join(Project, true()).where(User.id == uid, Project.name == project)
            ).first()
            if row is not None:
                return row[0], row[1]
        return self._user(s, user), self._project(s, project)

    def _project(self, s: Session, name: str) -> Project:
        p = s.scalar(select(Project).where(Project.name == name)) if isinstance(name, str) else None
        if p is None:
            raise NotFoundError(f"project {name!r} not found")
        return p

    @staticmethod
    def _project_info(p: Project, n: int) -> ProjectInfo:
        o = p.options or {}
        kinds = _kinds_of(p)
        suggest = o.get("suggest") or None
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
            kinds.kinds,
            tuple(o["scale"]) if kinds.has("rating") and o.get("scale") else None,  # type: ignore[arg-type]
            tuple(o["scale_labels"]) if o.get("scale_labels") else None,  # type: ignore[arg-type]
            bool(o.get("diff", False)),
            suggest["show"] if suggest else None,
            float(suggest.get("rate", 1.0)) if suggest else 0.0,
        )

    @staticmethod
    def _assignment(s: Session, p: Project, lease: Lease) -> Assignment:
        rec = s.get(Record, lease.record_id)
        assert rec is not None
        order = list(lease.display_order)
        suggestion = None
        if lease.suggestion_shown and rec.suggestion:
            scores = [float(rec.suggestion["scores"][i]) for i in order]
            suggestion = {"scores": scores, "ranks": dense_ranks([-x for x in scores])}
            if "label" in rec.suggestion:
                suggestion["label"] = rec.suggestion["label"]
        return Assignment(
            p.name,
            p.task,
            rec.id,
            rec.prompt,
            [rec.responses[i] for i in order],
            order,
            lease.expires_at,
            dict(rec.meta or {}),
            suggestion,
        )

    # ---------------------------------------------------------------- reliability (Dawid-Skene)

    def reliability(self, project: str) -> agg.rel.DawidSkene:
        """Each annotator's estimated reliability: a Dawid-Skene fit (:class:`heed.feedback.reliability.DawidSkene`)
        over the project's pairwise preferences (a ranking counts as its C(K, 2) pairs; a binary
        project's thumbs are its items)."""
        from heed.feedback import aggregate as agg

        return agg.fit_reliability(self.judgements(project), self.project(project).task)


_EXPORT_KEYS = {
    "prompt",
    "chosen",
    "rejected",
    "responses",
    "ranks",
    "weight",
    "completion",
    "label",
    "messages",
}


def _median(xs: Sequence[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else 0.5 * (ys[n // 2 - 1] + ys[n // 2])


def _number(x: float | None) -> int | float | None:
    """``2.0`` -> ``2`` (ranks and ratings are whole numbers unless tied ranks were averaged)."""
    if x is None:
        return None
    return int(x) if float(x).is_integer() else x


def _expects(kinds: Kinds) -> str:
    """What a project's submissions carry, for error messages."""
    parts = {
        "pairwise": "choice A, B, tie or discard",
        "ranking": "ranks (or discard)",
        "binary": "thumb up or down",
        "rating": "rating",
        "critique": "critique",
        "edit": "edit",
    }
    return " + ".join(parts[k] for k in kinds.kinds)


def _checked_label(given: LabelIn) -> LabelIn:
    """Types and sizes of a submission's fields, whatever the project (one-line errors)."""
    from heed.feedback.records import MAX_TEXT_CHARS

    if given.rationale is not None:
        check_text(given.rationale, "rationale", allow_nul=False, max_chars=10_000)
    if given.critique is not None:
        if not isinstance(given.critique, str):
            raise DataError("critique: expected text")
        check_text(given.critique, "critique", allow_nul=False, max_chars=MAX_CRITIQUE)
    if given.edit is not None:
        if not isinstance(given.edit, str):
            raise DataError("edit: expected the corrected answer as text")
        check_text(given.edit, "edit", allow_nul=False, max_chars=MAX_TEXT_CHARS)
    if given.thumb is not None and given.thumb not in THUMBS:
        raise DataError(f"thumb {given.thumb!r}: expected up or down")
    if given.rating is not None and (
        isinstance(given.rating, bool)
        or not isinstance(given.rating, int | float)
        or given.rating != given.rating
    ):
        raise DataError(f"rating: {given.rating!r} is not a number")
    return given


def _refuse_foreign_fields(kinds: Kinds, given: LabelIn) -> None:
    """A field the project does not ask for (a thumb on a ranking project) is refused, named."""
    foreign = []
    if given.choice is not None and given.choice != "discard" and kinds.judgement != "pairwise":
        foreign.append("choice")
    if given.ranks is not None and kinds.judgement != "ranking":
        foreign.append("ranks")
    if given.thumb is not None and kinds.judgement != "binary":
        foreign.append("thumb")
    if given.rating is not None and kinds.judgement != "rating":
        foreign.append("rating")
    if given.critique is not None and not kinds.has("critique"):
        foreign.append("critique")
    if given.edit is not None and not kinds.has("edit"):
        foreign.append("edit")
    if foreign:
        raise DataError(f"{foreign[0]}: this is a {kinds} project; send {_expects(kinds)}")


def _comparison_label(
    judgement: str, opts: dict[str, Any], order: list[int], given: LabelIn
) -> tuple[str, list[float]]:
    """Pairwise ``choice`` or ranking ``ranks`` (display positions) -> (label, ranks per stored index)."""
    k = len(order)
    if judgement == "pairwise":
        choice = given.choice
        if choice not in PAIRWISE_CHOICES:
            raise DataError(f"choice {choice!r}: expected one of A, B, tie, discard")
        if choice == "tie" and not opts.get("allow_tie", True):
            raise DataError("choice 'tie': ties are turned off in this project")
        if choice == "tie":
            return "tie", [1.0, 1.0]
        winner = order["AB".index(choice)]
        stored = [1.0, 1.0]
        stored[1 - winner] = 2.0
        return str(winner), stored
    ranks = given.ranks
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


def _target(stored_ranks: Sequence[float] | None, order: Sequence[int]) -> int:
    """The answer a critique or edit is about: the best-ranked one, the first shown among equals."""
    if not stored_ranks:
        return order[0]
    best = min(stored_ranks)
    return next(i for i in order if stored_ranks[i] == best)


def export_formats(kinds: Kinds) -> tuple[str, ...]:
    """The ``--format`` values a project's kinds give (``rankings`` is another name of ``ranked``)."""
    out: list[str] = []
    if kinds.comparison:
        out += ["pairs", "ranked"]
    elif kinds.judgement == "binary":
        out += ["kto", "pairs"]
    elif kinds.judgement == "rating":
        out += ["ranked", "pairs"]
    if kinds.has("edit"):
        out += [f for f in ("sft", "pairs") if f not in out]
    if kinds.has("critique"):
        out.append("critiques")
    return tuple(out)


def _assistant(prompt: Any, text: str) -> Any:
    """An answer in the prompt's form: text, or a one-message assistant list for a chat prompt."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _pair_row(prompt: Any, chosen: str, rejected: str, weight: float) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "chosen": _assistant(prompt, chosen),
        "rejected": _assistant(prompt, rejected),
        "weight": round(weight, 6),
    }


def _completion_row(prompt: Any, completion: str) -> dict[str, Any]:
    return {"prompt": prompt, "completion": _assistant(prompt, completion)}


def _sft_row(prompt: Any, completion: str) -> dict[str, Any]:
    """An SFT record: ``{"prompt", "completion"}``, or ``{"messages"}`` for a chat prompt."""
    if isinstance(prompt, list):
        return {"messages": [*prompt, {"role": "assistant", "content": completion}]}
    return {"prompt": prompt, "completion": completion}


def _by_prompt(items: list[tuple[Record, agg.Aggregate]]) -> list[list[tuple[Record, agg.Aggregate]]]:
    """Records grouped by identical prompt, in record order."""
    groups: dict[str, list[tuple[Record, agg.Aggregate]]] = {}
    for rec, a in items:
        groups.setdefault(json.dumps(rec.prompt, sort_keys=True, ensure_ascii=False), []).append((rec, a))
    return list(groups.values())


def _group_extra(extras: list[dict[str, Any]]) -> dict[str, Any]:
    """Extra columns of a row made of several records: ``ids``, the summed ``num_annotations``, every
    record's ``critiques``, and the metadata they all share."""
    out: dict[str, Any] = {
        "ids": [e["id"] for e in extras],
        "num_annotations": sum(e["num_annotations"] for e in extras),
    }
    if any("critiques" in e for e in extras):
        out["critiques"] = [c for e in extras for c in e.get("critiques", [])]
    for k, v in extras[0].items():
        if k not in ("id", "num_annotations", "critiques") and all(e.get(k) == v for e in extras[1:]):
            out[k] = v
    return out


def _kinds_of(p: Project) -> Kinds:
    """A stored project's kinds (a project made before kinds existed asks its task alone)."""
    return parse_kinds((p.options or {}).get("kinds") or p.task)


def _kinds_of_info(info: ProjectInfo) -> Kinds:
    return parse_kinds(info.kinds or info.task)


def _check_suggest(suggest: dict[str, Any], kinds: Kinds) -> dict[str, Any]:
    """``{"model": DIR, "show": "scores" | "ranking", "rate": 0..1}`` checked, defaults filled."""
    if not isinstance(suggest, dict) or set(suggest) - {"model", "show", "rate"}:
        raise DataError("suggest: expected {'model': DIR, 'show': 'scores' | 'ranking', 'rate': 0..1}")
    if kinds.judgement is None:
        raise DataError(f"suggest: a {kinds} project has no judgement for a model to suggest")
    show = suggest.get("show", "scores")
    if show not in SUGGEST_SHOW:
        raise DataError(f"suggest.show {show!r}: expected {' or '.join(SUGGEST_SHOW)}")
    if show == "ranking" and not kinds.comparison:
        raise DataError(f"suggest.show 'ranking': a {kinds} project has one answer per record; use scores")
    rate = suggest.get("rate", 1.0)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 < float(rate) <= 1.0:
        raise DataError(f"suggest.rate {rate!r}: expected a share of records above 0 and at most 1")
    model = suggest.get("model")
    if model is not None and not isinstance(model, str):
        raise DataError("suggest.model: expected the reward model's folder")
    return {"model": model, "show": show, "rate": float(rate)}


def one_prompt_form(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """When some prompts are chat messages and some are text, turn the text ones (and their
    ``chosen`` / ``rejected`` / ``completion``) into the conversational form (SFT rows become
    ``{"messages"}``); otherwise return ``rows`` unchanged."""
    chat = [isinstance(r.get("prompt"), list) or "messages" in r for r in rows]
    if all(chat) or not any(chat):
        return rows
    out = []
    for r, is_chat in zip(rows, chat, strict=True):
        if not is_chat:
            user = [{"role": "user", "content": r["prompt"]}]
            if any("messages" in x for x in rows):  # SFT rows: one messages column
                rest = {k: v for k, v in r.items() if k not in ("prompt", "completion")}
                r = {"messages": [*user, {"role": "assistant", "content": r["completion"]}], **rest}
            else:
                r = {**r, "prompt": user}
                for k in ("chosen", "rejected", "completion"):
                    if k in r:
                        r[k] = [{"role": "assistant", "content": r[k]}]
        out.append(r)
    return out

"""The annotation store: SQLAlchemy 2.x tables and an engine set up for safe concurrent writes.

SQLite (the default, one file) runs in WAL mode with ``synchronous=FULL`` so an acknowledged write
survives a crash of the server, a busy timeout instead of "database is locked", and write
transactions opened with ``BEGIN IMMEDIATE`` so two writers never deadlock on a lock upgrade.
PostgreSQL is used by URL (``postgresql+psycopg2://...``); there row locks (``FOR UPDATE``) serialise
the handing out of a record's last slots.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    inspect,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from heed.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no flock; one serving process there, its writers queue on the thread lock
    fcntl = None  # type: ignore[assignment]


def utcnow() -> dt.datetime:
    """Timezone-naive UTC now (stored as such in both SQLite and PostgreSQL)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


USER_NAME_INDEX = "uq_heed_users_name_lower"


class User(Base):
    """A login. Names are unique ignoring case (``ANN1`` and ``ann1`` are one user); ``active`` False
    disables the user (no login, sessions ended); ``must_change_password`` is set while the password
    is a one-time one that an admin has seen."""

    __tablename__ = "heed_users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # annotator | admin
    password_hash: Mapped[str] = mapped_column(String(256))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    __table_args__ = (Index(USER_NAME_INDEX, func.lower(name), unique=True),)


class Membership(Base):
    """An annotator allowed to work on a project (admins may open every project)."""

    __tablename__ = "heed_memberships"
    project_id: Mapped[int] = mapped_column(
        ForeignKey("heed_projects.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(ForeignKey("heed_users.id", ondelete="CASCADE"), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class AuthSession(Base):
    """A login: the browser keeps the token in an HttpOnly cookie (or sends it as a bearer token);
    only its SHA-256 is stored."""

    __tablename__ = "heed_sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("heed_users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16), default="cookie")  # cookie | bearer
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)


class Project(Base):
    __tablename__ = "heed_projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    task: Mapped[str] = mapped_column(
        String(16)
    )  # the judgement kind (heed.feedback.kinds); all kinds in options
    guidelines: Mapped[str] = mapped_column(Text, default="")
    options: Mapped[dict] = mapped_column(JSON, default=dict)
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    lease_seconds: Mapped[int] = mapped_column(Integer, default=600)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Record(Base):
    __tablename__ = "heed_records"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("heed_projects.id", ondelete="CASCADE"))
    external_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    prompt: Mapped[object] = mapped_column(JSON)  # str or a list of chat messages
    responses: Mapped[list] = mapped_column(JSON)  # list[str]
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    priority: Mapped[float] = mapped_column(Float, default=0.0)  # lower is shown first (e.g. RM score gap)
    # a model's suggestion: {"scores": [per response index], "label"?: "up" | "down"}; None = none
    suggestion: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    n_done: Mapped[int] = mapped_column(Integer, default=0)  # annotations stored, never above overlap
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    __table_args__ = (Index("ix_heed_records_queue", "project_id", "n_done", "priority", "id"),)


class Lease(Base):
    """A record handed out to one annotator until ``expires_at``, with the order its responses were shown."""

    __tablename__ = "heed_leases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("heed_projects.id", ondelete="CASCADE"))
    record_id: Mapped[int] = mapped_column(ForeignKey("heed_records.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("heed_users.id", ondelete="CASCADE"))
    display_order: Mapped[list] = mapped_column(JSON)  # display position -> response index
    suggestion_shown: Mapped[bool | None] = mapped_column(Boolean, nullable=True)  # None: nothing to show
    leased_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    __table_args__ = (
        UniqueConstraint("record_id", "user_id", name="uq_heed_lease_record_user"),
        Index("ix_heed_leases_record_expiry", "record_id", "expires_at"),
        Index("ix_heed_leases_user", "project_id", "user_id"),
    )


class Skip(Base):
    """A record an annotator passed over: not a vote, takes no slot, not offered to them again."""

    __tablename__ = "heed_skips"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("heed_projects.id", ondelete="CASCADE"))
    record_id: Mapped[int] = mapped_column(ForeignKey("heed_records.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("heed_users.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    __table_args__ = (
        UniqueConstraint("record_id", "user_id", name="uq_heed_skip_record_user"),
        Index("ix_heed_skips_user", "project_id", "user_id"),
    )


class Annotation(Base):
    """One annotator's judgement of one record, in terms of the record's response indices."""

    __tablename__ = "heed_annotations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("heed_projects.id", ondelete="CASCADE"))
    record_id: Mapped[int] = mapped_column(ForeignKey("heed_records.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("heed_users.id", ondelete="CASCADE"))
    idempotency_key: Mapped[str] = mapped_column(String(128))
    # pairwise: "0" | "1" | "tie"; ranking: "rank"; binary: "up" | "down"; rating: "rating";
    # critique / edit alone: "critique" / "edit"; any kind: "discard"
    label: Mapped[str] = mapped_column(String(16))
    ranks: Mapped[list | None] = mapped_column(JSON, nullable=True)  # per response index, lower is better
    display_order: Mapped[list] = mapped_column(JSON)
    rationale: Mapped[str | None] = mapped_column(Text, nullable=True)
    rating: Mapped[float | None] = mapped_column(Float, nullable=True)  # a point of the project's scale
    critique: Mapped[str | None] = mapped_column(Text, nullable=True)
    corrected: Mapped[str | None] = mapped_column(Text, nullable=True)  # the edit kind's corrected answer
    target: Mapped[int | None] = mapped_column(Integer, nullable=True)  # response index critiqued / edited
    suggestion_shown: Mapped[bool | None] = mapped_column(Boolean, nullable=True)  # None: none existed
    duration_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key", name="uq_heed_annotation_key"),
        UniqueConstraint("record_id", "user_id", name="uq_heed_annotation_record_user"),
        Index("ix_heed_annotations_project_user", "project_id", "user_id", "id"),
    )


class LoginAttempt(Base):
    """A password check counted by the shared login limiter (:class:`heed.feedback.auth.SharedLoginLimiter`):
    ``pending`` while its hash runs, then ``failed`` (kept for the limiter's window) or deleted;
    ``cleared`` when a later success of the same (name, address) forgave it, which still counts
    for the address. ``at`` is wall-clock seconds, the same in every worker process."""

    __tablename__ = "heed_login_attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))  # lower case
    address: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(8))  # pending | failed | cleared
    at: Mapped[float] = mapped_column(Float)
    __table_args__ = (
        Index("ix_heed_login_attempts_address", "address", "at"),
        Index("ix_heed_login_attempts_pair", "name", "address"),
    )


def normalize_url(db: str | Path) -> str:
    """Accept a SQLAlchemy URL or a plain file path (which becomes ``sqlite:///PATH``)."""
    text = str(db)
    if "://" not in text:
        path = Path(text).expanduser()
        if path.parent and not path.parent.exists():
            raise ConfigError(f"--db {text}: folder {path.parent} does not exist")
        return f"sqlite:///{path}"
    return text


def make_engine(db: str | Path, *, allow_name_clashes: bool = False) -> Engine:
    """Create the engine for ``db`` (URL or SQLite path) and the tables if missing."""
    url_text = normalize_url(db)
    try:
        url = make_url(url_text)
    except ArgumentError as exc:
        raise ConfigError(f"--db {url_text!r}: not a database URL ({exc}); e.g. sqlite:///heed.db") from exc
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise ConfigError("--db: an in-memory SQLite database cannot be shared; give a file path")
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=20, max_overflow=20
        )
        _setup_sqlite(engine)
    elif url.get_backend_name() == "postgresql":
        engine = create_engine(url, pool_size=20, max_overflow=20)
        _ping_when_idle(engine)
    else:
        raise ConfigError(f"--db {url_text!r}: only sqlite and postgresql are supported")
    try:
        if _schema_is_current(engine):  # the usual restart: one query, no DDL, no migration
            return engine
        existing = set(inspect(engine).get_table_names())
        Base.metadata.create_all(engine)
    except Exception as exc:  # the driver's connection error: say which URL failed
        raise ConfigError(f"--db: cannot open {url.render_as_string(hide_password=True)}: {exc}") from exc
    _migrate(engine, existing, allow_name_clashes=allow_name_clashes)
    return engine


# a pooled connection unused for longer than this is pinged before use (it may have been cut)
IDLE_PING_S = 10.0


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection before use only when it sat idle for over :data:`IDLE_PING_S`.

    ``pool_pre_ping`` would add a round trip to every transaction (two or three per request).
    A connection cut while in use (the database restarted under load) still fails its request
    once; SQLAlchemy then replaces every pooled connection opened before the cut.
    """

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_connection, record) -> None:  # type: ignore[no-untyped-def]
        record.info["heed_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection, record, _proxy) -> None:  # type: ignore[no-untyped-def]
        since = record.info.get("heed_idle_since")
        if since is None or time.monotonic() - since < IDLE_PING_S:
            return
        try:
            cur = dbapi_connection.cursor()
            cur.execute("SELECT 1")
            cur.close()
            dbapi_connection.rollback()
        except Exception as exc:  # the driver's own error class: the pool retries with a new connection
            raise DisconnectionError(f"pooled connection went away: {exc}") from exc


def _schema_is_current(engine: Engine) -> bool:
    """True when every table and column of :data:`Base.metadata` and the user-name index exist
    (then :func:`_migrate` has nothing to do): one catalogue query instead of one per table."""
    if engine.dialect.name == "sqlite":
        q = (
            "SELECT m.name, c.name FROM sqlite_master m JOIN pragma_table_info(m.name) c "
            "WHERE m.type = 'table' AND m.name LIKE 'heed%' "
            "UNION ALL SELECT '', name FROM sqlite_master WHERE type = 'index' AND name = :ix"
        )
    else:
        q = (
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name LIKE 'heed%' "
            "UNION ALL SELECT '', indexname FROM pg_indexes "
            "WHERE schemaname = current_schema() AND indexname = :ix"
        )
    with engine.connect() as conn:
        have = {(t, c) for t, c in conn.execute(text(q), {"ix": USER_NAME_INDEX})}
    want = {(t.name, c.name) for t in Base.metadata.sorted_tables for c in t.columns}
    return ("", USER_NAME_INDEX) in have and want <= have


def name_clashes(engine: Engine) -> list[list[str]]:
    """Groups of user names that differ only in case (refused since names became case-insensitive)."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT name FROM heed_users ORDER BY id")).scalars().all()
    groups: dict[str, list[str]] = {}
    for name in rows:
        groups.setdefault(name.lower(), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _has_index(engine: Engine, name: str) -> bool:
    # (the inspector does not report expression indexes on SQLite, so ask the catalogue itself)
    if engine.dialect.name == "sqlite":
        q = "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = :n"
    else:
        q = "SELECT 1 FROM pg_indexes WHERE schemaname = current_schema() AND indexname = :n"
    with engine.connect() as conn:
        return conn.execute(text(q), {"n": name}).first() is not None


# columns added after the first release: table -> {column: SQL type}; added by _migrate
ADDED_COLUMNS = {
    "heed_records": {"suggestion": "JSON"},
    "heed_leases": {"suggestion_shown": "BOOLEAN"},
    "heed_annotations": {
        "rating": "FLOAT",
        "critique": "TEXT",
        "corrected": "TEXT",
        "target": "INTEGER",
        "suggestion_shown": "BOOLEAN",
    },
}


def _migrate(engine: Engine, existing: set[str], *, allow_name_clashes: bool) -> None:
    """Bring a database made by an older Heed up to date (each step is idempotent).

    1. ``heed_users.must_change_password`` (older users keep their passwords as they are).
    2. The case-insensitive unique index on user names; refused (``ConfigError``) while two names
       differ only in case, unless ``allow_name_clashes`` (``heed annotate user rename`` uses it).
    3. Project membership: a database that had users before memberships existed gives every
       annotator every existing project, so upgrading locks nobody out of work they could do.
    4. The feedback kinds' columns (:data:`ADDED_COLUMNS`), all nullable: older rows read as
       "no rating, no critique, no edit, no suggestion".
    5. New tables (``heed_login_attempts``) are made by ``create_all`` before this runs.
    """
    if "heed_users" not in existing:
        return  # a fresh database: create_all made everything
    for table, columns in ADDED_COLUMNS.items():
        if table not in existing:
            continue
        have = {c["name"] for c in inspect(engine).get_columns(table)}
        with engine.begin() as conn:
            for name, sql_type in columns.items():
                if name not in have:
                    conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}"))
    cols = {c["name"] for c in inspect(engine).get_columns("heed_users")}
    with engine.begin() as conn:
        if "must_change_password" not in cols:
            false = "0" if engine.dialect.name == "sqlite" else "false"
            conn.execute(
                text(
                    f"ALTER TABLE heed_users ADD COLUMN must_change_password BOOLEAN NOT NULL DEFAULT {false}"
                )
            )
        if "heed_memberships" not in existing:
            conn.execute(
                text(
                    "INSERT INTO heed_memberships (project_id, user_id, created_at) "
                    "SELECT p.id, u.id, CURRENT_TIMESTAMP FROM heed_projects p CROSS JOIN heed_users u "
                    "WHERE u.role = 'annotator'"
                )
            )
    if _has_index(engine, USER_NAME_INDEX):
        return
    clashes = name_clashes(engine)
    if clashes:
        if allow_name_clashes:
            return
        shown = "; ".join(" and ".join(g) for g in clashes)
        raise ConfigError(
            f"--db: user names are now case-insensitive, but {shown} differ only in case; "
            f"rename all but one (heed annotate user rename OLD NEW --db ...) and start again"
        )
    with engine.begin() as conn:
        conn.execute(text(f"CREATE UNIQUE INDEX IF NOT EXISTS {USER_NAME_INDEX} ON heed_users (lower(name))"))


def _setup_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        # Writers take the write lock up front: no lock upgrade, so no SQLITE_BUSY deadlock.
        immediate = conn.get_execution_options().get("heed_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Store:
    """An engine plus two session factories: :meth:`read` (no locks, no writes) and :meth:`write`
    (one transaction)."""

    def __init__(self, db: str | Path, *, allow_name_clashes: bool = False) -> None:
        self.engine = make_engine(db, allow_name_clashes=allow_name_clashes)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        # PostgreSQL reads run in autocommit: under READ COMMITTED every statement takes its own
        # snapshot anyway, and a read then costs one round trip instead of BEGIN, query, COMMIT.
        reader = (
            self.engine if self.is_sqlite else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        self._read = sessionmaker(reader, expire_on_commit=False)
        self._write = sessionmaker(self.engine.execution_options(heed_write=True), expire_on_commit=False)
        self._sqlite_writer = threading.Lock()
        # SQLite: the writers of every process (``serve --workers N``) queue on an flock of this file;
        # the kernel drops it when its process dies, so a SIGKILLed worker never leaves it held
        self._lock_path = (
            f"{self.engine.url.database}-writer.lock" if self.is_sqlite and fcntl is not None else None
        )
        self._lock_file: tuple[int, BinaryIO] | None = None  # (pid that opened it, file)

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success and rolls back on any error.

        On SQLite, writers also queue on a lock, those of this process on a thread lock and then
        those of every process on an flock (:meth:`_sqlite_turn`): SQLite's own busy handler polls
        with growing sleeps, which makes the slowest writers wait far longer than needed.
        """
        queue = self._sqlite_turn() if self.is_sqlite else contextlib.nullcontext()
        with queue, self._write() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def _sqlite_turn(self) -> Iterator[None]:
        with self._sqlite_writer:
            if self._lock_path is None:
                yield
                return
            if self._lock_file is None or self._lock_file[0] != os.getpid():
                # (opened per process: a descriptor inherited across fork would share one lock)
                self._lock_file = (os.getpid(), open(self._lock_path, "ab"))  # noqa: SIM115 - kept open
            fd = self._lock_file[1].fileno()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._lock_file is not None and self._lock_file[0] == os.getpid():
            self._lock_file[1].close()
        self._lock_file = None
        self.engine.dispose()

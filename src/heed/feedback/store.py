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
import threading
from collections.abc import Iterator
from pathlib import Path

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
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from heed.errors import ConfigError


def utcnow() -> dt.datetime:
    """Timezone-naive UTC now (stored as such in both SQLite and PostgreSQL)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "heed_users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # annotator | admin
    password_hash: Mapped[str] = mapped_column(String(256))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
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
    task: Mapped[str] = mapped_column(String(16))  # pairwise | ranking
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
    leased_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    __table_args__ = (
        UniqueConstraint("record_id", "user_id", name="uq_heed_lease_record_user"),
        Index("ix_heed_leases_record_expiry", "record_id", "expires_at"),
        Index("ix_heed_leases_user", "project_id", "user_id"),
    )


class Annotation(Base):
    """One annotator's judgement of one record, in terms of the record's response indices."""

    __tablename__ = "heed_annotations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("heed_projects.id", ondelete="CASCADE"))
    record_id: Mapped[int] = mapped_column(ForeignKey("heed_records.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("heed_users.id", ondelete="CASCADE"))
    idempotency_key: Mapped[str] = mapped_column(String(128))
    label: Mapped[str] = mapped_column(
        String(16)
    )  # pairwise: "0" | "1" | "tie" | "discard"; ranking: "rank" | "discard"
    ranks: Mapped[list | None] = mapped_column(JSON, nullable=True)  # per response index, lower is better
    display_order: Mapped[list] = mapped_column(JSON)
    rationale: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    __table_args__ = (
        UniqueConstraint("user_id", "idempotency_key", name="uq_heed_annotation_key"),
        UniqueConstraint("record_id", "user_id", name="uq_heed_annotation_record_user"),
        Index("ix_heed_annotations_project_user", "project_id", "user_id", "id"),
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


def make_engine(db: str | Path) -> Engine:
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
        engine = create_engine(url, pool_size=20, max_overflow=20, pool_pre_ping=True)
    else:
        raise ConfigError(f"--db {url_text!r}: only sqlite and postgresql are supported")
    try:
        Base.metadata.create_all(engine)
    except Exception as exc:  # the driver's connection error: say which URL failed
        raise ConfigError(f"--db: cannot open {url.render_as_string(hide_password=True)}: {exc}") from exc
    return engine


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
    """An engine plus two session factories: :meth:`read` and :meth:`write` (one transaction each)."""

    def __init__(self, db: str | Path) -> None:
        self.engine = make_engine(db)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.engine.execution_options(heed_write=True), expire_on_commit=False)
        self._sqlite_writer = threading.Lock()

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that commits on success and rolls back on any error.

        On SQLite, writers of this process also queue on a lock: SQLite's own busy handler polls
        with growing sleeps, which makes the slowest writers wait far longer than needed.
        """
        queue = self._sqlite_writer if self.is_sqlite else contextlib.nullcontext()
        with queue, self._write() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()

"""What keeps a restart of the annotation server short and a request cheap: the socket opened before
the app loads (clients queue instead of being refused), the one-query schema check, reads without
BEGIN/COMMIT on PostgreSQL, the ping of idle pooled connections only, and the load generator's
retry schedule."""

from __future__ import annotations

import random
import socket
import threading
import time

import httpx
import pytest
from sqlalchemy import event, text

from heed.errors import ConfigError
from heed.feedback import store as store_mod
from heed.feedback.listen import listen_socket
from heed.feedback.loadtest import RETRY_MAX_S, retry_delay
from heed.feedback.service import Feedback


def test_listen_socket_refuses_a_taken_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ConfigError, match=rf"--port {port}: cannot listen there \(Address already in use\)"
        ):
            listen_socket("127.0.0.1", port)


def test_a_client_arriving_during_start_up_waits_and_is_answered(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The socket listens before the app exists: a request sent then is answered once it is up."""
    import uvicorn

    from heed.feedback.api import create_app

    sock = listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    answer: dict[str, object] = {}

    def client() -> None:
        t0 = time.perf_counter()
        answer["status"] = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code
        answer["waited_s"] = time.perf_counter() - t0

    thread = threading.Thread(target=client)
    thread.start()
    time.sleep(0.5)  # the app is still "loading": the request sits in the accept queue
    assert thread.is_alive()
    server = uvicorn.Server(uvicorn.Config(create_app(f"sqlite:///{tmp_path / 'h.db'}"), log_level="warning"))
    runner = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    runner.start()
    thread.join(30)
    server.should_exit = True
    runner.join(10)
    assert answer["status"] == 200 and answer["waited_s"] >= 0.5  # type: ignore[operator]


def test_restart_checks_the_schema_in_one_query(db_url: str) -> None:
    Feedback(db_url).close()  # creates the tables
    engine = store_mod.make_engine(db_url)
    try:
        assert store_mod._schema_is_current(engine)
        seen: list[str] = []
        event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
        assert store_mod._schema_is_current(engine)
        assert len([q for q in seen if not q.startswith(("BEGIN", "PRAGMA"))]) == 1
        with engine.begin() as conn:  # an older database: a column added later is missing
            conn.execute(text("ALTER TABLE heed_annotations DROP COLUMN rating"))
        assert not store_mod._schema_is_current(engine)
    finally:
        engine.dispose()
    fb = Feedback(db_url)  # the full check runs and brings the column back
    try:
        assert store_mod._schema_is_current(fb.store.engine)
    finally:
        fb.close()


def test_postgres_reads_send_no_begin_or_commit(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    fb = Feedback(db_url)
    try:
        fb.create_project("p", "pairwise")
        fb.add_user("ann", password="a long password")
        fb.add_member("p", "ann")
        user = fb.user("ann")
        seen: list[str] = []
        event.listen(fb.store.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
        assert fb.can_access(user, "p") and not fb.can_access(user, "nope")
        assert len(seen) == 2  # one query per check
        with fb.store.read() as s:  # psycopg2 in autocommit sends neither BEGIN nor COMMIT
            assert s.connection().connection.dbapi_connection.autocommit is True
        with fb.store.write() as s:  # writes stay transactions
            assert s.connection().connection.dbapi_connection.autocommit is False
    finally:
        fb.close()


def test_an_idle_postgres_connection_cut_meanwhile_is_replaced(db_url: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    if not db_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only")
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    admin = create_engine(db_url)
    fb = Feedback(db_url)

    def cut_pooled_connection() -> None:
        with fb.store.engine.connect() as conn:  # the pool hands this one out again next
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        time.sleep(0.2)

    try:
        fb.create_project("p", "pairwise")
        monkeypatch.setattr(store_mod, "IDLE_PING_S", 0.0)  # every connection counts as idle
        cut_pooled_connection()
        assert fb.projects()[0].name == "p"  # pinged, found dead, replaced
        monkeypatch.setattr(store_mod, "IDLE_PING_S", 3600.0)  # none is idle: no ping
        cut_pooled_connection()
        with pytest.raises(OperationalError):
            fb.projects()
        assert fb.projects()[0].name == "p"  # the pool was refreshed after the failure
    finally:
        fb.close()
        admin.dispose()


def test_retry_schedule_starts_quick_and_is_capped() -> None:
    rng = random.Random(0)
    delays = [[retry_delay(a, rng) for a in range(10)] for _ in range(200)]
    assert all(0.005 <= d[0] <= 0.01 for d in delays)  # first retry after 5-10 ms
    assert all(0.01 <= d[1] <= 0.02 for d in delays)
    assert all(RETRY_MAX_S / 2 <= d[9] <= RETRY_MAX_S for d in delays)  # capped at 250 ms
    assert len({round(d[3], 6) for d in delays}) > 100  # jittered: clients do not retry in step

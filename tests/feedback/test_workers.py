"""``heed annotate serve --workers N``: a worker SIGKILLed under load loses nothing while the others
answer, the login limits hold across workers (counted in the database), and SIGTERM or SIGINT to
the supervisor stops every worker."""

from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from heed.feedback.api import create_app
from heed.feedback.auth import PENDING_MAX_S, LoginLimiter, SharedLoginLimiter
from heed.feedback.listen import listen_socket
from heed.feedback.loadtest import Server, free_port, run_load
from heed.feedback.service import Feedback
from heed.feedback.workers import supervise

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="workers are forked (POSIX)")


def test_a_worker_sigkilled_under_load_loses_nothing(tmp_path, db_url: str) -> None:  # type: ignore[no-untyped-def]
    figures = run_load(
        tmp_path,
        annotators=4,
        annotations=100,
        overlap=2,
        kill_after=30,
        kill="worker",
        workers=2,
        db=db_url,
        fast_hashes=True,
        timeout_s=180,
    )
    print(figures)
    assert figures["errors"] == [] and figures["kills"] == 1
    assert figures["acknowledged"] == figures["target_annotations"] == figures["stored"] == 100
    assert figures["lost"] == 0 and figures["stored_twice"] == 0 and figures["over_assigned_records"] == 0
    assert figures["unacknowledged_stored"] == 0 and figures["complete_records"] == 50
    log = (tmp_path / "server.log").read_text()
    assert "died (signal SIGKILL); started worker" in log  # the supervisor replaced it


def _limited_pair(db_url: str, hasher, clock: list[float]) -> tuple[TestClient, TestClient, list[Feedback]]:  # type: ignore[no-untyped-def]
    """Two apps over one database, each with its own engine and limiter, as two worker processes have."""
    services = [Feedback(db_url, hasher=hasher, seed=0) for _ in range(2)]
    services[0].add_user("boss", "admin", password="boss-password-1")
    clients = [
        TestClient(
            create_app(fb, limiter=SharedLoginLimiter(fb.store, 3, 300.0, clock=lambda: clock[0])),
            base_url="http://127.0.0.1",
            client=("10.0.0.66", 1000),
        )
        for fb in services
    ]
    return clients[0], clients[1], services


def test_login_limits_hold_across_two_workers(db_url: str, hasher) -> None:  # type: ignore[no-untyped-def]
    clock = [1000.0]
    one, two, services = _limited_pair(db_url, hasher, clock)
    try:
        # limit 3 per (name, address), guesses alternating between the workers: 3 failures in all
        codes = [
            c.post("/api/login", json={"name": "boss", "password": "nope"}).status_code
            for c in (one, two) * 2
        ]
        assert codes == [401, 401, 401, 429]
        r = two.post("/api/login", json={"name": "boss", "password": "boss-password-1"})
        assert r.status_code == 429 and r.headers["retry-after"] == "2"  # the backoff is shared too
        clock[0] += 2.0
        assert one.post("/api/login", json={"name": "boss", "password": "boss-password-1"}).status_code == 200
        # the success cleared the pair's failures in both workers
        assert two.post("/api/login", json={"name": "boss", "password": "nope"}).status_code == 401
    finally:
        for fb in services:
            fb.close()


def test_in_memory_limits_would_double_with_two_workers(tmp_path, hasher) -> None:  # type: ignore[no-untyped-def]
    """Why the limiter lives in the database: two processes with their own in-memory counts let an
    attacker have twice the attempts."""
    db = f"sqlite:///{tmp_path / 'heed.db'}"
    services = [Feedback(db, hasher=hasher, seed=0) for _ in range(2)]
    services[0].add_user("boss", "admin", password="boss-password-1")
    clients = [
        TestClient(create_app(fb, limiter=LoginLimiter(3, 300.0)), client=("10.0.0.66", 1000))
        for fb in services
    ]
    codes = [c.post("/api/login", json={"name": "boss", "password": "nope"}).status_code for c in clients * 3]
    assert codes.count(401) == 6  # 2 x the limit of 3
    for fb in services:
        fb.close()


def test_shared_limiter_counts_attempts_in_flight_and_outlives_a_dead_worker(db_url: str) -> None:
    clock = [0.0]
    fb = Feedback(db_url)
    lim = SharedLoginLimiter(fb.store, 3, 600.0, clock=lambda: clock[0])
    other = SharedLoginLimiter(Feedback(db_url).store, 3, 600.0, clock=lambda: clock[0])
    try:
        # three attempts in flight at once (two in one worker, one in the other) use the whole limit
        assert [lim.acquire("a", "x"), other.acquire("A", "x"), lim.acquire("a", "x")] == [None, None, None]
        assert other.acquire("a", "x") == 1.0
        lim.release("a", "x", ok=None)  # never reached a password check: frees its slot, no failure
        assert other.acquire("a", "x") is None
        # the worker holding the other two dies mid-check: after PENDING_MAX_S they count as failures
        clock[0] += PENDING_MAX_S + 1
        other.release("a", "x", ok=False)  # one of the three pending settles as a failure at t = 61
        # 3 failures (2 stale pending + 1 settled): backoff 2 * 2**0 = 2 s after the last, t = 61
        assert lim.acquire("a", "x") == 2.0
        clock[0] += 2.0
        assert lim.acquire("a", "x") is None
        lim.release("a", "x", ok=True)  # a success forgives the pair's failures, stale ones too
        assert [other.acquire("a", "x") for _ in range(3)] == [None, None, None]
        for _ in range(3):
            other.release("a", "x", ok=None)
    finally:
        fb.close()
        other.store.close()


def _serve(db: str, port: int, workers: int, log: Path) -> Server:
    server = Server(db, port, log, workers)
    server.start()
    return server


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_supervisor_stops_every_worker(tmp_path, hasher, sig: signal.Signals) -> None:  # type: ignore[no-untyped-def]
    db = f"sqlite:///{tmp_path / 'heed.db'}"
    Feedback(db, hasher=hasher).close()
    server = _serve(db, free_port(), 3, tmp_path / "server.log")
    assert server.proc is not None
    try:
        workers = server.worker_pids()
        assert len(workers) == 3
        server.proc.send_signal(sig)
        assert server.proc.wait(20) == 0
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in workers)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=2)
    finally:
        server.kill()


def test_concurrent_guesses_over_real_workers_get_the_limit_once(tmp_path, hasher) -> None:  # type: ignore[no-untyped-def]
    db = f"sqlite:///{tmp_path / 'heed.db'}"
    fb = Feedback(db, hasher=hasher)
    fb.add_user("boss", "admin", password="boss-password-1")
    fb.close()
    server = _serve(db, free_port(), 2, tmp_path / "server.log")
    url = f"http://127.0.0.1:{server.port}/api/login"
    try:
        with ThreadPoolExecutor(30) as pool:  # a new connection each: the kernel spreads them over both
            codes = list(
                pool.map(
                    lambda i: (
                        httpx.post(url, json={"name": "boss", "password": f"x{i}"}, timeout=60).status_code
                    ),
                    range(30),
                )
            )
        assert sorted(codes) == [401] * 10 + [429] * 20  # limit 10 per (name, address), not 10 per worker
    finally:
        server.stop()


def test_a_worker_that_cannot_start_stops_the_supervisor() -> None:
    sock = listen_socket("127.0.0.1", 0)
    lines: list[str] = []
    try:
        t0 = time.monotonic()
        assert supervise(lambda s: sys.exit(3), sock, 2, log=lines.append) == 3
        assert time.monotonic() - t0 < 10
    finally:
        sock.close()
    assert "failed to start (exit code 3)" in lines[0]


def test_the_supervisor_restarts_a_sigkilled_worker_at_once(tmp_path, hasher) -> None:  # type: ignore[no-untyped-def]
    db = f"sqlite:///{tmp_path / 'heed.db'}"
    Feedback(db, hasher=hasher).close()
    server = _serve(db, free_port(), 2, tmp_path / "server.log")
    try:
        t0 = time.perf_counter()
        victim = server.kill_worker()
        assert time.perf_counter() - t0 < 5
        assert victim not in server.worker_pids() and len(server.worker_pids()) == 2
        # the service answers throughout
        assert httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=5).status_code == 200
    finally:
        server.stop()


def test_a_bad_database_is_one_line_from_the_supervisor(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The schema is opened once before forking: an unreachable database fails there, once."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    cmd = [sys.executable, "-m", "heed", "annotate", "serve", "--workers", "2", "--port", str(free_port())]
    bad = "postgresql+psycopg2://nobody@127.0.0.1:1/none"
    r = subprocess.run([*cmd, "--db", bad], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        line for line in r.stderr.splitlines() if line.strip()
    ]
    assert "cannot open" in r.stderr and "worker" not in r.stderr


def test_expired_attempts_of_every_address_are_pruned(db_url: str) -> None:
    from sqlalchemy import func, select

    from heed.feedback.store import LoginAttempt

    clock = [0.0]
    fb = Feedback(db_url)
    lim = SharedLoginLimiter(fb.store, 3, 100.0, clock=lambda: clock[0])
    try:
        for address in ("a1", "a2"):
            assert lim.acquire("u", address) is None  # the 1st acquire prunes (nothing yet)
            lim.release("u", address, ok=False)
        lim._acquires = 0  # the next acquire is a pruning one
        clock[0] = 100.5  # both failures are past the 100 s window (the horizon)
        assert lim.acquire("v", "a3") is None
        with fb.store.read() as s:
            assert s.execute(select(LoginAttempt.address)).scalars().all() == ["a3"]
            assert s.execute(select(func.count()).select_from(LoginAttempt)).scalar() == 1
    finally:
        fb.close()

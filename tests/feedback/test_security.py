"""Availability and abuse: limits and sessions act on the headers before any body is read, login
limits count before any hash and never lock the right password out for minutes, the idempotent
retry answers the same on both databases, GET never changes state, and the OpenAPI schema says
what the API does."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from heed.feedback.api import create_app
from heed.feedback.auth import LoginLimiter
from heed.feedback.loadtest import free_port
from heed.feedback.service import Feedback
from heed.feedback.store import Annotation, AuthSession, Lease, Membership, Skip, User

PASSWORDS = {"boss": "boss-password-1", "ann": "ann-password-1"}


class SlowHasher(PasswordHasher):
    """Real argon2 (small parameters) that also counts verifications, how many ran at once, and
    takes 50 ms longer, so concurrent logins really overlap."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8192, parallelism=1)
        self.calls = self.running = self.peak = 0
        self._lock = threading.Lock()

    def verify(self, hash: str, password: str) -> bool:  # type: ignore[override]
        with self._lock:
            self.calls += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(0.05)
            return super().verify(hash, password)
        finally:
            with self._lock:
                self.running -= 1


def seeded(db: str, hasher: PasswordHasher) -> Feedback:
    fb = Feedback(db, hasher=hasher, seed=0)
    for name, role in (("boss", "admin"), ("ann", "annotator")):
        fb.add_user(name, role, password=PASSWORDS[name])
    fb.create_project("p", "pairwise", overlap=1)
    fb.import_records("p", [{"prompt": f"q{i}", "responses": ["a", "b"]} for i in range(4)])
    fb.add_member("p", "ann")
    return fb


@pytest.fixture
def live(tmp_path):  # type: ignore[no-untyped-def]
    """A real uvicorn server on 127.0.0.1 (raw sockets need one), login limit 10."""
    import uvicorn

    hasher = SlowHasher()
    fb = seeded(f"sqlite:///{tmp_path / 'heed.db'}", hasher)
    config = uvicorn.Config(create_app(fb), host="127.0.0.1", port=free_port(), log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield config.port, fb, hasher
    srv.should_exit = True
    thread.join(10)
    fb.close()


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 5.0) -> tuple[int, float]:
    """Send a request line + headers (``head``, ending in a blank line) and maybe part of a body, and
    return (status, seconds to answer) without ever sending the rest of the announced body."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + body)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), time.perf_counter() - t0


def bearer(port: int, name: str) -> str:
    r = httpx.post(
        f"http://127.0.0.1:{port}/api/login", json={"name": name, "password": PASSWORDS[name], "bearer": True}
    )
    return r.json()["token"]


def test_bodies_are_judged_on_the_headers_before_being_read(live) -> None:  # type: ignore[no-untyped-def]
    port, _, _ = live
    host = f"Host: 127.0.0.1:{port}\nContent-Type: application/json\n"
    big = f"Content-Length: {58 << 20}\n"
    # no session: 401 at once, though 58 MiB were announced and none sent (reading would hang 5 s)
    status, took = raw_request(port, f"POST /api/admin/projects/p/records HTTP/1.1\n{host}{big}\n")
    assert status == 401 and took < 2
    # the same, streamed in chunks with no length: 401 after the first chunk, the rest never read
    chunked = f"POST /api/admin/projects/p/records HTTP/1.1\n{host}Transfer-Encoding: chunked\n\n"
    status, took = raw_request(port, chunked, b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
    assert status == 401 and took < 2
    # a forged cookie: 401; a real cookie without its CSRF token: 403; both before reading
    path = "POST /api/projects/p/annotations HTTP/1.1\n"
    status, _ = raw_request(port, f"{path}{host}Cookie: heed_session=forged\n{big}\n")
    assert status == 401
    login = httpx.post(
        f"http://127.0.0.1:{port}/api/login", json={"name": "ann", "password": PASSWORDS["ann"]}
    )
    cookie = f"Cookie: heed_session={login.cookies['heed_session']}\n"
    status, took = raw_request(port, f"{path}{host}{cookie}{big}\n")
    assert status == 403 and took < 2
    status, _ = raw_request(port, f"{path}{host}{cookie}X-CSRF-Token: {login.json()['csrf_token']}\n{big}\n")
    assert status == 413
    # an annotator's body over 1 MiB, or over 1 MiB on the import route (64 MiB is for admins): 413 unread
    auth_ann = f"Authorization: Bearer {bearer(port, 'ann')}\n"
    for path in ("/api/projects/p/annotations", "/api/admin/projects/p/records"):
        status, took = raw_request(
            port, f"POST {path} HTTP/1.1\n{host}{auth_ann}Content-Length: {2 << 20}\n\n"
        )
        assert status == 413 and took < 2, path
    # an admin's import may be 64 MiB; 65 MiB is refused unread
    auth_boss = f"Authorization: Bearer {bearer(port, 'boss')}\n"
    status, _ = raw_request(
        port, f"POST /api/admin/projects/p/records HTTP/1.1\n{host}{auth_boss}Content-Length: {65 << 20}\n\n"
    )
    assert status == 413
    # a login body over 4 KiB is refused unread too
    status, _ = raw_request(port, f"POST /api/login HTTP/1.1\n{host}Content-Length: {1 << 20}\n\n")
    assert status == 413
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json() == {"status": "ok"}


def test_concurrent_guesses_are_counted_before_hashing(live) -> None:  # type: ignore[no-untyped-def]
    port, _, hasher = live
    url = f"http://127.0.0.1:{port}/api/login"

    def guess(i: int) -> int:
        return httpx.post(url, json={"name": "boss", "password": f"wrong-{i}"}, timeout=30).status_code

    with ThreadPoolExecutor(30) as pool:
        codes = list(pool.map(guess, range(30)))
    # limit 10 per (name, address): 10 hashes, 20 refusals without a hash; at most 2 hashes at once
    assert sorted(codes) == [401] * 10 + [429] * 20
    assert hasher.calls == 10 and hasher.peak <= 2
    # /health answers while logins queue for a hash slot
    with ThreadPoolExecutor(8) as pool:
        pending = [
            pool.submit(httpx.post, url, json={"name": f"u{i}", "password": "x"}, timeout=30)
            for i in range(8)
        ]
        t0 = time.perf_counter()
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        assert time.perf_counter() - t0 < 1.0
        assert all(f.result().status_code == 401 for f in pending)
    assert hasher.peak <= 2


def test_login_limits_per_name_and_address_with_backoff(tmp_path, hasher) -> None:  # type: ignore[no-untyped-def]
    clock = [1000.0]
    limiter = LoginLimiter(3, 300.0, address_limit=12, clock=lambda: clock[0])
    fb = seeded(f"sqlite:///{tmp_path / 'heed.db'}", hasher)
    app = create_app(fb, limiter=limiter)
    attacker = TestClient(app, base_url="http://127.0.0.1", client=("10.0.0.66", 1000))
    owner = TestClient(app, base_url="http://127.0.0.1", client=("10.0.0.7", 1000))

    def login(client: TestClient, name: str, password: str) -> httpx.Response:
        return client.post("/api/login", json={"name": name, "password": password})

    assert [login(attacker, "boss", "nope").status_code for _ in range(4)] == [401, 401, 401, 429]
    # the attacker's failures do not lock the admin out: from their own address they log in at once
    assert login(owner, "BOSS", PASSWORDS["boss"]).status_code == 200
    # the attacker backs off: 2 s after the 3rd failure (2 * 2**0), then 4 s, 8 s, ... at most 30 s
    r = login(attacker, "boss", PASSWORDS["boss"])
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    clock[0] += 2.0
    assert login(attacker, "boss", "nope").status_code == 401  # 4th failure at t = 1002
    assert login(attacker, "boss", "x").headers["retry-after"] == "4"
    # failure n (n > 3) waits min(2 * 2**(n - 3), 30) s: 5th -> 8, 6th -> 16, 7th -> 32 capped to 30
    for wait, expected in ((4, 8), (8, 16), (16, 30), (30, 30), (30, 30)):
        clock[0] += wait
        assert login(attacker, "boss", "nope").status_code == 401
        r = login(attacker, "boss", "nope")
        assert r.status_code == 429 and int(r.headers["retry-after"]) == expected
    # even at the worst, the right password from the same address waits at most 30 s, not minutes
    clock[0] += 30
    assert login(attacker, "boss", PASSWORDS["boss"]).status_code == 200
    # spraying names from one address: 12 failures in all (address limit), then that address waits
    sprayer = TestClient(app, base_url="http://127.0.0.1", client=("10.0.0.99", 1000))
    codes = [login(sprayer, f"user{i}", "nope").status_code for i in range(13)]
    assert codes == [401] * 12 + [429]
    assert login(owner, "ann", PASSWORDS["ann"]).status_code == 200
    fb.close()


def test_limiter_reserves_attempts_in_flight() -> None:
    clock = [0.0]
    lim = LoginLimiter(3, 60.0, clock=lambda: clock[0])
    # three attempts in flight at once use the whole limit; a fourth is refused before any hash
    assert [lim.acquire("a", "x") for _ in range(3)] == [None, None, None]
    assert lim.acquire("a", "x") == 1.0
    for _ in range(3):
        lim.release("a", "x", ok=False)
    assert lim.acquire("a", "x") == 2.0  # backoff 2 s after the third failure
    clock[0] = 61.0  # the failures leave the 60 s window
    assert lim.acquire("a", "x") is None
    lim.release("a", "x", ok=True)  # a success clears the pair
    assert lim._fails.get(("pair", "a", "x")) is None
    assert lim.acquire("A", "x") is None  # names ignore case
    lim.release("A", "x", ok=None)  # neither a failure nor a success
    assert ("pair", "a", "x") not in lim._fails and len(lim._fails[("address", "x")]) == 0


def test_idempotent_retry_racing_its_original(fb: Feedback) -> None:
    """On both databases: the original and its retry (same key) sent at once both get 200, one of
    them with duplicate=True, one annotation stored (PostgreSQL used to answer 409)."""
    fb.create_project("p", "pairwise", overlap=1)
    fb.import_records("p", [{"prompt": f"q{i}", "responses": ["a", "b"]} for i in range(30)])
    fb.add_user("ann")
    for trial in range(30):
        a = fb.next_assignment("ann", "p")
        barrier = threading.Barrier(2)
        results: list = []

        def send(a=a, barrier=barrier, results=results, trial=trial) -> None:  # type: ignore[no-untyped-def]
            barrier.wait()
            try:
                results.append(fb.submit("ann", "p", a.record_id, choice="A", key=f"k{trial}"))
            except Exception as exc:  # a refusal is the bug this test is about
                results.append(exc)

        threads = [threading.Thread(target=send) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(not isinstance(r, Exception) for r in results), results
        assert sorted(r.duplicate for r in results) == [False, True]
        assert results[0].annotation_id == results[1].annotation_id
    assert len(fb.annotations("p")) == 30


def counts(fb: Feedback) -> dict[str, int]:
    with fb.store.read() as s:
        return {
            t.__name__: s.scalar(select(func.count()).select_from(t)) or 0
            for t in (Lease, Annotation, Skip, Membership, User, AuthSession)
        }


def test_get_never_changes_state(tmp_path, hasher) -> None:  # type: ignore[no-untyped-def]
    fb = seeded(f"sqlite:///{tmp_path / 'heed.db'}", hasher)
    app = create_app(fb)
    fills = {"project": "p", "annotation_id": "1", "name": "ann"}
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for name in ("ann", "boss"):
            token = client.post(
                "/api/login", json={"name": name, "password": PASSWORDS[name], "bearer": True}
            )
            h = {"Authorization": f"Bearer {token.json()['token']}"}
            before = counts(fb)
            for route in app.routes:
                if "GET" not in getattr(route, "methods", ()) or route.path.startswith("/static"):
                    continue
                path = route.path.format(**{k: fills[k] for k in fills if "{" + k + "}" in route.path})
                assert client.get(path, headers=h).status_code < 500, path
            # the classic one: an <img src=".../next"> can no longer take a record for its victim
            assert client.get("/api/projects/p/next", headers=h).status_code == 405
            assert counts(fb) == before
    fb.close()


def test_openapi_schema_is_true_to_the_api(tmp_path, hasher) -> None:  # type: ignore[no-untyped-def]
    fb = seeded(f"sqlite:///{tmp_path / 'heed.db'}", hasher)
    with TestClient(create_app(fb), base_url="http://127.0.0.1") as client:
        spec = client.get("/openapi.json").json()
        schemas = spec["components"]["schemas"]
        assert "HTTPValidationError" not in schemas
        assert schemas["ErrorOut"]["properties"]["detail"]["type"] == "string"
        submit = spec["paths"]["/api/projects/{project}/annotations"]["post"]
        ref = submit["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == "#/components/schemas/ErrorOut"
        # ... and a real 422 has a string detail naming the field
        token = client.post("/api/login", json={"name": "ann", "password": PASSWORDS["ann"], "bearer": True})
        h = {"Authorization": f"Bearer {token.json()['token']}"}
        r = client.post(
            "/api/projects/p/annotations", headers=h, json={"record_id": "x", "idempotency_key": "k"}
        )
        assert (
            r.status_code == 422 and isinstance(r.json()["detail"], str) and "record_id" in r.json()["detail"]
        )
        schemes = spec["components"]["securitySchemes"]
        assert schemes["cookie"] == {
            **schemes["cookie"],
            "type": "apiKey",
            "in": "cookie",
            "name": "heed_session",
        }
        assert schemes["csrf"] == {
            **schemes["csrf"],
            "type": "apiKey",
            "in": "header",
            "name": "X-CSRF-Token",
        }
        assert schemes["bearer"]["scheme"] == "bearer"
        assert submit["security"] == [{"cookie": [], "csrf": []}, {"bearer": []}]
        assert spec["paths"]["/api/projects"]["get"]["security"] == [{"cookie": []}, {"bearer": []}]
        assert "security" not in spec["paths"]["/api/login"]["post"]
        assert "get" not in spec["paths"]["/api/projects/{project}/next"]
        # /docs is a local page (no CDN) that the CSP allows: its only scripts are our own files
        page = client.get("/docs")
        assert page.status_code == 200 and "cdn" not in page.text.lower()
        assert '<script src="/static/docs.js"' in page.text and "<script>" not in page.text
        assert client.get("/static/docs.js").status_code == 200
    fb.close()


def test_annotators_see_only_their_projects(tmp_path, hasher) -> None:  # type: ignore[no-untyped-def]
    fb = seeded(f"sqlite:///{tmp_path / 'heed.db'}", hasher)
    fb.create_project("secret", "pairwise")
    fb.import_records("secret", [{"prompt": "q", "responses": ["a", "b"]}])
    with TestClient(create_app(fb), base_url="http://127.0.0.1") as client:
        for name, seen in (("ann", ["p"]), ("boss", ["p", "secret"])):
            token = client.post(
                "/api/login", json={"name": name, "password": PASSWORDS[name], "bearer": True}
            )
            h = {"Authorization": f"Bearer {token.json()['token']}"}
            assert [p["name"] for p in client.get("/api/projects", headers=h).json()] == seen
        h = {"Authorization": f"Bearer {fb.open_session('ann', kind='bearer')[0]}"}
        # not a member: the project does not exist as far as the annotator can tell
        for method, path in (
            ("GET", "/api/projects/secret"),
            ("POST", "/api/projects/secret/next"),
            ("GET", "/api/projects/secret/progress"),
            ("GET", "/api/projects/secret/history"),
        ):
            r = client.request(method, path, headers=h)
            assert r.status_code == 404 and r.json()["detail"] == "project 'secret' not found", path
        fb.add_member("secret", "ann")
        assert client.post("/api/projects/secret/next", headers=h).json()["done"] is False
        fb.remove_member("secret", "ann")  # and the pending record goes back
        assert client.post("/api/projects/secret/next", headers=h).status_code == 404
        with fb.store.read() as s:
            assert s.scalar(select(func.count()).select_from(Lease)) == 0
    fb.close()


def test_parquet_export_of_mixed_chat_and_text_prompts(tmp_path, hasher) -> None:  # type: ignore[no-untyped-def]
    import io

    import pyarrow.parquet as pq

    fb = seeded(f"sqlite:///{tmp_path / 'heed.db'}", hasher)
    fb.create_project("mix", "pairwise")
    chat = [{"role": "user", "content": "你好"}]
    fb.import_records(
        "mix", [{"prompt": "plain", "responses": ["a", "b"]}, {"prompt": chat, "responses": ["c", "d"]}]
    )
    while (a := fb.next_assignment("boss", "mix")) is not None:
        fb.submit("boss", "mix", a.record_id, choice=a.display_choice(0), key=str(a.record_id))
    with TestClient(create_app(fb), base_url="http://127.0.0.1") as client:
        h = {"Authorization": f"Bearer {fb.open_session('boss', kind='bearer')[0]}"}
        for fmt in ("pairs", "ranked"):
            r = client.get(f"/api/admin/projects/mix/export?format={fmt}&file=parquet", headers=h)
            assert r.status_code == 200 and r.content[:4] == b"PAR1", r.text[:200]
            rows = pq.read_table(io.BytesIO(r.content)).to_pylist()
            # the text prompt became one user message, so the column has one type
            assert [row["prompt"] for row in rows] == [[{"role": "user", "content": "plain"}], chat]
        pairs = pq.read_table(
            io.BytesIO(client.get("/api/admin/projects/mix/export?file=parquet", headers=h).content)
        )
        assert pairs.to_pylist()[0]["chosen"] == [{"role": "assistant", "content": "a"}]
    # the CLI/service file export does the same for Parquet, and leaves JSONL as it was
    path, n = fb.export_file("mix", "pairs", tmp_path / "mix.parquet")
    assert n == 2 and pq.read_table(path).num_rows == 2
    assert fb.export("mix", "pairs")[0]["prompt"] == "plain"
    fb.close()

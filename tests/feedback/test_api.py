"""The JSON API and pages: sessions, CSRF, roles, rate limiting, and bad input rejected with a 4xx."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from heed.feedback.api import create_app
from heed.feedback.service import Feedback

XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


@pytest.fixture
def env(db_url: str, hasher):  # type: ignore[no-untyped-def]
    fb = Feedback(db_url, hasher=hasher, seed=0)
    # passwords of their own: a one-time password would have to be changed first (test_accounts.py)
    _, admin_pw = fb.add_user("boss", "admin", password="boss-password-1")
    _, ann_pw = fb.add_user("ann", "annotator", password="ann-password-1")
    fb.create_project("p", "pairwise", overlap=1, guidelines="# Be *fair*\n<script>alert(1)</script>")
    fb.add_member("p", "ann")
    fb.import_records(
        "p", [{"prompt": XSS + " ' OR 1=1; --", "responses": [XSS, "```py\nprint(1)\n```"]}] * 3
    )
    app = create_app(fb, login_limit=5)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client, fb, admin_pw, ann_pw
    fb.close()


def login(client: TestClient, name: str, password: str) -> str:
    r = client.post("/api/login", json={"name": name, "password": password})
    assert r.status_code == 200, r.text
    return r.json()["csrf_token"]


def test_routes_need_a_session(env) -> None:  # type: ignore[no-untyped-def]
    client, *_ = env
    assert client.get("/health").json() == {"status": "ok"}
    for path in ("/api/projects", "/api/admin/projects/p/stats", "/api/me"):
        assert client.get(path).status_code == 401, path
    assert client.post("/api/projects/p/next").status_code == 401  # leasing a record is a POST
    assert client.post("/api/projects/p/annotations", json={}).status_code in (401, 422)
    r = client.get("/admin", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/login").status_code == 200


def test_cookie_flags_csrf_and_forged_tokens(env) -> None:  # type: ignore[no-untyped-def]
    client, _, _, ann_pw = env
    r = client.post("/api/login", json={"name": "ann", "password": ann_pw})
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    csrf = r.json()["csrf_token"]
    assert client.post("/api/projects/p/next").status_code == 403  # no CSRF header
    item = client.post("/api/projects/p/next", headers={"X-CSRF-Token": csrf}).json()
    body = {"record_id": item["record_id"], "idempotency_key": "k1", "choice": "A"}
    assert client.post("/api/projects/p/annotations", json=body).status_code == 403  # no CSRF header
    r = client.post("/api/projects/p/annotations", json=body, headers={"X-CSRF-Token": "forged"})
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    r = client.post("/api/projects/p/annotations", json=body, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["duplicate"] is False
    # a forged session cookie or bearer token gets nothing
    client.cookies.clear()
    client.cookies.set("heed_session", "forged")
    assert client.get("/api/projects").status_code == 401
    client.cookies.clear()
    assert client.get("/api/projects", headers={"Authorization": "Bearer forged"}).status_code == 401


def test_bearer_tokens_skip_csrf(env) -> None:  # type: ignore[no-untyped-def]
    client, _, _, ann_pw = env
    token = client.post("/api/login", json={"name": "ann", "password": ann_pw, "bearer": True}).json()[
        "token"
    ]
    client.cookies.clear()
    h = {"Authorization": f"Bearer {token}"}
    item = client.post("/api/projects/p/next", headers=h).json()
    r = client.post(
        "/api/projects/p/annotations",
        headers=h,
        json={"record_id": item["record_id"], "idempotency_key": "k", "choice": "tie"},
    )
    assert r.status_code == 200
    again = client.post(
        "/api/projects/p/annotations",
        headers=h,
        json={"record_id": item["record_id"], "idempotency_key": "k", "choice": "tie"},
    )
    assert again.json() == {**r.json(), "duplicate": True}
    assert client.get("/api/projects/p/progress", headers=h).json()["done"] == 1


def test_annotators_cannot_reach_admin(env) -> None:  # type: ignore[no-untyped-def]
    client, _, _, ann_pw = env
    csrf = login(client, "ann", ann_pw)
    for path in (
        "/api/admin/projects/p/stats",
        "/api/admin/projects/p/annotations",
        "/api/admin/users",
        "/api/admin/projects/p/export",
        "/api/admin/projects/p/disagreements",
    ):
        assert client.get(path).status_code == 403, path
    assert client.get("/admin").status_code == 403
    r = client.post(
        "/api/admin/users", json={"name": "evil", "role": "admin"}, headers={"X-CSRF-Token": csrf}
    )
    assert r.status_code == 403


def test_login_rate_limit(env) -> None:  # type: ignore[no-untyped-def]
    client, _, _, ann_pw = env
    codes = [
        client.post("/api/login", json={"name": "ann", "password": "nope"}).status_code for _ in range(6)
    ]
    assert codes == [401] * 5 + [429]
    r = client.post("/api/login", json={"name": "ann", "password": ann_pw})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0  # even the right password waits


def test_bad_input_is_rejected_cleanly(env) -> None:  # type: ignore[no-untyped-def]
    client, fb, admin_pw, _ = env
    csrf = login(client, "boss", admin_pw)
    h = {"X-CSRF-Token": csrf, "Content-Type": "application/json"}
    r = client.post("/api/admin/projects", content=b'{"name": "x", "task": ', headers=h)
    assert r.status_code == 400 and "malformed JSON" in r.json()["detail"]
    r = client.post(
        "/api/admin/projects", json={"name": "x", "task": "pairwise", "overlap": "many"}, headers=h
    )
    assert r.status_code == 422 and "overlap" in r.json()["detail"]
    r = client.post(
        "/api/admin/projects", json={"name": "x; DROP TABLE heed_users; --", "task": "pairwise"}, headers=h
    )
    assert r.status_code == 422 and "name" in r.json()["detail"]
    r = client.post("/api/admin/projects", json={"name": "x", "task": "pairwise", "extra": 1}, headers=h)
    assert r.status_code == 422
    assert client.get("/api/projects/nope").status_code == 404
    assert client.get("/api/projects/%27%20OR%201%3D1").status_code == 422
    big = json.dumps({"name": "x", "task": "pairwise", "guidelines": "a" * (2 << 20)})
    r = client.post("/api/admin/projects", content=big, headers=h)
    assert r.status_code == 413
    r = client.post(
        "/api/admin/projects/p/records",
        headers=h,
        json={"records": [{"prompt": "q", "responses": ["only one"]}]},
    )
    assert r.status_code == 422 and "record 0: responses" in r.json()["detail"]
    # a lone surrogate (valid JSON escape, not Unicode text) cannot round-trip: refused
    r = client.post(
        "/api/admin/projects/p/records",
        headers=h,
        content=b'{"records": [{"prompt": "q", "responses": ["a", "b"], "meta": "\\ud800"}]}',
    )
    assert r.status_code == 422 and "surrogate" in r.json()["detail"]
    r = client.post(
        "/api/projects/p/annotations",
        headers=h,
        json={"record_id": 1, "idempotency_key": "k", "choice": "A", "rationale": "nul\x00"},
    )
    assert r.status_code in (409, 422)
    r = client.post(
        "/api/projects/p/annotations", headers=h, json={"record_id": 2**40, "idempotency_key": "k"}
    )
    assert r.status_code == 422
    # nothing above changed the database
    assert [p.name for p in fb.projects()] == ["p"] and fb.project("p").num_records == 3


def test_untrusted_text_is_inert(env) -> None:  # type: ignore[no-untyped-def]
    client, _, _, ann_pw = env
    csrf = login(client, "ann", ann_pw)
    page = client.get("/annotate/p")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "<script>window" not in page.text  # records reach the page only as JSON, set with textContent
    project = client.get("/api/projects/p").json()
    assert (
        "<script>" not in project["guidelines_html"]
        and "<h1>Be <em>fair</em></h1>" in project["guidelines_html"]
    )
    item = client.post("/api/projects/p/next", headers={"X-CSRF-Token": csrf}).json()
    assert item["prompt"].startswith(
        XSS
    )  # stored and returned verbatim; the browser test shows it stays inert
    js = client.get("/static/heed.js").text
    assert "innerHTML = state.project.guidelines_html" in js and js.count("innerHTML =") == 1


def test_admin_flow_over_http(env) -> None:  # type: ignore[no-untyped-def]
    client, _, admin_pw, _ = env
    h = {"X-CSRF-Token": login(client, "boss", admin_pw)}
    r = client.post("/api/admin/projects", headers=h, json={"name": "rank1", "task": "ranking", "overlap": 1})
    assert r.status_code == 201
    r = client.post(
        "/api/admin/projects/rank1/records",
        headers=h,
        json={"records": [{"prompt": "中文？", "responses": ["甲", "乙", "丙"]}]},
    )
    assert r.json() == {"count": 1}
    item = client.post("/api/projects/rank1/next", headers=h).json()
    texts = [x["text"] for x in item["responses"]]
    wanted = {"甲": 1, "乙": 2, "丙": 2}
    r = client.post(
        "/api/projects/rank1/annotations",
        headers=h,
        json={"record_id": item["record_id"], "idempotency_key": "x", "ranks": [wanted[t] for t in texts]},
    )
    assert r.status_code == 200
    r = client.get("/api/admin/projects/rank1/export?format=ranked&file=jsonl")
    assert r.headers["content-type"].startswith("application/x-ndjson")
    row = json.loads(r.content.decode("utf-8"))
    assert (row["prompt"], row["responses"], row["ranks"]) == ("中文？", ["甲", "乙", "丙"], [1, 2, 2])
    assert client.get("/api/admin/projects/rank1/export?format=pairs&file=parquet").content[:4] == b"PAR1"
    stats = client.get("/api/admin/projects/rank1/stats").json()
    assert stats["progress"]["annotations"] == 1 and stats["agreement"]["mean_kendall_tau"] is None
    assert client.post("/api/projects/rank1/undo", headers=h).json() == {"record_id": item["record_id"]}
    r = client.post("/api/admin/users", headers=h, json={"name": "new1", "role": "annotator"})
    assert r.status_code == 201 and len(r.json()["password"]) >= 12
    assert client.post("/api/logout", headers=h).status_code == 200
    assert client.get("/api/me").status_code == 401

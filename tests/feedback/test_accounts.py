"""Accounts: one-time passwords changed by their owner, disabled users, names that ignore case (and
the migration of a database that has two names differing only in case), project membership, and
skip / history / edit over HTTP."""

from __future__ import annotations

import sqlite3

import pytest
from fastapi.testclient import TestClient

from heed.cli import main
from heed.errors import ConfigError
from heed.feedback.api import create_app
from heed.feedback.service import ConflictError, Feedback


@pytest.fixture
def app_env(db_url: str, hasher):  # type: ignore[no-untyped-def]
    fb = Feedback(db_url, hasher=hasher, seed=0)
    fb.add_user("boss", "admin", password="boss-password-1")
    fb.create_project("p", "pairwise", overlap=1)
    fb.import_records("p", [{"prompt": f"q{i}", "responses": [f"a{i}", f"b{i}"]} for i in range(3)])
    with TestClient(create_app(fb), base_url="http://127.0.0.1") as client:
        yield client, fb
    fb.close()


def bearer(client: TestClient, name: str, password: str) -> dict[str, str]:
    r = client.post("/api/login", json={"name": name, "password": password, "bearer": True})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def test_one_time_password_must_be_changed_first(app_env) -> None:  # type: ignore[no-untyped-def]
    client, fb = app_env
    _, otp = fb.add_user("ann")
    fb.add_member("p", "ann")
    r = client.post("/api/login", json={"name": "ann", "password": otp})
    assert r.status_code == 200 and r.json()["must_change_password"] is True
    h = {"X-CSRF-Token": r.json()["csrf_token"]}
    other = bearer(client, "ann", otp)  # a second session, ended by the change
    # until the change, nothing but /api/me, the change itself and logout
    r = client.get("/api/projects")
    assert r.status_code == 403 and r.json()["detail"].startswith("change your one-time password first")
    assert client.get("/api/me").json()["must_change_password"] is True
    assert client.get("/", follow_redirects=False).headers["location"] == "/account"
    r = client.post(
        "/api/me/password", headers=h, json={"current_password": "wrong", "new_password": "x" * 12}
    )
    assert r.status_code == 403 and "current_password" in r.json()["detail"]
    r = client.post("/api/me/password", headers=h, json={"current_password": otp, "new_password": "short"})
    assert r.status_code == 422 and "new_password" in r.json()["detail"]
    r = client.post("/api/me/password", headers=h, json={"current_password": otp, "new_password": otp})
    assert r.status_code == 422 and "differ" in r.json()["detail"]
    r = client.post(
        "/api/me/password", headers=h, json={"current_password": otp, "new_password": "my own secret"}
    )
    assert r.status_code == 200
    assert [p["name"] for p in client.get("/api/projects").json()] == ["p"]  # this session goes on
    assert client.get("/api/projects", headers=other).status_code == 401  # the other one ended
    assert client.post("/api/login", json={"name": "ann", "password": otp}).status_code == 401
    assert fb.user("ann").must_change_password is False
    # an admin reset gives a new one-time password, to be changed again
    fb.set_password("ann")
    assert fb.user("ann").must_change_password is True


def test_disabled_users_cannot_log_in(app_env) -> None:  # type: ignore[no-untyped-def]
    client, fb = app_env
    fb.add_user("ann", password="ann-password-1")
    fb.add_member("p", "ann")
    ann = bearer(client, "ann", "ann-password-1")
    assert client.post("/api/projects/p/next", headers=ann).json()["done"] is False
    boss = bearer(client, "boss", "boss-password-1")
    r = client.post("/api/admin/users/ann/disable", headers=boss)
    assert r.status_code == 200 and r.json()["active"] is False
    assert client.get("/api/projects", headers=ann).status_code == 401  # session ended
    assert client.post("/api/login", json={"name": "ann", "password": "ann-password-1"}).status_code == 401
    # the record ann held is free again for others
    assert fb.progress("p")["total"] == 3 and fb.next_assignment("boss", "p").record_id == 1
    assert [u["active"] for u in client.get("/api/admin/users", headers=boss).json()] == [True, False]
    # an admin cannot disable themselves, nor the last active admin be disabled
    assert client.post("/api/admin/users/boss/disable", headers=boss).status_code == 409
    with pytest.raises(ConflictError, match="last active admin"):
        fb.set_active("boss", False)
    assert client.post("/api/admin/users/ANN/enable", headers=boss).json()["active"] is True
    assert client.post("/api/login", json={"name": "ann", "password": "ann-password-1"}).status_code == 200


def test_names_ignore_case(app_env) -> None:  # type: ignore[no-untyped-def]
    client, fb = app_env
    fb.add_user("ann1", password="ann-password-1")
    with pytest.raises(ConflictError, match="names ignore case"):
        fb.add_user("ANN1")
    boss = bearer(client, "boss", "boss-password-1")
    r = client.post("/api/admin/users", headers=boss, json={"name": "Ann1"})
    assert r.status_code == 409
    r = client.post("/api/login", json={"name": "ANN1", "password": "ann-password-1"})
    assert r.status_code == 200 and r.json()["user"] == "ann1"  # one user, stored spelling
    assert fb.user("aNn1").name == "ann1"


def old_database(path) -> None:  # type: ignore[no-untyped-def]
    """Turn a fresh database into one made by the Heed before these changes: no case-insensitive index,
    no must_change_password column, no memberships; then add a name that differs only in case."""
    con = sqlite3.connect(path)
    con.executescript(
        "DROP INDEX uq_heed_users_name_lower; DROP TABLE heed_memberships;"
        "ALTER TABLE heed_users DROP COLUMN must_change_password;"
        "INSERT INTO heed_users (name, role, password_hash, active, created_at) "
        "SELECT 'ANN1', role, password_hash, 1, created_at FROM heed_users WHERE name = 'ann1';"
    )
    con.commit()
    con.close()


def test_migration_refuses_case_clashes_until_renamed(tmp_path, hasher, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "old.db"
    fb = Feedback(f"sqlite:///{path}", hasher=hasher)
    fb.add_user("ann1", password="ann-password-1")
    fb.create_project("p", "pairwise")
    fb.close()
    old_database(path)
    with pytest.raises(ConfigError, match="ann1 and ANN1 differ only in case"):
        Feedback(f"sqlite:///{path}", hasher=hasher)
    main(["annotate", "user", "rename", "ANN1", "ann1-old", "--db", str(path)])
    assert "renamed to ann1-old" in capsys.readouterr().out
    fb = Feedback(f"sqlite:///{path}", hasher=hasher)
    assert sorted(u.name for u in fb.users()) == ["ann1", "ann1-old"]
    # existing annotators keep the projects they could open before memberships existed
    assert fb.members("p") == ["ann1", "ann1-old"]
    assert fb.user("ann1").must_change_password is False
    with pytest.raises(ConflictError):
        fb.add_user("ANN1-OLD")
    fb.close()


def test_cli_accounts_and_members(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    db = str(tmp_path / "a.db")

    def run(*args: str) -> str:
        main(list(args))
        return capsys.readouterr().out

    run("annotate", "project", "create", "p", "--db", db)
    run("annotate", "project", "create", "q", "--db", db)
    assert run("annotate", "user", "add", "ann", "--project", "p", "--db", db).startswith(
        "user ann (annotator)"
    )
    assert run("annotate", "project", "members", "p", "--db", db).split() == ["ann"]
    assert "q members: ann" in run("annotate", "project", "add-member", "q", "ANN", "--db", db)
    assert "(none)" in run("annotate", "project", "remove-member", "q", "ann", "--db", db)
    assert "user ann disabled" in run("annotate", "user", "disable", "ann", "--db", db)
    assert (
        run("annotate", "user", "list", "--db", db).split("\t")[2].startswith("disabled, one-time password")
    )
    assert "user ann enabled" in run("annotate", "user", "enable", "ann", "--db", db)
    with pytest.raises(SystemExit) as exc:
        main(["annotate", "user", "add", "x", "--project", "nope", "--db", db])
    assert exc.value.code == 2 and "project 'nope' not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["annotate", "user", "add", "ANN", "--db", db])
    assert "already exists (names ignore case)" in capsys.readouterr().err


def test_skip_history_and_edit_over_http(app_env) -> None:  # type: ignore[no-untyped-def]
    client, fb = app_env
    fb.add_user("ann", password="ann-password-1")
    fb.add_user("bob", password="bob-password-1")
    for u in ("ann", "bob"):
        fb.add_member("p", u)
    ann = bearer(client, "ann", "ann-password-1")
    first = client.post("/api/projects/p/next", headers=ann).json()
    # skip: no vote, the slot goes back (bob gets the record at once), never offered to ann again
    r = client.post("/api/projects/p/skip", headers=ann, json={"record_id": first["record_id"]})
    assert r.json() == {"record_id": first["record_id"], "skipped": True}
    assert (
        client.post("/api/projects/p/skip", headers=ann, json={"record_id": first["record_id"]}).json()[
            "skipped"
        ]
        is False
    )  # a retry
    assert fb.annotations("p") == []
    assert fb.next_assignment("bob", "p").record_id == first["record_id"]
    seen = []
    while not (item := client.post("/api/projects/p/next", headers=ann).json())["done"]:
        seen.append(item["record_id"])
        body = {"record_id": item["record_id"], "idempotency_key": f"k{item['record_id']}", "choice": "A"}
        assert client.post("/api/projects/p/annotations", headers=ann, json=body).status_code == 200
    assert first["record_id"] not in seen and len(seen) == 2
    progress = client.get("/api/projects/p/progress", headers=ann).json()
    assert (progress["done"], progress["skipped"], progress["available"]) == (2, 1, 0)
    # history: newest first, in display terms; edit the older one (not just the last) to B
    hist = client.get("/api/projects/p/history", headers=ann).json()
    assert [h["record_id"] for h in hist] == seen[::-1] and all(h["choice"] == "A" for h in hist)
    old = hist[-1]
    past = client.get(f"/api/projects/p/annotations/{old['annotation_id']}", headers=ann).json()
    r = client.put(
        f"/api/projects/p/annotations/{old['annotation_id']}",
        headers=ann,
        json={"choice": "B", "rationale": "on reflection"},
    )
    assert r.status_code == 200
    stored = {a["annotation_id"]: a for a in fb.annotations("p")}[old["annotation_id"]]
    # B = the response shown second to ann: its stored index is the winner
    shown_second = past["responses"][1]["text"]
    assert fb.record("p", old["record_id"])["responses"][int(stored["label"])] == shown_second
    assert stored["rationale"] == "on reflection" and len(fb.annotations("p")) == 2
    assert client.get("/api/projects/p/history", headers=ann).json()[-1]["choice"] == "B"
    # another annotator's label is not yours to read or change
    bob = bearer(client, "bob", "bob-password-1")
    assert client.get(f"/api/projects/p/annotations/{old['annotation_id']}", headers=bob).status_code == 404
    r = client.put(f"/api/projects/p/annotations/{old['annotation_id']}", headers=bob, json={"choice": "A"})
    assert r.status_code == 404

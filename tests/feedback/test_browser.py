"""The pages in a real browser (Debian's chromium through Playwright): log in, label pairwise and
ranking records with the keyboard only, watch progress, undo, switch language, and export as an
admin: the downloaded file holds exactly what was chosen."""

from __future__ import annotations

import json
import threading
import time

import pytest

from heed.feedback.loadtest import free_port
from heed.feedback.service import Feedback

XSS = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


@pytest.fixture
def server(tmp_path, hasher):  # type: ignore[no-untyped-def]
    import uvicorn

    from heed.feedback.api import create_app

    fb = Feedback(f"sqlite:///{tmp_path / 'heed.db'}", hasher=hasher, seed=1)
    passwords = {"boss": "boss-password-1", "ann": "ann-password-1"}
    for name, role in (("boss", "admin"), ("ann", "annotator")):
        fb.add_user(name, role, password=passwords[name])  # not one-time: no password change first
    fb.create_project(
        "pw", "pairwise", overlap=1, guidelines="Pick the **good** answer.\n\n<script>bad()</script>"
    )
    fb.import_records(
        "pw",
        [
            {
                "prompt": f"{XSS} question {i} 你好",
                "responses": [f"good {i}\n```python\nprint('{i}')\n```", f"bad {i} {XSS}"],
                "id": f"pw{i}",
            }
            for i in range(3)
        ],
    )
    fb.create_project("rk", "ranking", overlap=1)
    for project in ("pw", "rk"):
        fb.add_member(project, "ann")
    fb.import_records(
        "rk",
        [{"prompt": f"rank me {i}", "responses": [f"worst {i}", f"best {i}", f"mid {i}"]} for i in range(2)],
    )
    config = uvicorn.Config(create_app(fb), host="127.0.0.1", port=free_port(), log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{config.port}", passwords, fb
    srv.should_exit = True
    thread.join(10)
    fb.close()


def settled(page) -> None:  # type: ignore[no-untyped-def]
    """Wait until the page has finished its last submission / undo and shows the next record."""
    page.wait_for_selector('body[data-busy="0"]')


def ident(text: str) -> str:
    """'good 2 ...' -> 'good 2': which response it is, independent of how it is rendered."""
    return " ".join(text.split()[:2])


def keyboard_login(page, base: str, name: str, password: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{base}/login")
    page.locator("#login-name").focus()
    page.keyboard.type(name)
    page.keyboard.press("Tab")
    page.keyboard.type(password)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{base}/")


def test_keyboard_labelling_and_admin_export(server, browser, tmp_path) -> None:  # type: ignore[no-untyped-def]
    expect = sync_api.expect
    base, passwords, fb = server
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    keyboard_login(page, base, "ann", passwords["ann"])
    expect(page.locator("#project-pw")).to_be_visible()

    # ---- pairwise: 1 / 2 picks, Enter submits; the good answer wins except where we undo and flip
    page.goto(f"{base}/annotate/pw")
    expect(page.locator("#p-total")).to_have_text("3")
    expect(page.locator("#guidelines-body strong")).to_have_text("good")
    chosen: dict[str, str] = {}
    for n in range(3):
        settled(page)
        expect(page.locator("#p-done")).to_have_text(str(n))
        prompt = page.locator("#prompt").inner_text()
        assert XSS in prompt  # shown as text, not markup
        shown = [ident(page.locator(f"#response-{i} .body").inner_text()) for i in range(2)]
        key = "1" if shown[0].startswith("good") else "2"
        assert page.locator("#response-0 pre code, #response-1 pre code").count() == 1  # code block kept
        page.keyboard.press(key)
        page.keyboard.press("Enter")
        chosen[prompt] = shown[int(key) - 1]
        if n == 1:  # undo the second one, then pick the other answer instead
            settled(page)
            expect(page.locator("#p-done")).to_have_text("2")
            page.keyboard.press("u")
            settled(page)
            expect(page.locator("#p-done")).to_have_text("1")
            expect(page.locator("#prompt")).to_have_text(prompt)
            other = "2" if key == "1" else "1"
            chosen[prompt] = ident(page.locator(f"#response-{int(other) - 1} .body").inner_text())
            page.keyboard.press(other)
            page.keyboard.press("Enter")
    expect(page.locator("#all-done")).to_be_visible()
    expect(page.locator("#p-done")).to_have_text("3")
    assert page.evaluate("window.__pwned") is None and dialogs == []

    # ---- ranking: number keys best first; in record 2 the two others tie ("=")
    page.goto(f"{base}/annotate/rk")
    expect(page.locator("#p-total")).to_have_text("2")
    ranked: dict[str, dict[str, int]] = {}
    for n in range(2):
        settled(page)
        expect(page.locator("#p-done")).to_have_text(str(n))
        prompt = page.locator("#prompt").inner_text()
        texts = [page.locator(f"#response-{i} .body").inner_text() for i in range(3)]
        pos = {t.split()[0]: i + 1 for i, t in enumerate(texts)}
        if n == 0:
            keys = [str(pos["best"]), str(pos["mid"]), str(pos["worst"])]
            ranked[prompt] = {"best": 1, "mid": 2, "worst": 3}
        else:
            keys = [str(pos["best"]), str(pos["mid"]), "=", str(pos["worst"])]
            ranked[prompt] = {"best": 1, "mid": 2, "worst": 2}
        for k in keys:
            page.keyboard.press(k)
        expect(page.locator("#ranking li")).to_have_count(3)
        page.keyboard.press("Enter")
    expect(page.locator("#all-done")).to_be_visible()

    # ---- language switch: Chinese interface, then back
    page.goto(f"{base}/annotate/rk?lang=zh")
    expect(page.locator("#all-done")).to_contain_text("谢谢")
    page.goto(f"{base}/?lang=en")

    # ---- an annotator cannot open the admin page
    assert page.goto(f"{base}/admin").status == 403

    # ---- admin: log in, see progress and export; the files equal what was chosen above
    admin = browser.new_page()
    keyboard_login(admin, base, "boss", passwords["boss"])
    admin.goto(f"{base}/admin")
    admin.locator("#admin-project").select_option("pw")
    expect(admin.locator("#admin-progress")).to_contain_text("3 / 3")
    with admin.expect_download() as dl:
        admin.locator("#export-pairs").click()
    path = tmp_path / "pairs.jsonl"
    dl.value.save_as(path)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert {r["prompt"]: ident(r["chosen"]) for r in rows} == chosen
    assert sum(c.startswith("bad") for c in chosen.values()) == 1  # the flipped one
    assert all(r["weight"] == 1.0 and r["chosen"] != r["rejected"] for r in rows)

    admin.locator("#admin-project").select_option("rk")
    expect(admin.locator("#admin-progress")).to_contain_text("2 / 2")
    with admin.expect_download() as dl:
        admin.locator("#export-ranked").click()
    dl.value.save_as(tmp_path / "ranked.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "ranked.jsonl").read_text(encoding="utf-8").splitlines()]
    got = {
        r["prompt"]: {resp.split()[0]: rank for resp, rank in zip(r["responses"], r["ranks"], strict=True)}
        for r in rows
    }
    assert got == ranked
    # the CLI/service export is the same file
    assert [
        json.loads(x) for x in (tmp_path / "ranked.jsonl").read_text(encoding="utf-8").splitlines()
    ] == fb.export("rk", "ranked")

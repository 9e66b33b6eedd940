"""The pages in chromium, as a new user (and a careless one) meets them: no script errors, the right
buttons, Markdown shown as Markdown, long answers scrolling in place, no dead ends (expired lease,
a second tab, an expired session, undo after the last record), skip, revisiting past labels, the
admin page readable, the one-time password changed, and /docs working under the CSP."""

from __future__ import annotations

import re
import threading
import time

import pytest
from sqlalchemy import delete, update

from heed.feedback.loadtest import free_port
from heed.feedback.service import Feedback
from heed.feedback.store import AuthSession, Lease, utcnow

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
expect = sync_api.expect

PASSWORDS = {"boss": "boss-password-1", "ann": "ann-password-1", "bob": "bob-password-1"}
MARKDOWN = "Steps:\n1. **mix** the `flour`\n2. bake\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- one\n- two"
LONG = "\n".join(f"line {i} of a very long answer" for i in range(400))


@pytest.fixture
def site(tmp_path, hasher):  # type: ignore[no-untyped-def]
    import uvicorn

    from heed.feedback.api import create_app

    fb = Feedback(f"sqlite:///{tmp_path / 'heed.db'}", hasher=hasher, seed=3)
    for name in PASSWORDS:
        fb.add_user(name, "admin" if name == "boss" else "annotator", password=PASSWORDS[name])
    fb.create_project("pw", "pairwise", overlap=1, rationale="optional")
    fb.import_records(
        "pw",
        [
            {"prompt": "**md** question", "responses": [MARKDOWN, "plain"]},
            {"prompt": "long one", "responses": [LONG, "short"]},
            {"prompt": [{"role": "user", "content": "chat prompt"}], "responses": ["x", "y"]},
        ],
    )
    fb.create_project("rk", "ranking", overlap=1)
    fb.import_records("rk", [{"prompt": "rank", "responses": ["r1", "r2", "r3"]}])
    for project in ("pw", "rk"):
        for name in ("ann", "bob"):
            fb.add_member(project, name)
    config = uvicorn.Config(create_app(fb), host="127.0.0.1", port=free_port(), log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{config.port}", fb
    srv.should_exit = True
    thread.join(10)
    fb.close()


def watched(page):  # type: ignore[no-untyped-def]
    """Collect uncaught script errors and console errors (CSP refusals land there)."""
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    return errors


def login(page, base: str, name: str, password: str | None = None) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{base}/login")
    page.fill("#login-name", name)
    page.fill("#login-password", password or PASSWORDS[name])
    page.press("#login-password", "Enter")
    page.wait_for_url(re.compile(r".*/(account)?$"))


def settled(page) -> None:  # type: ignore[no-untyped-def]
    page.wait_for_selector('body[data-busy="0"]')


def prompt_text(page) -> str:  # type: ignore[no-untyped-def]
    return page.locator("#prompt").inner_text()


def test_no_script_errors_right_buttons_and_docs(site, browser) -> None:  # type: ignore[no-untyped-def]
    base, fb = site
    page = browser.new_page()
    errors = watched(page)
    page.goto(f"{base}/login")  # used to throw a TypeError on every load
    login(page, base, "ann")
    expect(page.locator("#project-pw")).to_be_visible()
    expect(page.locator("#project-rk")).to_be_visible()
    page.goto(f"{base}/annotate/rk")
    settled(page)
    expect(page.locator("#btn-A")).to_be_hidden()  # .buttons{display:flex} no longer beats `hidden`
    expect(page.locator("#btn-rank-discard")).to_be_visible()
    page.goto(f"{base}/annotate/pw")
    settled(page)
    assert page.locator("button:visible", has_text="Discard").count() == 1
    expect(page.locator("#btn-A")).to_be_visible()
    page.goto(f"{base}/docs")
    page.wait_for_selector('body[data-ready="1"]')
    expect(page.locator("#op-post--api-projects-project-next")).to_be_visible()
    expect(page.locator("#docs-security")).to_contain_text("X-CSRF-Token")
    assert errors == []

    # a new user on a one-time password is taken to the account page and cannot skip it
    _, otp = fb.add_user("newbie")
    fb.add_member("pw", "newbie")
    fresh = browser.new_page()
    errors = watched(fresh)
    login(fresh, base, "newbie", otp)
    expect(fresh).to_have_url(f"{base}/account")
    expect(fresh.locator("#must-change")).to_be_visible()
    fresh.goto(f"{base}/annotate/pw")
    expect(fresh).to_have_url(f"{base}/account")
    fresh.fill("#current-password", otp)
    fresh.fill("#new-password", "a new secret 1")
    fresh.fill("#new-password-2", "a new secret 1")
    fresh.click("#password-submit")
    fresh.wait_for_url(f"{base}/")
    expect(fresh.locator("#project-pw")).to_be_visible()
    assert errors == [] and fb.authenticate("newbie", "a new secret 1") is not None


def test_markdown_and_long_answers_scroll_in_place(site, browser) -> None:  # type: ignore[no-untyped-def]
    base, _ = site
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors = watched(page)
    login(page, base, "ann")
    page.goto(f"{base}/annotate/pw")
    settled(page)
    assert prompt_text(page) == "md question"
    expect(page.locator("#prompt strong")).to_have_text("md")
    md = page.locator(".response .body", has=page.locator("table"))
    expect(md.locator("ol li")).to_have_count(2)
    expect(md.locator("ol li strong")).to_have_text("mix")
    expect(md.locator("ol li code")).to_have_text("flour")
    expect(md.locator("ul li")).to_have_count(2)
    assert md.locator("table td").all_inner_texts() == ["1", "2"]
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    settled(page)
    assert prompt_text(page) == "long one"
    height = page.evaluate("document.scrollingElement.scrollHeight")
    assert height <= 1.5 * 800, height  # was 6,600 px
    long_body = page.locator(".response .body", has_text="line 399")
    assert long_body.evaluate("n => n.scrollHeight > n.clientHeight + 1000")  # scrolls in place
    for sel in ("#submit", "#keys-help"):
        box = page.locator(sel).bounding_box()
        assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= 800, sel
    assert errors == []


def test_no_dead_ends(site, browser) -> None:  # type: ignore[no-untyped-def]
    base, fb = site
    context = browser.new_context()
    tab1, tab2 = context.new_page(), context.new_page()
    errors = watched(tab1) + watched(tab2)
    login(tab1, base, "ann")
    for tab in (tab1, tab2):
        tab.goto(f"{base}/annotate/pw")
        settled(tab)
    first = prompt_text(tab1)
    assert prompt_text(tab2) == first  # both tabs show ann's one lease
    tab1.keyboard.press("1")
    tab1.keyboard.press("Enter")
    settled(tab1)
    # the second tab submits the record the first already stored: it moves on, not stuck on a 409
    tab2.keyboard.press("2")
    tab2.keyboard.press("Enter")
    settled(tab2)
    expect(tab2.locator("#toast")).to_contain_text("no longer yours")
    assert prompt_text(tab2) != first and prompt_text(tab2) == prompt_text(tab1)
    # an expired lease whose record someone else then took: one message, then the next record
    current = prompt_text(tab1)
    with fb.store.write() as s:
        s.execute(update(Lease).values(expires_at=utcnow()))
    taken = fb.next_assignment("bob", "pw")
    fb.submit("bob", "pw", taken.record_id, choice="A", key="bob-1")
    tab1.keyboard.press("1")
    tab1.keyboard.press("Enter")
    settled(tab1)
    expect(tab1.locator("#toast")).to_contain_text("no longer yours")
    assert prompt_text(tab1) != current
    # undo stays after the last record
    tab1.keyboard.press("1")
    tab1.keyboard.press("Enter")
    settled(tab1)
    expect(tab1.locator("#all-done")).to_be_visible()
    expect(tab1.locator("#undo")).to_be_visible()
    tab1.keyboard.press("u")
    settled(tab1)
    expect(tab1.locator("#all-done")).to_be_hidden()
    expect(tab1.locator("#item")).to_be_visible()
    # an expired session: the login page, and back to the work after logging in
    with fb.store.write() as s:
        s.execute(delete(AuthSession))
    tab1.keyboard.press("1")
    tab1.keyboard.press("Enter")
    tab1.wait_for_url(re.compile(r".*/login\?next=%2Fannotate%2Fpw$"))
    tab1.fill("#login-name", "ann")
    tab1.fill("#login-password", PASSWORDS["ann"])
    tab1.press("#login-password", "Enter")
    tab1.wait_for_url(f"{base}/annotate/pw")
    assert [e for e in errors if "409" not in e and "401" not in e] == []


def test_skip_and_change_a_past_label(site, browser) -> None:  # type: ignore[no-untyped-def]
    base, fb = site
    page = browser.new_page()
    errors = watched(page)
    login(page, base, "ann")
    page.goto(f"{base}/annotate/pw")
    settled(page)
    skipped = prompt_text(page)
    page.keyboard.press("s")
    settled(page)
    expect(page.locator("#p-skipped")).to_have_text("1")
    assert prompt_text(page) != skipped and fb.annotations("pw") == []
    labelled = []
    for _ in range(2):
        labelled.append(prompt_text(page))
        page.keyboard.press("1")
        page.fill("#rationale", f"because {len(labelled)}")
        page.locator("#rationale").press("Control+Enter")
        settled(page)
    expect(page.locator("#all-done")).to_be_visible()  # the skipped record is not offered again
    assert skipped not in labelled
    # revisit the first (older) label from the history and change it to B
    page.keyboard.press("h")
    expect(page.locator("#history-list li")).to_have_count(2)
    page.locator("#history-list li button").nth(1).click()
    settled(page)
    expect(page.locator("#edit-banner")).to_be_visible()
    assert prompt_text(page) == labelled[0]
    expect(page.locator("#btn-A")).to_have_class(re.compile("selected"))
    assert page.locator("#rationale").input_value() == "because 1"
    shown_b = page.locator("#response-1 .body").inner_text()
    page.keyboard.press("2")
    page.keyboard.press("Enter")
    settled(page)
    expect(page.locator("#edit-banner")).to_be_hidden()
    first = min(fb.annotations("pw"), key=lambda a: a["annotation_id"])
    assert fb.record("pw", first["record_id"])["responses"][int(first["label"])].strip() == shown_b.strip()
    assert len(fb.annotations("pw")) == 2
    # the skipped record is still free for someone else
    assert fb.next_assignment("bob", "pw") is not None
    assert errors == []


def test_admin_page_is_readable(site, browser, tmp_path) -> None:  # type: ignore[no-untyped-def]
    base, fb = site
    for user in ("ann", "bob"):
        while (a := fb.next_assignment(user, "pw")) is not None:
            fb.submit(
                user,
                "pw",
                a.record_id,
                choice=a.display_choice(0),
                key=f"{user}{a.record_id}",
                rationale=f"{user} thinks so",
                duration_ms=386_333,
            )
    page = browser.new_page()
    errors = watched(page)
    login(page, base, "boss")
    page.goto(f"{base}/admin")
    page.locator("#admin-project").select_option("pw")
    expect(page.locator("#admin-progress")).to_contain_text("3 / 3")
    agreement = page.locator("#admin-agreement").inner_text()
    assert "{" not in agreement and "Response 1 preferred: 3" in agreement
    expect(page.locator("#admin-annotators")).to_contain_text("386.3 s")
    expect(page.locator("#admin-rationales")).to_contain_text("ann thinks so")
    expect(page.locator("#member-list")).to_contain_text("ann")
    # the mixed chat/text project exports to Parquet from the page
    with page.expect_download() as dl:
        page.locator("#export-pairs-parquet").click()
    path = tmp_path / "pairs.parquet"
    dl.value.save_as(path)
    assert path.read_bytes()[:4] == b"PAR1"
    # disable a user from the page
    page.locator("#user-disable-bob").click()
    expect(page.locator("#user-enable-bob")).to_be_visible()
    assert fb.user("bob").active is False
    page.goto(f"{base}/admin?lang=zh")
    expect(page.locator("#project-form")).to_contain_text("项目名称")
    expect(page.locator("#user-form")).to_contain_text("用户名")
    assert errors == []

"""Every feedback kind in chromium, with the keyboard alone: thumbs (with a model's suggestion on
screen, skip and undo), a Likert rating, ranking then critiquing the best answer (reordered with
Backspace), correcting an answer, and choosing then correcting with the word diff shown. The labels
stored are exactly the keys pressed."""

from __future__ import annotations

import threading
import time

import pytest

from heed.feedback.loadtest import free_port
from heed.feedback.service import Feedback

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
expect = sync_api.expect
PASSWORD = "ann-password-1"


@pytest.fixture
def site(tmp_path, hasher):  # type: ignore[no-untyped-def]
    import uvicorn

    from heed.feedback.api import create_app

    fb = Feedback(f"sqlite:///{tmp_path / 'heed.db'}", hasher=hasher, seed=5)
    fb.add_user("ann", password=PASSWORD)
    fb.create_project("th", "binary", suggest={"show": "scores", "rate": 1.0})
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Tell me a fact."},
    ]
    fb.import_records(
        "th",
        [
            {"prompt": chat, "response": "Honey never spoils.", "id": "good"},
            {"prompt": "Say something", "response": "no", "id": "bad"},
            {"prompt": "Skip me", "response": "whatever", "id": "skipped"},
        ],
    )
    fb.set_suggestions("th", lambda prompts, responses: [float(len(r)) for r in responses])
    fb.create_project("lk", "rating", scale="1-7", scale_labels="harmful,excellent")
    fb.import_records("lk", [{"prompt": "Rate me", "response": "A fine answer."}])
    fb.create_project("rc", "ranking,critique")
    fb.import_records("rc", [{"prompt": "Rank us", "responses": ["worst one", "best one", "middle one"]}])
    fb.create_project("ed", "edit")
    fb.import_records("ed", [{"prompt": "Capital of France?", "response": "Lyon is the capital."}])
    fb.create_project("pe", "pairwise,edit", diff=True)
    fb.import_records("pe", [{"prompt": "Greet", "responses": ["hello there friend", "hello there enemy"]}])
    for p in ("th", "lk", "rc", "ed", "pe"):
        fb.add_member(p, "ann")
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


def settled(page) -> None:  # type: ignore[no-untyped-def]
    page.wait_for_selector('body[data-busy="0"]')


def test_every_kind_with_the_keyboard(site, browser) -> None:  # type: ignore[no-untyped-def]
    base, fb = site
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{base}/login")
    page.locator("#login-name").focus()
    page.keyboard.type("ann")
    page.keyboard.press("Tab")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url(f"{base}/")

    # ---- binary: thumbs with the model's suggestion shown; a chat prompt shown as a conversation
    page.goto(f"{base}/annotate/th")
    expect(page.locator("#binary-buttons")).to_be_visible()
    expect(page.locator("#pairwise-buttons")).to_be_hidden()
    thumbs = {}
    for _ in range(3):
        settled(page)
        prompt = page.locator("#prompt").inner_text()
        # scores are the answers' lengths (19, 2, 8): up when at least the median, 8
        expect(page.locator("#suggestion-0")).to_contain_text("👎" if "Say something" in prompt else "👍")
        if "Skip me" in prompt:
            page.keyboard.press("s")
            continue
        if "fact" in prompt:
            assert page.locator("#prompt .msg").count() == 4  # system, user, assistant, user
            expect(page.locator("#prompt .msg.role-assistant")).to_contain_text("Hello.")
            page.keyboard.press("y")
            thumbs["good"] = "up"
        else:
            page.keyboard.press("1")  # up first, then change to down before submitting
            expect(page.locator("#btn-up")).to_have_class("selected")
            page.keyboard.press("n")
            thumbs["bad"] = "down"
        expect(
            page.locator("#btn-down" if thumbs.get("bad") == "down" and "fact" not in prompt else "#btn-up")
        ).to_have_class("selected")
        page.keyboard.press("Enter")
    settled(page)
    expect(page.locator("#all-done")).to_be_visible()
    # undo the last one, flip it, submit again
    page.keyboard.press("u")
    settled(page)
    last = "good" if "fact" in page.locator("#prompt").inner_text() else "bad"
    page.keyboard.press("n" if thumbs[last] == "up" else "y")
    thumbs[last] = "down" if thumbs[last] == "up" else "up"
    page.keyboard.press("Enter")
    settled(page)
    expect(page.locator("#all-done")).to_be_visible()
    rows = {r["id"]: r["label"] for r in fb.export("th", "kto")}
    assert rows == {k: v == "up" for k, v in thumbs.items()}
    assert all(a["suggestion_shown"] is True for a in fb.annotations("th"))
    assert fb.progress("th", "ann")["skipped"] == 1

    # ---- rating: a digit, then the arrow keys move it
    page.goto(f"{base}/annotate/lk")
    settled(page)
    expect(page.locator("#scale-low")).to_have_text("harmful")
    expect(page.locator("#scale-high")).to_have_text("excellent")
    page.keyboard.press("5")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#rating-7")).to_have_class("selected")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("Enter")
    settled(page)
    expect(page.locator("#all-done")).to_be_visible()
    assert [a["rating"] for a in fb.annotations("lk")] == [6.0]

    # ---- ranking then critique of the best: rank wrong, Backspace twice, reorder, critique (c)
    page.goto(f"{base}/annotate/rc")
    settled(page)
    texts = [page.locator(f"#response-{i} .body").inner_text() for i in range(3)]
    pos = {t.split()[0]: str(i + 1) for i, t in enumerate(texts)}
    for k in (pos["middle"], pos["best"], "Backspace", "Backspace", pos["best"], pos["middle"], pos["worst"]):
        page.keyboard.press(k)
    expect(page.locator("#ranking li")).to_have_count(3)
    expect(page.locator("#critique-text")).to_have_text(f"Critique of response {pos['best']}")
    page.keyboard.press("Enter")  # no critique yet: refused on the page, nothing sent
    expect(page.locator("#toast")).to_contain_text("critique")
    page.keyboard.press("c")
    page.keyboard.type("Best, but too short.")
    page.keyboard.press("Control+Enter")
    settled(page)
    expect(page.locator("#all-done")).to_be_visible()
    (row,) = fb.export("rc", "ranked")
    assert row["ranks"] == [3, 1, 2] and row["critiques"] == ["Best, but too short."]
    assert fb.export("rc", "critiques")[0]["completion"] == "best one"

    # ---- edit: the answer is in the box; select it all and type the correction
    page.goto(f"{base}/annotate/ed")
    settled(page)
    page.keyboard.press("e")
    expect(page.locator("#edit")).to_have_value("Lyon is the capital.")
    page.keyboard.press("Control+a")
    page.keyboard.type("Paris is the capital.")
    expect(page.locator("#edit-diff .diff-b")).to_have_text("Paris")
    page.keyboard.press("Control+Enter")
    settled(page)
    expect(page.locator("#all-done")).to_be_visible()
    (fixed,) = fb.export("ed", "sft")
    assert (fixed["prompt"], fixed["completion"]) == ("Capital of France?", "Paris is the capital.")

    # ---- pairwise + edit with the diff: choose, see the differing words, correct the chosen one
    page.goto(f"{base}/annotate/pe")
    settled(page)
    page.keyboard.press("f")
    expect(page.locator("#responses .diff-a")).to_have_count(1)
    expect(page.locator("#responses .diff-b")).to_have_count(1)
    shown = [page.locator(f"#response-{i} .body").inner_text().split()[-1] for i in range(2)]
    page.keyboard.press("1" if shown[0] == "friend" else "2")
    page.keyboard.press("e")
    expect(page.locator("#edit")).to_have_value("hello there friend")
    page.keyboard.press("End")
    page.keyboard.type("!")
    page.keyboard.press("Control+Enter")
    settled(page)
    expect(page.locator("#all-done")).to_be_visible()
    pairs = [(r["chosen"], r["rejected"]) for r in fb.export("pe", "pairs")]
    assert pairs == [
        ("hello there friend", "hello there enemy"),
        ("hello there friend!", "hello there friend"),
    ]
    assert errors == []

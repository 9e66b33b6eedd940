"""report.html opened in headless chromium: images decode, tables are there, model text is inert,
and nothing leaves the page."""

import pytest

from heed.report import write_report

pytestmark = pytest.mark.browser


def test_report_in_chromium(browser, demo_folder, evil):
    out = write_report(demo_folder)
    url = out.resolve().as_uri()
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("dialog", lambda d: d.dismiss())
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_load_state("load")

    # every plot decodes to a real bitmap
    sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
    assert len(sizes) >= 20
    assert all(done and width > 0 for done, width in sizes)

    # the tables hold the expected rows
    assert page.locator("table.compare").first.locator("tbody tr").count() == 4
    assert page.locator("table.alarms tbody tr").count() == 6
    assert page.locator("table.samples tbody tr").count() == 4
    assert page.locator(".card").count() >= 5

    # model text is shown as text and does nothing
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("script").count() == 0
    answers = page.locator("table.samples .answer").all_inner_texts()
    assert evil in answers
    assert errors == []

    # nothing but the page itself (and data: images) was requested
    outside = [u for u in requests if u != url and not u.startswith("data:")]
    assert outside == []
    page.close()

"""The service layer (the code path both the HTTP API and `heed demo` use), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading

import pytest
from sqlalchemy import update

from heed.errors import DataError
from heed.feedback.records import read_rows
from heed.feedback.service import ConflictError, Feedback, NotFoundError
from heed.feedback.store import Lease, utcnow

UNICODE = (
    "naïve 你好 🙂👍🏽 مرحبا e\u0301 \u200d tab\tnl\n<b>&amp;</b> ' \" ; DROP TABLE heed_users; -- \x00 end"
)


def records(n: int, k: int = 2) -> list[dict]:
    return [
        {"prompt": f"p{i}", "responses": [f"r{i}.{j}" for j in range(k)], "id": f"x{i}"} for i in range(n)
    ]


def label_all(fb: Feedback, users: list[str], project: str, choice: str = "A") -> int:
    n = 0
    for u in users:
        while (a := fb.next_assignment(u, project)) is not None:
            fb.submit(u, project, a.record_id, choice=choice, key=f"{u}-{a.record_id}")
            n += 1
    return n


def test_assignment_respects_overlap_and_fewest_first(fb: Feedback) -> None:
    fb.create_project("p", "pairwise", overlap=2)
    fb.import_records("p", records(3))
    for u in "abc":
        fb.add_user(u)
    # a takes record 1; b, arriving next, is handed record 2 (fewest annotations + leases first)
    assert fb.next_assignment("a", "p").record_id == 1
    assert fb.next_assignment("b", "p").record_id == 2
    assert fb.next_assignment("a", "p").record_id == 1  # a pending lease is returned again
    assert label_all(fb, ["a", "b", "c"], "p") == 6  # 3 records x overlap 2
    counts = {}
    for ann in fb.annotations("p"):
        counts[ann["record_id"]] = counts.get(ann["record_id"], 0) + 1
    assert counts == {1: 2, 2: 2, 3: 2}
    assert fb.progress("p")["complete_records"] == 3
    assert fb.progress("p", "c") == {**fb.progress("p", "c"), "done": 0, "assigned": 0, "available": 0}


def test_lease_reserves_the_last_slot_until_it_expires(fb: Feedback) -> None:
    fb.create_project("p", "pairwise", overlap=1, lease_seconds=60)
    fb.import_records("p", records(1))
    fb.add_user("a")
    fb.add_user("b")
    a = fb.next_assignment("a", "p")
    assert fb.next_assignment("b", "p") is None  # the only slot is leased to a
    with pytest.raises(ConflictError, match="not assigned"):
        fb.submit("b", "p", a.record_id, choice="A", key="b1")
    # a's lease runs out: b may now take the record, and a's late submission is refused
    with fb.store.write() as s:
        s.execute(update(Lease).values(expires_at=utcnow()))
    b = fb.next_assignment("b", "p")
    assert b is not None and b.record_id == a.record_id
    fb.submit("b", "p", b.record_id, choice="B", key="b1")
    with pytest.raises(ConflictError):
        fb.submit("a", "p", a.record_id, choice="A", key="a1")
    assert len(fb.annotations("p")) == 1


def test_idempotent_submission_and_undo(fb: Feedback) -> None:
    fb.create_project("p", "pairwise", overlap=1)
    fb.import_records("p", records(2))
    fb.add_user("a")
    a = fb.next_assignment("a", "p")
    first = fb.submit("a", "p", a.record_id, choice="A", key="k1")
    again = fb.submit("a", "p", a.record_id, choice="A", key="k1")
    assert not first.duplicate and again.duplicate and again.annotation_id == first.annotation_id
    nxt = fb.next_assignment("a", "p")
    with pytest.raises(ConflictError, match="already used"):
        fb.submit("a", "p", nxt.record_id, choice="A", key="k1")
    assert len(fb.annotations("p")) == 1
    # undo: the record comes back as the current assignment, shown in the same order
    assert fb.undo_last("a", "p") == a.record_id
    back = fb.next_assignment("a", "p")
    assert (back.record_id, back.order) == (a.record_id, a.order)
    assert fb.annotations("p") == []
    fb.submit("a", "p", back.record_id, choice="B", key="k2")
    winner = back.order[1]  # B = second shown
    assert fb.annotations("p")[0]["label"] == str(winner)


def test_choice_is_mapped_through_the_display_order(fb: Feedback) -> None:
    fb.create_project("p", "pairwise", overlap=1)
    fb.import_records("p", [{"prompt": "q", "responses": ["good", "bad"]} for _ in range(8)])
    fb.add_user("a")
    for _ in range(8):
        a = fb.next_assignment("a", "p")
        assert a.responses == [["good", "bad"][i] for i in a.order]
        fb.submit("a", "p", a.record_id, choice=a.display_choice(0), key=str(a.record_id))
    rows = fb.export("p", "pairs")
    assert len(rows) == 8 and all(r["chosen"] == "good" and r["rejected"] == "bad" for r in rows)
    orders = {tuple(j.display_order) for j in fb.judgements("p")}
    assert orders == {(0, 1), (1, 0)}  # both orders shown (seeded shuffle), and stored


def test_validation_errors_are_clear(fb: Feedback) -> None:
    fb.create_project("p", "pairwise", overlap=1, allow_tie=False, rationale="required")
    fb.create_project("r", "ranking", overlap=1, allow_discard=False)
    with pytest.raises(DataError, match="exactly 2"):
        fb.import_records("p", records(1, k=3))
    with pytest.raises(DataError, match="record 0: prompt"):
        fb.import_records("p", [{"prompt": "", "responses": ["a", "b"]}])
    with pytest.raises(DataError, match="not a finite number"):
        fb.import_records("p", [{"prompt": "q", "responses": ["a", "b"], "score": float("nan")}])
    with pytest.raises(NotFoundError):
        fb.import_records("nope", records(1))
    with pytest.raises(ConflictError):
        fb.create_project("p", "pairwise")
    fb.import_records("p", records(1))
    fb.import_records("r", records(1, k=3))
    fb.add_user("a")
    a = fb.next_assignment("a", "p")
    with pytest.raises(DataError, match="ties are turned off"):
        fb.submit("a", "p", a.record_id, choice="tie", key="1", rationale="x")
    with pytest.raises(DataError, match="rationale: required"):
        fb.submit("a", "p", a.record_id, choice="A", key="1")
    with pytest.raises(DataError, match="choice"):
        fb.submit("a", "p", a.record_id, choice="C", key="1", rationale="x")
    r = fb.next_assignment("a", "r")
    with pytest.raises(DataError, match="expected 3"):
        fb.submit("a", "r", r.record_id, ranks=[1, 2], key="2")
    with pytest.raises(DataError, match="between 1 and 3"):
        fb.submit("a", "r", r.record_id, ranks=[1, 2, 7], key="2")
    with pytest.raises(DataError, match="discarding is turned off"):
        fb.submit("a", "r", r.record_id, discard=True, key="2")
    assert fb.annotations("p") == [] and fb.annotations("r") == []


def test_unicode_round_trips_exactly(fb: Feedback, tmp_path) -> None:  # type: ignore[no-untyped-def]
    chat = [{"role": "system", "content": "你是助手"}, {"role": "user", "content": UNICODE}]
    fb.create_project("p", "pairwise", overlap=1)
    fb.import_records(
        "p",
        [
            {"prompt": UNICODE, "responses": [UNICODE + "A", "🙂B"], "note": UNICODE},
            {"prompt": chat, "responses": ["答案 A", "答案 B"]},
        ],
    )
    fb.add_user("a")
    seen = []
    while (a := fb.next_assignment("a", "p")) is not None:
        seen.append(a)
        fb.submit("a", "p", a.record_id, choice=a.display_choice(0), key=str(a.record_id), rationale="理由 ✓")
    assert seen[0].prompt == UNICODE and sorted(seen[0].responses) == sorted([UNICODE + "A", "🙂B"])
    assert seen[1].prompt == chat
    rows = fb.export("p", "pairs")
    assert rows[0]["prompt"] == UNICODE and rows[0]["chosen"] == UNICODE + "A" and rows[0]["note"] == UNICODE
    # a chat prompt exports in TRL's conversational form
    assert rows[1]["prompt"] == chat and rows[1]["chosen"] == [{"role": "assistant", "content": "答案 A"}]
    path, n = fb.export_file("p", "pairs", tmp_path / "pairs.jsonl")
    assert n == 2 and [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == rows
    assert fb.annotations("p")[0]["rationale"] == "理由 ✓"


def test_export_formats_round_trip_and_reimport(fb: Feedback, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fb.create_project("r", "ranking", overlap=2)
    fb.import_records(
        "r", [{"prompt": f"q{i}", "responses": ["a", "b", "c"], "topic": "math"} for i in range(3)]
    )
    for u in "xy":
        fb.add_user(u)
        while (a := fb.next_assignment(u, "r")) is not None:
            # both annotators: a > b = c (ranks per stored response index [1, 2, 2])
            fb.submit(u, "r", a.record_id, ranks=a.display_ranks([1, 2, 2]), key=f"{u}{a.record_id}")
    ranked = fb.export("r", "ranked")
    assert [r["ranks"] for r in ranked] == [[1, 2, 2]] * 3 and all(r["weight"] == 1.0 for r in ranked)
    pairs = fb.export("r", "pairs")
    # each record: a > b and a > c; b ~ c is a tie and gives no pair
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "b"), ("a", "c")] * 3
    assert all(set(p) >= {"prompt", "chosen", "rejected", "weight", "topic"} for p in pairs)
    for i, name in enumerate(("pairs.jsonl", "pairs.parquet", "pairs_ds")):
        path, n = fb.export_file("r", "pairs", tmp_path / name)
        back = [row for _, row in read_rows(path)]
        assert n == 6 and back == pairs
        # import takes the same three forms: the pairs become new two-response records
        fb.create_project(f"again{i}", "pairwise")
        assert fb.import_file(f"again{i}", path) == 6


def test_uncertainty_ordering(fb: Feedback) -> None:
    fb.create_project("p", "ranking", overlap=1)
    fb.import_records(
        "p", [{"prompt": "q", "responses": ["a" * n, "b" * m, "c"]} for n, m in [(1, 9), (5, 6), (2, 9)]]
    )
    fb.add_user("a")

    def score(prompts: list, responses: list[str]) -> list[float]:  # a toy reward: the length
        return [float(len(r)) for r in responses]

    # min gaps: record 1 |1-1| = 0 ("a" vs "c"); record 2 |5-6| = 1; record 3 |2-1| = 1 -> record 1 first
    assert fb.set_priorities("p", score) == 3
    order = []
    while (a := fb.next_assignment("a", "p")) is not None:
        order.append(a.record_id)
        fb.submit("a", "p", a.record_id, discard=True, key=str(a.record_id))
    assert order == [1, 2, 3]


def test_concurrent_claims_never_over_assign(fb: Feedback) -> None:
    fb.create_project("p", "pairwise", overlap=1)
    fb.import_records("p", records(30))
    users = [f"u{i}" for i in range(6)]
    for u in users:
        fb.add_user(u)
    errors: list[BaseException] = []

    def work(u: str) -> None:
        try:
            label_all(fb, [u], "p")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    anns = fb.annotations("p")
    assert len(anns) == 30 and len({a["record_id"] for a in anns}) == 30


def test_users_and_sessions(fb: Feedback) -> None:
    info, password = fb.add_user("admin1", "admin")
    assert len(password) >= 12 and info.role == "admin"
    assert fb.authenticate("admin1", password) == info
    assert fb.authenticate("admin1", "wrong") is None and fb.authenticate("ghost", "x") is None
    token, csrf = fb.open_session(info)
    assert fb.session_user(token) == (info, csrf, "cookie")
    assert fb.session_user(token + "x") is None
    new = fb.set_password("admin1")
    assert fb.session_user(token) is None and fb.authenticate("admin1", new) == info
    with pytest.raises(DataError):
        fb.add_user("bad name")
    with pytest.raises(ConflictError):
        fb.add_user("admin1")

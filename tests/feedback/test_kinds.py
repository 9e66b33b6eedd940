"""Every feedback kind through the service: records, submissions, refusals naming the field,
aggregation with hand-derived values, and exports that the trainers' loaders read unchanged."""

from __future__ import annotations

import json
import math

import pytest

from heed.data.records import PreferenceGroup, SFTExample, UnpairedExample, load_records
from heed.errors import DataError
from heed.feedback import aggregate as agg
from heed.feedback.kinds import parse_kinds, parse_scale, parse_scale_labels
from heed.feedback.service import Feedback

USERS = ("a1", "a2", "a3")


def users(fb: Feedback, names: tuple[str, ...] = USERS) -> None:
    for u in names:
        fb.add_user(u, password=f"{u}-password-1")


def label_all(fb: Feedback, project: str, user: str, answer) -> int:  # type: ignore[no-untyped-def]
    """Let ``user`` label every record they are handed: ``answer(assignment) -> submit kwargs``."""
    n = 0
    while (a := fb.next_assignment(user, project)) is not None:
        fb.submit(user, project, a.record_id, key=f"{user}-{a.record_id}", **answer(a))
        n += 1
    return n


def write_jsonl(path, rows) -> None:  # type: ignore[no-untyped-def]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_kinds_scale_and_labels_parse_with_one_line_errors() -> None:
    assert parse_kinds("critique,ranking").kinds == ("ranking", "critique")
    k = parse_kinds("binary,edit")
    assert (k.judgement, k.primary, k.comparison, k.response_counts()) == ("binary", "binary", False, (1, 1))
    assert parse_kinds("edit").primary == "edit" and parse_kinds("ranking").response_counts() == (2, 9)
    for bad, msg in (
        ("thumbs", "'thumbs' is not a feedback kind"),
        ("binary,rating", "at most one of"),
        ("edit,edit", "named twice"),
        ("", "expected one or more"),
    ):
        with pytest.raises(DataError, match=msg):
            parse_kinds(bad)
    assert parse_scale("1-7") == (1, 7) and parse_scale(None) == (1, 5)
    for bad in ("7-1", "1-10", "one-five", "3-3"):
        with pytest.raises(DataError, match="scale"):
            parse_scale(bad)
    assert parse_scale_labels("harmful, excellent") == ("harmful", "excellent")
    with pytest.raises(DataError, match="two names"):
        parse_scale_labels("only-one")


def test_single_answer_records_and_mismatched_imports(fb, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fb.create_project("thumbs", "binary")
    good = tmp_path / "good.jsonl"
    write_jsonl(
        good,
        [
            {"prompt": "p0", "response": "r0", "topic": "x"},
            {"prompt": "p1", "completion": "r1", "label": True},  # an unpaired (KTO) record
            {"prompt": "p2", "responses": ["r2"]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        ],
    )
    assert fb.import_file("thumbs", good) == 4
    recs = [fb.record("thumbs", i) for i in range(1, 5)]
    assert [r["responses"] for r in recs] == [["r0"], ["r1"], ["r2"], ["hello"]]
    assert recs[0]["metadata"] == {"topic": "x"} and recs[1]["metadata"] == {"source_label": True}
    assert recs[3]["prompt"] == [{"role": "user", "content": "hi"}]  # a conversation, shown as one

    # a record with several answers in a binary project: file:line, and nothing of the file imported
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"prompt": "q", "response": "fine"}, {"prompt": "q", "responses": ["a", "b", "c"]}])
    with pytest.raises(
        DataError, match=r"bad\.jsonl:2: responses: 3 given; a binary project takes one answer"
    ):
        fb.import_file("thumbs", bad)
    write_jsonl(bad, [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: chosen/rejected: a preference pair"):
        fb.import_file("thumbs", bad)
    assert fb.project("thumbs").num_records == 4
    # and a one-answer record in a ranking project
    fb.create_project("rank", "ranking")
    write_jsonl(bad, [{"prompt": "q", "responses": ["a", "b"]}, {"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: responses: missing"):
        fb.import_file("rank", bad)
    assert fb.project("rank").num_records == 0


def test_binary_majority_kto_export_and_thumb_pairs(fb, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fb.create_project("thumbs", "binary", overlap=3)
    users(fb)
    fb.import_records(
        "thumbs",
        [
            {"prompt": "q", "response": "great answer", "id": "g"},
            {"prompt": "q", "response": "bad answer", "id": "b"},
            {"prompt": [{"role": "user", "content": "chat q"}], "response": "split", "id": "s"},
        ],
    )
    votes = {  # record id -> thumbs of a1, a2, a3
        "great answer": ("up", "up", "down"),
        "bad answer": ("down", "down", "down"),
        "split": ("up", "down", None),  # a3 discards: no strict majority (1 up, 1 down, 1 discard)
    }
    for i, u in enumerate(USERS):

        def answer(a, i=i):  # type: ignore[no-untyped-def]
            t = votes[a.responses[0]][i]
            return {"thumb": t} if t else {"discard": True}

        assert label_all(fb, "thumbs", u, answer) == 3
    assert fb.summary("thumbs") == {"up": 1, "down": 1, "no_majority": 1}
    rows = fb.export("thumbs", "kto")
    # weights: the winner's vote share, 2/3 and 3/3
    assert [(r["completion"], r["label"], r["weight"], r["id"]) for r in rows] == [
        ("great answer", True, round(2 / 3, 6), "g"),
        ("bad answer", False, 1.0, "b"),
    ]
    path = tmp_path / "kto.jsonl"
    fb.export_file("thumbs", "kto", path)
    plain = [json.loads(line) for line in path.read_text().splitlines()]
    assert [type(r["label"]) for r in plain] == [bool, bool]  # TRL's unpaired format: JSON booleans
    loaded = load_records(path, "unpaired")
    assert all(isinstance(x, UnpairedExample) for x in loaded)
    assert [(x.prompt, x.completion, x.label, x.weight) for x in loaded] == [
        ("q", "great answer", True, round(2 / 3, 6)),
        ("q", "bad answer", False, 1.0),
    ]
    # thumbs-up beats thumbs-down for the same prompt; weight = the smaller of the two shares
    pairs = fb.export("thumbs", "pairs")
    assert [(r["chosen"], r["rejected"], r["weight"], r["ids"]) for r in pairs] == [
        ("great answer", "bad answer", round(2 / 3, 6), ["g", "b"])
    ]
    with pytest.raises(DataError, match="format 'sft': a binary project exports kto, pairs"):
        fb.export("thumbs", "sft")
    # Dawid-Skene over the two classes keeps the clear records' labels
    ds = {r["id"]: r["label"] for r in fb.export("thumbs", "kto", aggregate="dawid-skene")}
    assert ds["g"] is True and ds["b"] is False
    rep = fb.agreement("thumbs")
    assert rep.records_multi == 3 and not math.isnan(rep.fleiss_kappa)


def test_rating_scale_mean_rankings_and_margins(fb, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fb.create_project("likert", "rating", overlap=2, scale="1-7", scale_labels="harmful,excellent")
    info = fb.project("likert")
    assert (info.kinds, info.scale, info.scale_labels) == (("rating",), (1, 7), ("harmful", "excellent"))
    users(fb, ("a1", "a2"))
    answers = ["short", "medium one", "long long one", "other prompt"]
    fb.import_records(
        "likert",
        [{"prompt": "q", "response": a, "id": a} for a in answers[:3]]
        + [{"prompt": "q2", "response": answers[3], "id": answers[3]}],
    )
    given = {"short": (7, 6), "medium one": (4, 4), "long long one": (2, 5), "other prompt": (3, 3)}
    a = fb.next_assignment("a1", "likert")
    for bad, msg in ((8, "rating: 8 is outside this project's scale 1-7"), (0, "outside"), (2.5, "outside")):
        with pytest.raises(DataError, match=msg):
            fb.submit("a1", "likert", a.record_id, rating=bad)
    with pytest.raises(DataError, match="thumb: this is a rating project; send rating"):
        fb.submit("a1", "likert", a.record_id, thumb="up")
    with pytest.raises(DataError, match="rating: missing"):
        fb.submit("a1", "likert", a.record_id)
    for i, u in enumerate(("a1", "a2")):
        label_all(fb, "likert", u, lambda a, i=i: {"rating": given[a.responses[0]][i]})
    # means: short 6.5, medium 4.0, long 3.5 (q); other 3.0 alone on q2 -> no ranked group for q2
    ranked = fb.export("likert", "rankings")
    assert len(ranked) == 1
    r = ranked[0]
    assert r["responses"] == answers[:3] and r["ratings"] == [6.5, 4.0, 3.5] and r["ranks"] == [1, 2, 3]
    # weight = 1 / (1 + population sd), the least agreed record: long (2, 5) -> sd 1.5 -> 0.4
    assert r["weight"] == 0.4 and r["ids"] == answers[:3] and r["num_annotations"] == 6
    pairs = fb.export("likert", "pairs")
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in pairs] == [
        ("short", "medium one", 2.5),
        ("short", "long long one", 3.0),
        ("medium one", "long long one", 0.5),
    ]
    path = tmp_path / "ranked.jsonl"
    fb.export_file("likert", "ranked", path)
    (group,) = load_records(path, "preferences")
    assert isinstance(group, PreferenceGroup) and list(group.ranks) == [1, 2, 3]
    fb.export_file("likert", "pairs", path)
    loaded = load_records(path, "preferences")
    assert [g.margin for g in loaded] == [2.5, 3.0, 0.5]
    rep = fb.agreement("likert")
    assert rep.records_multi == 4 and rep.per_annotator["a1"]["compared"] == 4.0
    # |7-6| + 0 + |2-5| + 0 over 4 records
    assert rep.per_annotator["a1"]["mean_abs_diff_with_others"] == pytest.approx(1.0)


def test_edits_become_sft_records_and_pairs(fb, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fb.create_project("fix", "edit", overlap=2)
    users(fb, ("a1", "a2"))
    fb.import_records(
        "fix",
        [
            {"prompt": "capital of France?", "response": "Lyon.", "id": "c"},
            {"prompt": [{"role": "user", "content": "2+2?"}], "response": "4", "id": "m"},
        ],
    )
    a = fb.next_assignment("a1", "fix")
    for bad, msg in (("", "edit: empty"), ("   \n", "edit: empty"), ("a\x00b", "edit: contains a NUL")):
        with pytest.raises(DataError, match=msg):
            fb.submit("a1", "fix", a.record_id, edit=bad)
    fixes = {"Lyon.": ("Paris.", "Paris, of course."), "4": ("4", "4.")}  # a1 leaves "4" as it is
    for i, u in enumerate(("a1", "a2")):
        label_all(fb, "fix", u, lambda a, i=i: {"edit": fixes[a.responses[0]][i]})
    sft = fb.export("fix", "sft")
    assert [r.get("completion") or r["messages"][-1]["content"] for r in sft] == [
        "Paris.",
        "4",
        "Paris, of course.",
        "4.",
    ]
    assert sft[1]["messages"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    pairs = fb.export("fix", "pairs")  # the unchanged "4" makes no pair
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("Paris.", "Lyon."),
        ("Paris, of course.", "Lyon."),
        ([{"role": "assistant", "content": "4."}], [{"role": "assistant", "content": "4"}]),
    ]
    path = tmp_path / "sft.jsonl"
    fb.export_file("fix", "sft", path)
    loaded = load_records(path, "sft")
    assert all(isinstance(x, SFTExample) for x in loaded) and len(loaded) == 4
    # Parquet needs one form: the text prompt's rows become chat messages too
    pq = tmp_path / "sft.parquet"
    fb.export_file("fix", "sft", pq)
    assert len(load_records(pq, "sft")) == 4
    fb.export_file("fix", "pairs", path)
    assert len(load_records(path, "preferences")) == 3


def test_ranking_with_critique_of_the_best_answer(fb, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fb.create_project("rc", "ranking,critique", overlap=1)
    users(fb, ("a1",))
    fb.import_records("rc", [{"prompt": "q", "responses": ["worst", "best", "mid"]}])
    a = fb.next_assignment("a1", "rc")
    true_ranks = [3, 1, 2]
    with pytest.raises(DataError, match="critique: empty"):
        fb.submit("a1", "rc", a.record_id, ranks=a.display_ranks(true_ranks), critique=" ")
    with pytest.raises(
        DataError, match=r"thumb: this is a ranking,critique project; send ranks \(or discard\) \+ critique"
    ):
        fb.submit("a1", "rc", a.record_id, thumb="up")
    fb.submit("a1", "rc", a.record_id, ranks=a.display_ranks(true_ranks), critique="Good, but cite a source.")
    (ann,) = fb.annotations("rc")
    assert ann["target"] == 1  # the best-ranked answer, stored index 1
    (row,) = fb.export("rc", "ranked")
    assert row["ranks"] == [3, 1, 2] and row["critiques"] == ["Good, but cite a source."]
    (crit,) = fb.export("rc", "critiques")
    assert (crit["completion"], crit["critique"]) == ("best", "Good, but cite a source.")
    # the history speaks in display positions, with the critique
    (h,) = fb.history("a1", "rc")
    assert h["critique"] == "Good, but cite a source." and h["ranks"] == a.display_ranks(true_ranks)
    # changing it in place keeps the rule: the new best is the target
    fb.edit("a1", "rc", ann["annotation_id"], ranks=a.display_ranks([1, 2, 3]), critique="Now the first.")
    assert fb.annotations("rc")[0]["target"] == 0
    path = tmp_path / "pairs.jsonl"
    fb.export_file("rc", "pairs", path)
    assert all(g.extra["critiques"] == ["Now the first."] for g in load_records(path, "preferences"))


def test_pairwise_with_edit_corrects_the_chosen_answer(fb) -> None:  # type: ignore[no-untyped-def]
    fb.create_project("pe", "pairwise,edit")
    users(fb, ("a1",))
    fb.import_records("pe", [{"prompt": "q", "responses": ["typo answr", "worse"]}])
    a = fb.next_assignment("a1", "pe")
    fb.submit("a1", "pe", a.record_id, choice=a.display_choice(0), edit="typo-free answer")
    rows = fb.export("pe", "pairs")
    # the judgement's pair, then the correction's
    assert [(r["chosen"], r["rejected"], r.get("feedback")) for r in rows] == [
        ("typo answr", "worse", None),
        ("typo-free answer", "typo answr", "edit"),
    ]


def test_suggestions_shown_to_a_share_and_agreement_by_hand(fb) -> None:  # type: ignore[no-untyped-def]
    fb.create_project("sg", "pairwise", suggest={"model": None, "show": "scores", "rate": 0.5})
    assert fb.project("sg").suggest == "scores" and fb.project("sg").suggest_rate == 0.5
    users(fb, ("a1",))
    fb.import_records("sg", [{"prompt": f"q{i}", "responses": ["x" * (i + 2), "y"]} for i in range(16)])

    def by_length(prompts: list, responses: list[str]) -> list[float]:
        return [float(len(r)) for r in responses]  # the longer answer scores higher

    assert fb.set_suggestions("sg", by_length) == 16
    shown = hidden = 0
    while (a := fb.next_assignment("a1", "sg")) is not None:
        if a.suggestion is not None:
            shown += 1
            assert a.suggestion["scores"] == [float(len(r)) for r in a.responses]
            assert a.suggestion["ranks"] == ([1, 2] if len(a.responses[0]) > 1 else [2, 1])
            choice = a.display_choice(0)  # follows the model (index 0 is the longer one)
        else:
            hidden += 1
            choice = a.display_choice(1)  # goes against it
        fb.submit("a1", "sg", a.record_id, choice=choice)
    assert shown and hidden and shown + hidden == 16
    rep = fb.suggestion_agreement("sg")
    assert rep["shown"] == {"labels": shown, "agreement": 1.0}
    assert rep["hidden"] == {"labels": hidden, "agreement": 0.0}
    assert {a["suggestion_shown"] for a in fb.annotations("sg")} == {True, False}
    with pytest.raises(DataError, match=r"suggest\.show 'ranking'"):
        fb.create_project("sg2", "binary", suggest={"show": "ranking"})


def test_suggestion_agreement_per_kind_by_hand() -> None:
    J = agg.Judgement
    sugg = {1: {"scores": [0.1, 0.9, 0.5]}, 2: {"scores": [2.0], "label": "up"}, 3: {"scores": [1.0]}}
    ranking = [
        J(1, "a", "rank", (3.0, 1.0, 2.0), (0, 1, 2), None, True),  # same order as the scores: tau 1
        J(
            1, "b", "rank", (1.0, 2.0, 3.0), (0, 1, 2), None, True
        ),  # pairs (0,1) d, (0,2) d, (1,2) c: tau -1/3
        J(1, "c", "discard", None, (0, 1, 2), None, False),  # left out
    ]
    rep = agg.suggestion_agreement("ranking", ranking, sugg)
    assert rep["shown"]["labels"] == 2 and rep["shown"]["agreement"] == pytest.approx((1 - 1 / 3) / 2)
    assert rep["hidden"]["labels"] == 0 and math.isnan(rep["hidden"]["agreement"])
    binary = [J(2, "a", "up", None, (0,), None, True), J(2, "b", "down", None, (0,), None, True)]
    assert agg.suggestion_agreement("binary", binary, sugg)["shown"] == {"labels": 2, "agreement": 0.5}
    # ratings 1, 3, 5 against scores 1, 2, 3 (records 3, 4, 5): a straight line, r = 1
    ratings = [J(rid, "a", "rating", None, (0,), float(v), False) for rid, v in ((3, 1), (4, 3), (5, 5))]
    more = {**sugg, 4: {"scores": [2.0]}, 5: {"scores": [3.0]}}
    assert agg.suggestion_agreement("rating", ratings, more)["hidden"]["agreement"] == pytest.approx(1.0)


def test_aggregate_rating_weight_by_hand() -> None:
    J = agg.Judgement
    a = agg.aggregate_rating(
        7, [J(7, u, "rating", None, (0,), r) for u, r in (("a", 2.0), ("b", 4.0), ("c", 6.0))]
    )
    # mean 4; population sd = sqrt((4 + 0 + 4) / 3) = 1.633; weight = 1 / 2.633 = 0.3798
    assert a.mean_rating == 4.0 and a.weight == pytest.approx(1 / (1 + math.sqrt(8 / 3)))
    d = agg.aggregate_rating(7, [J(7, "a", "discard", None, (0,)), J(7, "b", "discard", None, (0,))])
    assert d.label == "discard" and d.mean_rating is None


def test_older_database_gains_the_new_columns(tmp_path, hasher) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    db = tmp_path / "old.db"
    fb = Feedback(f"sqlite:///{db}", hasher=hasher)
    fb.add_user("a1", password="a1-password-1")
    fb.create_project("p", "pairwise")
    fb.import_records("p", [{"prompt": "q", "responses": ["a", "b"]}])
    a = fb.next_assignment("a1", "p")
    fb.submit("a1", "p", a.record_id, choice="A")
    fb.close()
    con = sqlite3.connect(db)  # as an older Heed left it: none of the kinds' columns
    for table, cols in (
        ("heed_annotations", ("rating", "critique", "corrected", "target", "suggestion_shown")),
        ("heed_records", ("suggestion",)),
        ("heed_leases", ("suggestion_shown",)),
    ):
        for c in cols:
            con.execute(f"ALTER TABLE {table} DROP COLUMN {c}")
    con.commit()
    con.close()
    fb = Feedback(f"sqlite:///{db}", hasher=hasher)
    assert fb.annotations("p")[0]["rating"] is None and fb.project("p").kinds == ("pairwise",)
    assert len(fb.export("p", "pairs")) == 1
    fb.close()


@pytest.fixture
def client(db_url: str, hasher):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from heed.feedback.api import create_app

    fb = Feedback(db_url, hasher=hasher, seed=0)
    fb.add_user("boss", "admin", password="boss-password-1")
    fb.add_user("ann", password="ann-password-1")
    fb.create_project("likert", "rating", scale="1-7")
    fb.create_project("fix", "edit")
    fb.create_project("rank", "ranking")
    fb.import_records("likert", [{"prompt": "q", "response": "a"}])
    fb.import_records("fix", [{"prompt": "q", "response": "a"}])
    fb.import_records("rank", [{"prompt": "q", "responses": ["a", "b", "c"]}])
    for p in ("likert", "fix", "rank"):
        fb.add_member(p, "ann")
    with TestClient(create_app(fb), base_url="http://127.0.0.1") as c:
        yield c, fb
    fb.close()


def _login(c, name: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    r = c.post("/api/login", json={"name": name, "password": f"{name}-password-1"})
    assert r.status_code == 200, r.text
    return {"X-CSRF-Token": r.json()["csrf_token"]}


def test_http_refuses_bad_labels_with_422_naming_the_field(client) -> None:  # type: ignore[no-untyped-def]
    c, fb = client
    h = _login(c, "ann")

    def post(project: str, **body):  # type: ignore[no-untyped-def]
        item = c.post(f"/api/projects/{project}/next", headers=h).json()
        body = {"record_id": item["record_id"], "idempotency_key": f"k-{project}-{len(body)}", **body}
        return c.post(f"/api/projects/{project}/annotations", json=body, headers=h)

    project = c.get("/api/projects/likert", headers=h).json()
    assert (
        project["kinds"] == ["rating"]
        and project["scale"] == [1, 7]
        and project["formats"] == ["ranked", "pairs"]
    )
    for project_name, body, status, start in (
        ("likert", {"rating": 9}, 422, "rating: 9 is outside this project's scale 1-7"),
        ("likert", {"rating": "high"}, 422, "rating:"),
        ("fix", {"edit": ""}, 422, "edit: empty"),
        ("fix", {"edit": "   "}, 422, "edit: empty"),
        ("rank", {"thumb": "up"}, 422, "thumb: this is a ranking project"),
        ("rank", {"thumb": "sideways"}, 422, "thumb:"),
        ("rank", {"rating": 3}, 422, "rating: this is a ranking project"),
        ("likert", {"edit": "x", "rating": 3}, 422, "edit: this is a rating project"),
    ):
        r = post(project_name, **body)
        assert r.status_code == status and r.json()["detail"].startswith(start), (body, r.text)
    assert fb.progress("likert")["annotations"] == fb.progress("fix")["annotations"] == 0
    r = post("likert", rating=7, critique=None)
    assert r.status_code == 200
    assert fb.annotations("likert")[0]["rating"] == 7.0
    # a body over the limit is refused before it is read
    big = b'{"edit": "' + b"x" * (2 << 20) + b'"}'
    r = c.post(
        "/api/projects/fix/annotations", content=big, headers={**h, "Content-Type": "application/json"}
    )
    assert r.status_code == 413


def test_http_admin_kinds_import_and_export(client) -> None:  # type: ignore[no-untyped-def]
    c, fb = client
    h = _login(c, "boss")
    r = c.post("/api/admin/projects", json={"name": "t", "task": "binary,critique", "diff": True}, headers=h)
    assert r.status_code == 201 and r.json()["kinds"] == ["binary", "critique"] and r.json()["diff"] is True
    r = c.post("/api/admin/projects", json={"name": "t2", "task": "ranking", "scale": "1-7"}, headers=h)
    assert r.status_code == 422 and r.json()["detail"].startswith("scale: only a rating project")
    r = c.post("/api/admin/projects", json={"name": "t3", "task": "thumbs"}, headers=h)
    assert r.status_code == 422 and r.json()["detail"].startswith("task:")
    records = [{"prompt": "q", "response": "ok"}, {"prompt": "q", "responses": ["a", "b"]}]
    r = c.post("/api/admin/projects/t/records", json={"records": records}, headers=h)
    assert r.status_code == 422 and r.json()["detail"].startswith("record 1: responses: 2 given")
    assert fb.project("t").num_records == 0  # nothing imported
    assert c.post("/api/admin/projects/t/records", json={"records": records[:1]}, headers=h).json() == {
        "count": 1
    }
    item = c.post("/api/projects/t/next", headers=h).json()
    body = {"record_id": item["record_id"], "idempotency_key": "k", "thumb": "up", "critique": "fine"}
    assert c.post("/api/projects/t/annotations", json=body, headers=h).status_code == 200
    r = c.get("/api/admin/projects/t/export?format=kto", headers=h)
    (row,) = [json.loads(x) for x in r.text.splitlines()]
    assert row["label"] is True and row["completion"] == "ok" and row["critiques"] == ["fine"]
    past = c.get(f"/api/projects/t/annotations/{fb.annotations('t')[0]['annotation_id']}", headers=h).json()
    assert (past["thumb"], past["critique"]) == ("up", "fine")


def test_cli_kinds_suggestions_and_exports(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """The command line end to end: a rating project whose records a real (micro, built-in) reward
    model scores at import; annotate stats reports agreement with it; exports in every format."""
    from heed.cli import main

    def run(*args: str) -> str:
        main(list(args))
        return capsys.readouterr().out

    db = str(tmp_path / "k.db")
    out = run(
        "annotate", "project", "create", "likert", "--task", "rating", "--scale", "1-7",
        "--scale-labels", "harmful,excellent", "--suggest", "reward-model", "builtin:micro:reward_model",
        "--db", db,
    )  # fmt: skip
    assert "created project likert (rating, overlap 1)" in out
    data = tmp_path / "d.jsonl"
    write_jsonl(
        data, [{"prompt": "How are you?", "response": r} for r in ("Great, thanks!", "Awful.", "Fine.")]
    )
    out = run("annotate", "import", "--project", "likert", "--data", str(data), "--db", db)
    assert "imported 3 records" in out and "scored 3 records with" in out
    fb = Feedback(db)
    fb.add_user("a1", password="a1-password-1")
    ratings = {"Great, thanks!": 7, "Awful.": 1, "Fine.": 4}
    while (a := fb.next_assignment("a1", "likert")) is not None:
        assert a.suggestion is not None and math.isfinite(a.suggestion["scores"][0])  # rate 1: always shown
        fb.submit("a1", "likert", a.record_id, rating=ratings[a.responses[0]])
    assert fb.progress("likert")["complete_records"] == 3
    fb.close()
    stats = json.loads(run("annotate", "stats", "--project", "likert", "--db", db))
    shown = stats["suggestions"]["shown"]
    assert shown["labels"] == 3 and -1.0 <= shown["agreement"] <= 1.0
    assert stats["suggestions"]["hidden"]["labels"] == 0
    out = run(
        "annotate",
        "export",
        "--project",
        "likert",
        "--format",
        "rankings",
        "--out",
        str(tmp_path / "r.jsonl"),
        "--db",
        db,
    )
    assert "wrote 1 rankings rows" in out
    (group,) = load_records(tmp_path / "r.jsonl", "preferences")
    assert dict(zip(group.responses, group.ranks, strict=True)) == {
        "Great, thanks!": 1,
        "Fine.": 2,
        "Awful.": 3,
    }
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "annotate",
                "export",
                "--project",
                "likert",
                "--format",
                "kto",
                "--out",
                str(tmp_path / "k.jsonl"),
                "--db",
                db,
            ]
        )
    assert exit_info.value.code == 2
    assert "format 'kto': a rating project exports ranked, pairs" in capsys.readouterr().err

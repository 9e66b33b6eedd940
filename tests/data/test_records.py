"""Record loading and validation: every bad record names file:line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from heed.data import load_records
from heed.data.records import PreferenceGroup
from heed.errors import DataError


def _jsonl(tmp_path: Path, rows: list, name: str = "d.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return p


def test_sft_forms_and_extra_columns(tmp_path: Path) -> None:
    p = _jsonl(
        tmp_path,
        [
            {
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                "tone": "positive",
            },
            {"prompt": "2+2?", "completion": "4"},
        ],
    )
    a, b = load_records(p, "sft")
    assert a.messages[1]["content"] == "hello" and a.extra == {"tone": "positive"}
    assert b.prompt == "2+2?" and b.completion == "4"
    assert a.where == f"{p}:1" and b.where == f"{p}:2"


@pytest.mark.parametrize(
    ("rows", "kind", "expected"),
    [
        (['{"text": "ok"}', '{"text": "oops"'], "text", ":2: malformed JSON"),
        ([{"text": 3}], "text", ":1: text: expected a string, got int"),
        ([{"prompt": "x"}], "sft", ":1: completion: missing"),
        ([{"messages": [{"role": "robot", "content": "x"}]}], "sft", ":1: messages[0].role: expected one of"),
        ([{"messages": [{"role": "user", "content": "x"}]}], "sft", ":1: messages: no assistant message"),
        ([{"prompt": "p", "chosen": "a"}], "pairs", ":1: rejected: missing"),
        ([{"prompt": "p", "chosen": "a", "rejected": "a"}], "pairs", ":1: rejected: identical to chosen"),
        ([{"prompt": "p", "chosen": "", "rejected": "b"}], "pairs", ":1: chosen: empty response"),
        (
            [{"prompt": "p", "responses": ["a"], "ranks": [1]}],
            "ranked",
            "responses: a ranked group needs at least 2",
        ),
        (
            [{"prompt": "p", "responses": ["a", "b"], "ranks": [1]}],
            "ranked",
            "ranks: 1 ranks for 2 responses",
        ),
        (
            [{"prompt": "p", "responses": ["a", "b"], "ranks": [2, 2]}],
            "ranked",
            "ranks: all responses are tied",
        ),
        (
            [{"prompt": "p", "responses": ["a", "b"], "ranks": [1, "x"]}],
            "ranked",
            "ranks[1]: expected a number",
        ),
        (
            [{"prompt": "p", "chosen": "a", "rejected": "b", "weight": "heavy"}],
            "pairs",
            "weight: expected a finite number",
        ),
        ([{"prompt": 5}], "prompts", ":1: prompt: expected a string or a list of messages, got int"),
        (["[1, 2]"], "text", ":1: expected a JSON object, got list"),
    ],
)
def test_bad_records_name_line_and_field(tmp_path: Path, rows: list, kind: str, expected: str) -> None:
    p = _jsonl(tmp_path, rows)
    with pytest.raises(DataError) as err:
        load_records(p, kind)  # type: ignore[arg-type]
    msg = str(err.value)
    assert msg.startswith(str(p)) and expected in msg
    assert "\n" not in msg


def test_empty_file_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty dataset"):
        load_records(p, "prompts")
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.jsonl", "prompts")
    with pytest.raises(DataError, match=r"unknown data format '\.csv'"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_records(tmp_path / "x.csv", "prompts")


def test_preferences_pairs_ranked_conversational_and_implicit_prompt(tmp_path: Path) -> None:
    chat_prompt = [{"role": "user", "content": "Q?"}]
    p = _jsonl(
        tmp_path,
        [
            {"prompt": "p", "chosen": "good", "rejected": "bad", "margin": 0.5, "weight": 0.8, "src": "a"},
            {
                "prompt": chat_prompt,
                "chosen": [{"role": "assistant", "content": "yes"}],
                "rejected": [{"role": "assistant", "content": "no"}],
            },
            {
                "chosen": [*chat_prompt, {"role": "assistant", "content": "A1"}],
                "rejected": [*chat_prompt, {"role": "assistant", "content": "A2"}],
            },
            {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranks": [2, 1, 2, 3]},
        ],
    )
    a, b, c, d = load_records(p, "preferences")
    assert isinstance(a, PreferenceGroup)
    assert (a.responses, a.ranks, a.margin, a.weight, a.extra) == (
        ["good", "bad"],
        [1.0, 2.0],
        0.5,
        0.8,
        {"src": "a"},
    )
    assert b.prompt == chat_prompt and b.responses == ["yes", "no"]
    assert c.prompt == chat_prompt and c.responses == ["A1", "A2"]
    # ranks [2, 1, 2, 3]: 1 beats everyone (3 pairs), the two 2s tie and each beats 3 -> 5 pairs
    assert sorted(d.pairs()) == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]


def test_json_parquet_and_datasets_folder_load_the_same(tmp_path: Path) -> None:
    from datasets import Dataset

    rows = [
        {"prompt": "p1", "chosen": "a", "rejected": "b"},
        {"prompt": "p2", "chosen": "c", "rejected": "d"},
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    ds = Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    loaded = [load_records(tmp_path / name, "pairs") for name in ("d.json", "d.parquet", "folder")]
    for recs in loaded:
        assert [(r.prompt, r.responses) for r in recs] == [("p1", ["a", "b"]), ("p2", ["c", "d"])]
    assert loaded[1][1].where.endswith("d.parquet: row 1")


def test_unicode_round_trips(tmp_path: Path) -> None:
    text = "Grüße, 世界 — 🍌 <b>&amp;</b>"
    p = _jsonl(tmp_path, [{"text": text}])
    assert load_records(p, "text")[0].text == text

"""Unpaired feedback: the ``unpaired`` record kind, thumbs from pairs and rankings, token ids of
prompt and answer apart, and the KL rows' pairing."""

from __future__ import annotations

from pathlib import Path

import pytest

from heed.data.io import write_jsonl
from heed.data.records import PreferenceGroup, UnpairedExample, load_records
from heed.data.unpaired import UnpairedCounts, encode_unpaired, kl_partners, unpair, warn_counts
from heed.errors import DataError


def test_thumbs_records_plain_and_conversational(tmp_path: Path) -> None:
    f = tmp_path / "thumbs.jsonl"
    write_jsonl(
        f,
        [
            {"prompt": "Tea?", "completion": "Tea is lovely.", "label": True, "topic": "tea"},
            {
                "prompt": [{"role": "user", "content": "Snow?"}],
                "completion": [{"role": "assistant", "content": "Snow is grey."}],
                "label": False,
                "weight": 0.5,
            },
        ],
    )
    a, b = load_records(f, "unpaired")
    assert a == UnpairedExample("Tea?", "Tea is lovely.", True, 1.0, {"topic": "tea"}, f"{f}:1")
    assert (b.prompt, b.completion, b.label, b.weight) == (
        [{"role": "user", "content": "Snow?"}],
        "Snow is grey.",
        False,
        0.5,
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "q", "completion": "a", "label": 1}', r"label: expected true \(thumbs up\) or false"),
        ('{"prompt": "q", "completion": "a", "label": "yes"}', "label: expected true"),
        ('{"prompt": "q", "completion": "   ", "label": true}', "completion: empty response"),
        ('{"prompt": "q", "label": true}', "completion: missing"),
        ('{"prompt": "q", "completion": "a"}', "label: missing; accepted: prompt \\+ completion \\+ label"),
        ('{"completion": "a", "label": false}', "prompt: missing"),
    ],
)
def test_bad_thumbs_name_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "q", "completion": "a", "label": true}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"bad.jsonl:2: {message}"):
        load_records(f, "unpaired")


def test_pairs_and_rankings_become_thumbs(tmp_path: Path) -> None:
    f = tmp_path / "mixed.jsonl"
    write_jsonl(
        f,
        [
            {"prompt": "p1", "chosen": "good", "rejected": "bad"},
            {"prompt": "p2", "responses": ["r0", "r1", "r2", "r3"], "ranks": [2, 1, 3, 1]},
            {"prompt": "p3", "completion": "ok", "label": True},
        ],
    )
    records = load_records(f, "unpaired")
    assert isinstance(records[0], PreferenceGroup) and isinstance(records[2], UnpairedExample)
    examples, counts = unpair(records)
    # the pair: chosen up, rejected down; the group: best rank 1 (r1, r3) up, worst rank 3 (r2) down,
    # r0 (rank 2) in between left out; then the thumbs record as it is
    assert [(e.prompt, e.completion, e.label) for e in examples] == [
        ("p1", "good", True),
        ("p1", "bad", False),
        ("p2", "r1", True),
        ("p2", "r2", False),
        ("p2", "r3", True),
        ("p3", "ok", True),
    ]
    assert (counts.records, counts.groups, counts.from_groups, counts.middle_skipped) == (1, 2, 5, 1)
    assert examples[0].where == f"{f}:1"


def test_kl_partners_shift_answers_by_one_per_batch() -> None:
    # batches [4, 0, 2] and [1, 3]: row k takes answer k−1, row 0 the batch's last (TRL's rotation
    # [c[-1]] + c[:-1]): 4←2, 0←4, 2←0; 1←3, 3←1
    assert kl_partners([[4, 0, 2], [1, 3]], 5) == [4, 3, 0, 1, 2]
    assert kl_partners([[7]], 8)[7] == 7  # a batch of one has no other answer


def test_rows_join_any_prompt_with_any_answer(micro_sft_model: Path) -> None:
    from heed.models.loading import load_tokenizer

    tok = load_tokenizer(micro_sft_model)
    short = UnpairedExample("Tea?", "Tea is lovely and warm and good.", True)
    long_prompt = UnpairedExample("Tell me everything about snow, please, in detail.", "Snow.", False)
    counts = UnpairedCounts()
    data = encode_unpaired(tok, [short, long_prompt], chat=True, max_length=64, counts=counts)
    (p0, p1), (a0, a1) = data.prompts, data.answers
    assert data.row(0, 0) == (p0 + a0[0], [False] * len(p0) + a0[1])
    assert data.row(1, 1) == (p1 + a1[0], [False] * len(p1) + a1[1])
    # the mismatched row: prompt 1 with answer 0, the mask on answer 0's tokens only
    ids, mask = data.row(1, 0)
    assert ids == p1 + a0[0] and mask == [False] * len(p1) + a0[1]
    assert tok.decode([t for t, m in zip(ids, mask, strict=True) if m], skip_special_tokens=True).strip() == (
        "Tea is lovely and warm and good."
    )
    assert (counts.desirable, counts.undesirable, counts.truncated) == (1, 1, 0)
    # cut at max_length: the short prompt keeps more of the long answer than the long prompt does
    cut = encode_unpaired(
        tok, [short, long_prompt], chat=True, max_length=len(p1) + 2, counts=UnpairedCounts()
    )
    assert len(cut.row(1, 0)[0]) == len(p1) + 2 and cut.row(0, 0)[0] == (p0 + a0[0])[: len(p1) + 2]
    # a prompt that fills max_length leaves no answer token: dropped and counted
    counts = UnpairedCounts()
    left = encode_unpaired(tok, [short, long_prompt], chat=True, max_length=len(p1), counts=counts)
    assert left.examples == [short] and counts.dropped_no_answer == 1
    with pytest.warns(UserWarning, match="1 examples dropped: the prompt fills data.max_length"):
        warn_counts("f.jsonl", counts, len(p1))

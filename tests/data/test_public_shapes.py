"""Public preference-data shapes load, render and train correctly.

Each shape gets a small hand-written sample; the checks are on the rendered text and token ids:
the chat template is applied once, the prompt is not repeated inside the answer, and only the final
answer's tokens carry loss (SFT) or log-probs (DPO). The micro model's template renders a turn as
``<|role|>\\n{content}<|end|>\\n`` and the generation prompt as ``<|assistant|>\\n``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from heed.data.io import write_jsonl
from heed.data.records import PreferenceGroup, SFTExample, load_records
from heed.data.templating import encode_sft

Q = "Tell me about tea."
GOOD, BAD = "Tea is lovely.", "Tea is bad."
USER_Q = {"role": "user", "content": Q}


def turn(role: str, content: str) -> str:
    return f"<|{role}|>\n{content}<|end|>\n"


@pytest.fixture(scope="module")
def tok(micro_sft_model: Path) -> Any:
    from heed.models.loading import load_tokenizer

    return load_tokenizer(micro_sft_model)


def load(tmp_path: Path, rows: list[dict], name: str = "d.jsonl", **kw: Any) -> list[Any]:
    p = tmp_path / name
    write_jsonl(p, rows)
    return load_records(p, "preferences", **kw)


def render(tok: Any, g: PreferenceGroup, i: int = 0) -> tuple[str, str, list[int]]:
    """(the whole text, the trained text, the ids) of prompt + response i as SFT and DPO encode it."""
    ids, mask = encode_sft(
        tok, SFTExample(prompt=g.prompt, completion=g.responses[i], where=g.where), chat=True
    )
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    return tok.decode(ids), trained, ids


def template_ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --- the shapes --------------------------------------------------------------------------------
def test_hh_rlhf_transcripts_split_at_the_last_assistant_turn(tok: Any, tmp_path: Path) -> None:
    history = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: " + Q + "\n\nAssistant:"
    (g,) = load(tmp_path, [{"chosen": f"{history} {GOOD}", "rejected": f"{history} {BAD}"}])
    assert g.prompt == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        USER_Q,
    ]
    assert g.responses == [GOOD, BAD]
    text, trained, ids = render(tok, g)
    expected = turn("user", "Hi there") + turn("assistant", "Hello! How can I help?") + turn("user", Q)
    expected += turn("assistant", GOOD)
    assert text == expected and ids == template_ids(tok, expected)
    # the earlier assistant turn is the prompt's context: only the final answer trains
    assert trained == turn("assistant", GOOD).removeprefix("<|assistant|>\n")


def test_multi_turn_prompt_trains_only_the_final_answer_in_sft_and_dpo(tok: Any) -> None:
    from heed.data.pairs import PairCounts, PreferencePair, encode_pairs

    prompt = [
        USER_Q,
        {"role": "assistant", "content": "It is a drink made from leaves."},
        {"role": "user", "content": "More?"},
    ]
    answer_ids = template_ids(tok, "It warms you.<|end|>\n")
    ids, mask = encode_sft(tok, SFTExample(prompt=prompt, completion="It warms you."), chat=True)
    assert sum(mask) == len(answer_ids) and [t for t, m in zip(ids, mask, strict=True) if m] == answer_ids
    data = encode_pairs(tok, [PreferencePair(prompt, "It warms you.", "No.")], True, 256, PairCounts())
    (c_ids, c_mask), (r_ids, r_mask) = data.chosen[0], data.rejected[0]
    assert [t for t, m in zip(c_ids, c_mask, strict=True) if m] == answer_ids
    assert [t for t, m in zip(r_ids, r_mask, strict=True) if m] == template_ids(tok, "No.<|end|>\n")
    # a plain `messages` chat still trains every assistant turn
    chat = [*prompt, {"role": "assistant", "content": "It warms you."}]
    _, mask = encode_sft(tok, SFTExample(messages=chat), chat=True)
    assert sum(mask) == len(template_ids(tok, "It is a drink made from leaves.<|end|>\n")) + len(answer_ids)


def test_ultrafeedback_binarized_does_not_repeat_the_prompt(tok: Any, tmp_path: Path) -> None:
    row = {
        "prompt": Q,
        "prompt_id": "abc",
        "chosen": [USER_Q, {"role": "assistant", "content": GOOD}],
        "rejected": [USER_Q, {"role": "assistant", "content": BAD}],
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    }
    (g,) = load(tmp_path, [row])
    assert (g.prompt, g.responses) == (Q, [GOOD, BAD])
    assert g.extra == {"prompt_id": "abc", "score_chosen": 8.0, "score_rejected": 3.5}
    text, trained, _ = render(tok, g, 1)
    assert text == turn("user", Q) + turn("assistant", BAD) and text.count(Q) == 1
    assert trained == BAD + "<|end|>\n"


def test_system_turn_inside_chosen_is_kept(tok: Any, tmp_path: Path) -> None:
    system = {"role": "system", "content": "Be brief."}
    row = {
        "prompt": Q,
        "chosen": [system, USER_Q, {"role": "assistant", "content": GOOD}],
        "rejected": [system, USER_Q, {"role": "assistant", "content": BAD}],
    }
    (g,) = load(tmp_path, [row])
    assert g.prompt == [system, USER_Q]
    assert render(tok, g)[0] == turn("system", "Be brief.") + turn("user", Q) + turn("assistant", GOOD)


def test_trl_conversational_explicit_and_implicit_prompt(tok: Any, tmp_path: Path) -> None:
    explicit = {
        "prompt": [USER_Q],
        "chosen": [{"role": "assistant", "content": GOOD}],
        "rejected": [{"role": "assistant", "content": BAD}],
    }
    implicit = {
        "chosen": [USER_Q, {"role": "assistant", "content": GOOD}],
        "rejected": [USER_Q, {"role": "assistant", "content": BAD}],
    }
    a, b = load(tmp_path, [explicit, implicit])
    assert a.prompt == b.prompt == [USER_Q] and a.responses == b.responses == [GOOD, BAD]
    assert render(tok, a) == render(tok, b)
    assert render(tok, a)[0] == turn("user", Q) + turn("assistant", GOOD)


def test_distilabel_input_column_and_rated_generations(tmp_path: Path) -> None:
    pair = {"system": "Be brief.", "input": Q, "chosen": GOOD, "rejected": BAD, "generations": [GOOD, BAD]}
    rated = {
        "instruction": Q,
        "generations": ["Tea is fine.", GOOD, BAD],
        "ratings": [3, 5, 1],
        "model_name": "m",
    }
    a, b = load(tmp_path, [pair, rated])
    assert a.prompt == [{"role": "system", "content": "Be brief."}, USER_Q] and a.responses == [GOOD, BAD]
    assert a.extra == {"generations": [GOOD, BAD]}
    # ratings are higher-is-better; ranks lower-is-better: rank = best rating − rating + 1
    assert (b.prompt, b.responses, b.ranks) == (Q, ["Tea is fine.", GOOD, BAD], [3.0, 1.0, 5.0])
    assert b.extra == {"model_name": "m"}


def argilla_flat(prompt: str, rankings: list[list[str]] | None, status: list[str] | None = None) -> dict:
    """One record as Argilla v2's `records.to_datasets()` / Hub export writes it (flattened)."""
    return {
        "id": "r1",
        "_server_id": "5a9c",
        "prompt": prompt,
        "response1": "Tea is fine.",
        "response2": GOOD,
        "response3": BAD,
        "source": "web",  # a metadata property
        "ranking.responses": rankings,
        "ranking.responses.users": None if rankings is None else ["u1", "u2", "u3"][: len(rankings)],
        "ranking.responses.status": status,
        "ranking.suggestion": ["response1", "response2", "response3"],
        "ranking.suggestion.score": None,
        "ranking.suggestion.agent": "model",
    }


def test_argilla_v2_exports(tmp_path: Path) -> None:
    flat = argilla_flat(
        Q,
        [
            ["response2", "response1", "response3"],
            ["response2", "response3", "response1"],
            ["response3", "response1", "response2"],
        ],
        ["submitted", "submitted", "discarded"],  # the discarded answer does not count
    )
    pending = argilla_flat("Tell me about coffee.", None)
    nested = {  # `records.to_list()` / `to_json()`: fields, responses per question with server-form ranks
        "id": "r2",
        "_server_id": "77aa",
        "fields": {"instruction": Q, "answer-a": GOOD, "answer-b": BAD, "answer-c": "Tea is fine."},
        "metadata": {"source": "forum"},
        "responses": {
            "ranking": [
                {
                    "value": [
                        {"value": "answer-a", "rank": 1},
                        {"value": "answer-c", "rank": 1},
                        {"value": "answer-b", "rank": 2},
                    ],
                    "user_id": "u1",
                    "status": "submitted",
                }
            ]
        },
        "suggestions": {},
        "vectors": {},
    }
    with pytest.warns(UserWarning, match=r"1 of 3 Argilla records skipped: no submitted ranking"):
        a, b = load(tmp_path, [flat, pending, nested])
    # mean rank over the two submitted answers: response1 (2+3)/2, response2 (1+1)/2, response3 (3+2)/2
    assert (a.prompt, a.responses, a.ranks) == (Q, ["Tea is fine.", GOOD, BAD], [2.5, 1.0, 2.5])
    assert a.extra["source"] == "web" and a.extra["argilla_id"] == "r1"
    assert sorted(a.pairs()) == [(1, 0), (1, 2)]  # response1 and response3 tie
    assert (b.prompt, b.responses, b.ranks) == (Q, [GOOD, BAD, "Tea is fine."], [1.0, 2.0, 1.0])
    assert b.extra["source"] == "forum"


def test_argilla_options_must_name_fields(tmp_path: Path) -> None:
    from heed.errors import DataError

    bad = argilla_flat(Q, [["reply-2", "reply-1"]])
    with pytest.raises(
        DataError, match=r":1: ranking.responses: ranks 'reply-1', 'reply-2', not text fields"
    ):
        load(tmp_path, [bad])


def test_ranked_k9_with_ties_in_dpo_and_rm(tmp_path: Path) -> None:
    from heed.data.pairs import expand_pairs
    from heed.train.reward import EncodedGroup

    ranks = [1, 2, 2, 3, 4, 4, 4, 5, 6]
    (g,) = load(tmp_path, [{"prompt": Q, "responses": [f"answer {i}" for i in range(9)], "ranks": ranks}])
    # C(9, 2) = 36 pairs, minus the ties: one among the 2s, C(3, 2) = 3 among the 4s -> 32
    pairs, counts = expand_pairs([g])
    assert (len(pairs), counts.ties_skipped) == (32, 4)
    assert EncodedGroup([[0]] * 9, g.ranks, 0.0, 1.0, 0).num_pairs == 32 == len(g.pairs())


def test_files_tables_and_dataset_dict_splits_load_the_same(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    rows = [
        {
            "prompt": Q,
            "chosen": [USER_Q, {"role": "assistant", "content": GOOD}],
            "rejected": [USER_Q, {"role": "assistant", "content": BAD}],
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        },
        {
            "prompt": "Hi.",
            "chosen": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Go away."}],
            "score_chosen": 9.0,
            "score_rejected": 1.0,
        },
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    DatasetDict(
        {"train_prefs": Dataset.from_list(rows), "test_prefs": Dataset.from_list(rows[:1])}
    ).save_to_disk(str(tmp_path / "uf"))
    want = [(Q, [GOOD, BAD]), ("Hi.", ["Hello!", "Go away."])]
    for name in ("d.json", "d.parquet", "folder"):
        got = load_records(tmp_path / name, "preferences")
        assert [(g.prompt, g.responses) for g in got] == want, name
    # indent=2: "[" on line 1; a record spans 25 lines ({, prompt, chosen [ + 2 messages x 4 lines + ],
    # the same for rejected, 2 scores, }), so the second starts on line 2 + 25
    assert [g.where for g in load_records(tmp_path / "d.json", "preferences")] == [
        f"{tmp_path / 'd.json'}:2",
        f"{tmp_path / 'd.json'}:27",
    ]
    train = load_records(tmp_path / "uf", "preferences", split="train_prefs")
    held = load_records(tmp_path / "uf", "preferences", split="test_prefs")
    assert [(g.prompt, g.responses) for g in train] == want and len(held) == 1


def test_hh_markup_and_rendered_prompts_are_templated_once_with_one_warning(tok: Any, tmp_path: Path) -> None:
    hh = [{"prompt": f"\n\nHuman: {Q}\n\nAssistant:", "chosen": f" {GOOD}", "rejected": f" {BAD}"}] * 2
    rendered = [{"prompt": turn("user", Q) + "<|assistant|>\n", "chosen": GOOD, "rejected": BAD}] * 2
    once = turn("user", Q) + turn("assistant", GOOD)
    for name, rows, expected in (
        ("hh.jsonl", hh, "carry their own 'Human:'/'Assistant:' markup"),
        ("rendered.jsonl", rendered, "already rendered with the chat template"),
    ):
        groups = load(tmp_path, rows, name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            texts = [render(tok, g) for g in groups]
        assert len(caught) == 1, [str(w.message) for w in caught]  # once per file, for two records
        msg = str(caught[0].message)
        assert msg.startswith(f"{tmp_path / name}: prompts ") and expected in msg
        assert msg.endswith(f"(first at {tmp_path / name}:1)")
        for text, trained, ids in texts:
            assert text == once and ids == template_ids(tok, once), name
            assert trained == GOOD + "<|end|>\n"


def test_every_shape_trains_through_dpo_and_the_reward_model(micro_sft_model: Path, tmp_path: Path) -> None:
    """One file mixing every shape trains DPO; a DatasetDict folder trains the reward model by split."""
    from datasets import Dataset, DatasetDict

    from heed.config import config_from_dict
    from heed.config.dpo import DPOConfig
    from heed.config.reward import RMConfig
    from heed.train.dpo import train_dpo
    from heed.train.reward import train_reward

    history = f"\n\nHuman: {Q}\n\nAssistant:"
    mixed = [
        {"chosen": f"{history} {GOOD}", "rejected": f"{history} {BAD}"},
        {
            "prompt": Q,
            "chosen": [USER_Q, {"role": "assistant", "content": GOOD}],
            "rejected": [USER_Q, {"role": "assistant", "content": BAD}],
            "score_chosen": 8.0,
            "score_rejected": 2.0,
        },
        {
            "prompt": [USER_Q],
            "chosen": [{"role": "assistant", "content": GOOD}],
            "rejected": [{"role": "assistant", "content": BAD}],
        },
        {"input": "Hi.", "chosen": "Hello!", "rejected": "Go away."},
        {"instruction": "Hi.", "generations": ["Hello!", "Go away.", "Hm."], "ratings": [5, 1, 3]},
        argilla_flat(Q, [["response2", "response1", "response3"]]),
        {"prompt": Q, "responses": [f"Tea {i}." for i in range(9)], "ranks": [1, 2, 2, 3, 4, 4, 4, 5, 6]},
    ]
    train = tmp_path / "mixed.jsonl"
    write_jsonl(train, mixed)
    summary = train_dpo(
        config_from_dict(
            DPOConfig,
            {
                "model": {"path": str(micro_sft_model)},
                "data": {"train": str(train), "eval": str(train), "max_length": 64},
                "train": {"batch_size": 8, "max_steps": 2},
                "log": {"progress": False},
                "sample": {"num_prompts": 0},
                "out": str(tmp_path / "dpo"),
            },
        )
    )
    # pairs: 1 + 1 + 1 + 1 + 3 (generations) + 3 (argilla, strict) + 32 (K=9, 4 ties)
    assert summary["data/train/pairs"] == 42 and summary["data/train/ties_skipped"] == 4
    assert summary["loss"] == pytest.approx(0.6931, abs=0.05)  # the policy starts as the reference

    uf = tmp_path / "uf"
    DatasetDict(
        {"train_prefs": Dataset.from_list(mixed[1:2] * 4), "test_prefs": Dataset.from_list(mixed[1:2])}
    ).save_to_disk(str(uf))
    rm = train_reward(
        config_from_dict(
            RMConfig,
            {
                "model": {"path": str(micro_sft_model)},
                "data": {
                    "train": str(uf),
                    "split": "train_prefs",
                    "eval": str(uf),
                    "eval_split_name": "test_prefs",
                },
                "train": {"batch_size": 2, "max_steps": 2},
                "log": {"progress": False},
                "out": str(tmp_path / "rm"),
            },
        )
    )
    assert (rm["train_groups"], rm["eval_groups"], rm["dropped_groups"]) == (4, 1, 0)

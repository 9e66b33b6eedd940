"""`heed annotate generate`: sample answers from a (tiny, locally built) policy and import them."""

from __future__ import annotations

import json

import pytest

from heed.feedback.generate import pick_pair


def test_pick_pair() -> None:
    # scores 0, 5, 5.5, 9: the closest pair is (5, 5.5) -> answers 1 and 2
    def score(prompts: list, responses: list[str]) -> list[float]:
        return [{"a": 0.0, "b": 5.0, "c": 5.5, "d": 9.0}[r] for r in responses]

    assert pick_pair(["a", "b", "c", "d"], score, "q") == ["b", "c"]
    assert pick_pair(["a", "a", "c"], None, "q") == ["a", "c"]  # first two distinct


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):  # type: ignore[no-untyped-def]
    pytest.importorskip("transformers")
    from heed.models.loading import save_pretrained
    from heed.models.tiny import build_model, tiny_llama_config, train_tokenizer

    texts = ["the cat sat on the mat", "a dog ran in the park", "你好 世界"] * 50
    tok = train_tokenizer(texts, vocab_size=300)
    model = build_model(
        tiny_llama_config(
            tok, num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2
        ),
        seed=0,
    )
    return save_pretrained(model, tok, tmp_path_factory.mktemp("policy") / "model")


def test_generate_command_imports_samples(tiny_policy, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from heed.cli import main
    from heed.feedback.service import Feedback

    db = str(tmp_path / "a.db")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "topic": "t"}) + "\n" for p in ["the cat", "a dog"]))
    main(["annotate", "project", "create", "r", "--task", "ranking", "--db", db])
    main(
        [
            "annotate",
            "generate",
            "--project",
            "r",
            "--model",
            str(tiny_policy),
            "--prompts",
            str(prompts),
            "--num-samples",
            "3",
            "--max-new-tokens",
            "8",
            "--db",
            db,
        ]
    )
    assert "imported 2 generated records" in capsys.readouterr().out
    fb = Feedback(db)
    rec = fb.record("r", 1)
    assert rec["prompt"] == "the cat" and len(rec["responses"]) == 3 and rec["metadata"]["topic"] == "t"
    fb.close()


def test_generate_for_a_binary_project_makes_one_record_per_answer(tiny_policy, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from heed.feedback.generate import generate_records
    from heed.feedback.service import Feedback

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat"}\n{"prompt": "a dog"}\n', encoding="utf-8")
    records = generate_records(tiny_policy, prompts, 3, "binary", max_new_tokens=6, seed=1)
    assert records and all(set(r) == {"prompt", "response", "metadata"} for r in records)
    assert 2 <= len(records) <= 6  # up to three distinct answers per prompt
    fb = Feedback(f"sqlite:///{tmp_path / 'g.db'}")
    fb.create_project("b", "binary")
    assert fb.import_records("b", records) == len(records)
    fb.close()

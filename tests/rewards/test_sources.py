"""Reward sources: callables by name, weighted sums, None handling and the errors users see."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from heed.config import config_from_dict
from heed.config.rl import RewardSpec
from heed.errors import ConfigError, TrainingDivergedError
from heed.rewards import RewardError, RewardSet, RewardSource, build_rewards, resolve_callable


def _spec(**kw):
    return config_from_dict(RewardSpec, kw)


def test_file_and_module_functions(tmp_path: Path) -> None:
    f = tmp_path / "my_rewards.py"
    f.write_text(
        "def shout(prompts, completions, **cols):\n    return [float(c.count('!')) for c in completions]\n"
    )
    fn = resolve_callable(f"{f}:shout")
    assert fn(["p"], ["hi!!"]) == [2.0]
    # relative to the config's folder
    assert resolve_callable("my_rewards.py:shout", base_dir=tmp_path)(["p"], ["!"]) == [1.0]
    assert resolve_callable("heed.rewards.builtin:banana_success")(["p"], ["Sure: a banana"]) == [1.0]


@pytest.mark.parametrize(
    "ref, needle",
    [
        ("no_such_builtin", "expected a built-in"),
        ("heed.nope:fn", "cannot import module"),
        ("heed.rewards.builtin:nope", "has no function 'nope'"),
        ("missing.py:fn", "not found"),
    ],
)
def test_bad_names(ref: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        resolve_callable(ref)


def test_weighted_sum_none_and_per_source() -> None:
    a = RewardSource("a", lambda p, c, **k: [1.0, 2.0, None], weight=2.0)
    b = RewardSource("b", lambda p, c, **k: [0.5, -1.0, 3.0], weight=1.0)
    out = RewardSet([a, b])(["p"] * 3, ["x", "y", "z"])
    # 2*1 + 0.5 = 2.5; 2*2 - 1 = 3; None anywhere -> None
    assert out.total == [2.5, 3.0, None]
    assert out.means() == {"reward/a": 1.5, "reward/b": pytest.approx(2.5 / 3)}


def test_columns_reach_the_function() -> None:
    seen = {}

    def fn(prompts, completions, topic, **kw):
        seen["topic"] = topic
        return [0.0] * len(completions)

    RewardSet([RewardSource("f", fn)])(["p", "q"], ["x", "y"], {"topic": ["chess", "tea"]})
    assert seen["topic"] == ["chess", "tea"]


def test_errors_name_the_function_and_completion() -> None:
    def picky(prompts, completions, **kw):
        return [1.0 / len(c) for c in completions]  # ZeroDivisionError on the empty answer

    with pytest.raises(
        RewardError, match=r"step 3: reward 'picky' raised ZeroDivisionError.*completion #1: ''"
    ):
        RewardSet([RewardSource("picky", picky)])(["p", "p"], ["ok", ""], step=3)
    with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
        RewardSet([RewardSource("short", lambda p, c, **k: [1.0])])(["p", "p"], ["a", "b"])
    with pytest.raises(RewardError, match=r"returned 'yes' \(str\) for completion #0"):
        RewardSet([RewardSource("words", lambda p, c, **k: ["yes"])])(["p"], ["a"])
    with pytest.raises(TrainingDivergedError, match="step 7: reward 'nan' is nan"):
        RewardSet([RewardSource("nan", lambda p, c, **k: [math.nan])])(["p"], ["a"], step=7)


def test_build_from_specs_and_spec_validation() -> None:
    rs = build_rewards(
        [
            _spec(function="banana_format"),
            _spec(function="length_penalty", weight=0.5, args={"per_word": 1.0}),
        ]
    )
    out = rs(["p"], ["Sure: a banana"])
    # banana_format: 1 + 1 - 0.015 = 1.985; length_penalty: -3 words * 1.0 * weight 0.5 = -1.5
    assert out.total[0] == pytest.approx(0.485)
    with pytest.raises(ConfigError, match="exactly one of function, model, pipeline"):
        _spec(function="banana_format", model="x")
    assert _spec(model="runs/rm/final/").display_name == "final"


def test_pipeline_source(tmp_path: Path) -> None:
    """A real (tiny, untrained) text-classification model folder loaded through transformers.pipeline."""
    from transformers import BertForSequenceClassification

    from heed.models.loading import save_pretrained
    from heed.models.tiny import tiny_encoder_config, train_tokenizer
    from heed.rewards.sources import pipeline_source

    tok = train_tokenizer(["good day", "bad day", "a fine time"] * 5, vocab_size=300)
    tok.model_input_names = ["input_ids", "attention_mask"]
    cfg = tiny_encoder_config(tok, size="micro", num_labels=2)
    cfg.id2label, cfg.label2id = {0: "NEGATIVE", 1: "POSITIVE"}, {"NEGATIVE": 0, "POSITIVE": 1}
    save_pretrained(BertForSequenceClassification(cfg), tok, tmp_path / "clf")
    signed = pipeline_source(str(tmp_path / "clf"), {"POSITIVE": 1.0, "NEGATIVE": -1.0})(
        ["p"] * 2, ["good day", "bad day"]
    )
    label_only = pipeline_source(str(tmp_path / "clf"), {"POSITIVE": 1.0, "NEGATIVE": 0.0}, use_score=False)(
        ["p"] * 2, ["good day", "bad day"]
    )
    assert all(0.5 <= abs(v) <= 1.0 for v in signed)  # top label's probability, signed
    assert [v > 0 for v in signed] == [v == 1.0 for v in label_only]
    with pytest.raises(ConfigError, match="not labels of this classifier"):
        pipeline_source(str(tmp_path / "clf"), {"HAPPY": 1.0})


def test_reward_model_source(tmp_path: Path) -> None:
    """A one-label sequence-classification folder scored through heed.load_reward_model (branch rm)."""
    pytest.importorskip("heed.models.reward")
    import torch
    from transformers import LlamaForSequenceClassification

    import heed
    from heed.models.loading import save_pretrained
    from heed.models.tiny import tiny_llama_config, train_tokenizer
    from heed.rewards.sources import reward_model_source

    tok = train_tokenizer(["good day", "bad day", "a fine time"] * 5, vocab_size=300)
    cfg = tiny_llama_config(tok, size="micro", num_labels=1)
    torch.manual_seed(0)
    save_pretrained(LlamaForSequenceClassification(cfg), tok, tmp_path / "rm")
    fn = reward_model_source(str(tmp_path / "rm"))
    got = fn(["p", "q"], ["good day", "bad day"])
    want = heed.load_reward_model(str(tmp_path / "rm")).score(["p", "q"], ["good day", "bad day"])
    assert got == pytest.approx(want) and len(got) == 2

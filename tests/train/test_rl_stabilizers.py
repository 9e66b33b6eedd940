"""The stabilisers inside ``heed rl`` on the micro model: DAPO's dynamic sampling (drops, refills,
warning, exact resume), overlong filtering and penalty, GSPO, the adaptive entropy bonus, TIS on
recomputed log-probs, process rewards on step-end tokens (hand-made case and a PPO run), and the
one-line errors of bad settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from heed.config import config_from_dict
from heed.config.base import set_dotted
from heed.config.rl import RLConfig
from heed.demo.builtin import resolve_config
from heed.errors import ConfigError
from heed.train.rl import train_rl

pytestmark = pytest.mark.usefixtures("one_thread")

# 1 for an answer of at most 3 words: the micro model's K = 4 answers to a prompt are often all
# longer (a group with no variance), sometimes mixed
SHORT = "def reward(prompts, completions, **cols):\n    return [float(len(c.split()) <= 3) for c in completions]\n"


def _cfg(out: Path, **over: Any) -> RLConfig:
    base: dict[str, Any] = {
        "algorithm": "grpo",
        "model": {"path": "builtin:micro"},
        "data": {"prompts": "builtin:micro:prompts_train"},
        "rewards": [{"function": "length_penalty", "args": {"per_word": 0.1}}],
        "rollout": {"prompts_per_step": 4, "k": 4, "max_new_tokens": 8},
        "optim": {"lr": 5e-4},
        "train": {"updates": 3},
        "log": {"progress": False},
        "out": str(out),
    }
    for key, value in over.items():
        set_dotted(base, key, value)
    return resolve_config(config_from_dict(RLConfig, base, "test"))


def _rows(run: Path) -> list[dict[str, Any]]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["split"] == "train"]


def _short_reward(tmp_path: Path) -> str:
    path = tmp_path / "short.py"
    path.write_text(SHORT)
    return f"{path}:reward"


ALL_ON = {
    "rollout.dynamic_sampling": True,
    "rollout.dynamic_sampling_rounds": 4,
    "overlong.filter": True,
    "overlong.penalty_cache": 2,
    "update.ratio_level": "sequence",
    "update.entropy_target": 9.0,  # above the micro model's ~6 nats: the coefficient rises every update
    "update.entropy_coef_lr": 0.01,
    "rollout.reuse_logprobs": False,
    "rollout.correction": "tis",
    "train.updates": 3,
    "log.save_every": 1,
    "log.keep_checkpoints": 3,
}


def test_every_stabilizer_on_and_an_exact_resume(tmp_path: Path) -> None:
    """Dynamic sampling drops the groups whose answers all score alike and refills the batch from new
    prompts; the run is a pure function of its seed, so resuming from update 1 retraces updates 2-3
    (refill prompts, draws and the entropy coefficient included)."""
    reward = [{"function": _short_reward(tmp_path), "name": "short"}]
    train_rl(_cfg(tmp_path / "straight", rewards=reward, **ALL_ON))
    rows = _rows(tmp_path / "straight")
    assert sum(r["dynamic/dropped_groups"] for r in rows) > 0
    assert sum(r["dynamic/extra_prompts"] for r in rows) > 0
    for r in rows:
        assert r["dynamic/kept_groups"] == 4  # filled every time (4 extra rounds at most)
        assert 0 <= r["overlong/truncated_frac"] <= 1
        # TIS on recomputed log-probs of the same weights: every weight is 1 up to float noise
        assert abs(r["correction/weight_mean"] - 1) < 1e-4 and r["correction/capped_frac"] == 0
    coefs = [r["entropy/coef"] for r in rows]
    assert coefs[0] == 0 and coefs[1] > 0 and coefs[2] > coefs[1]  # entropy below target: α grows
    # resume from update 1: drop the later checkpoints and the final model, as if the run stopped there
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    for ckpt in (tmp_path / "resumed" / "checkpoints").glob("step-*"):
        if ckpt.name != "step-1":
            shutil.rmtree(ckpt)
    shutil.rmtree(tmp_path / "resumed" / "final")
    train_rl(_cfg(tmp_path / "resumed", rewards=reward, **ALL_ON), resume=True)
    again = _rows(tmp_path / "resumed")
    assert [r["step"] for r in again] == [1, 2, 3]
    for a, b in zip(rows[1:], again[1:], strict=True):
        for key in ("reward/mean", "dynamic/dropped_groups", "dynamic/extra_prompts", "entropy/coef"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        assert a["kl/k1"] == pytest.approx(b["kl/k1"], abs=1e-4)


def test_dynamic_sampling_that_cannot_fill_warns_and_trains_on_what_there_is(tmp_path: Path) -> None:
    const = tmp_path / "const.py"
    const.write_text("def reward(prompts, completions, **cols):\n    return [1.0 for _ in completions]\n")
    cfg = _cfg(
        tmp_path / "run",
        rewards=[{"function": f"{const}:reward", "name": "const"}],
        **{"rollout.dynamic_sampling": True, "rollout.dynamic_sampling_rounds": 2, "train.updates": 1},
    )
    with pytest.warns(
        UserWarning, match=r"update 1: dynamic sampling found 0 of 4 informative groups after 2 extra"
    ):
        train_rl(cfg)
    (row,) = _rows(tmp_path / "run")
    # every group dropped: round 0 (4 prompts), then 4 and 4 more (no informative group to estimate from)
    assert row["dynamic/dropped_groups"] == 12 and row["dynamic/extra_prompts"] == 8
    assert row["dynamic/kept_groups"] == 4  # the first round's groups, advantages 0


def test_overlong_penalty_is_logged_and_added_to_the_reward(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path / "run", **{"overlong.penalty_cache": 4, "overlong.penalty_weight": 0.5, "train.updates": 1}
    )
    train_rl(cfg)
    (row,) = _rows(tmp_path / "run")
    # reward = length penalty + overlong penalty; the answers near 8 tokens get up to −0.5
    assert -0.5 <= row["reward/overlong"] < 0
    assert row["reward/mean"] == pytest.approx(
        row["reward/length_penalty"] + row["reward/overlong"], abs=1e-5
    )


@pytest.mark.parametrize(
    "over, message",
    [
        ({"overlong.penalty_cache": 9}, "overlong.penalty_cache: 9 tokens exceed rollout.max_new_tokens"),
        ({"algorithm": "reinforce", "rollout.dynamic_sampling": True}, "rollout.dynamic_sampling"),
        ({"algorithm": "ppo", "update.ratio_level": "sequence"}, "update.ratio_level: sequence"),
        ({"rollout.correction": "tis"}, "rollout.correction: tis weighs.*reuse_logprobs: false"),
        ({"rewards": [{"model": "m", "step_delimiter": "\n"}]}, "step_delimiter"),
    ],
)
def test_bad_stabilizer_settings_are_one_line_errors(
    tmp_path: Path, over: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path / "x", **over)


# ------------------------------------------------------------------ process rewards


def test_step_ends_on_the_micro_tokenizer() -> None:
    from archs import micro_tokenizer
    from heed.rewards.steps import split_steps, step_end_tokens

    tok = micro_tokenizer()
    text = "Sure: one\ntwo\nbanana"
    ids = tok.encode(text, add_special_tokens=False)
    # the tokens are  S | ure | : | ␣one | \n | t | w | o | \n | b | anana  (indices 0-10): the first
    # step ends on the first newline (4), the second on the second (8), the last on the last token (10)
    assert [tok.decode([i]) for i in ids][4] == "\n" and len(ids) == 11
    assert step_end_tokens(tok, ids, text, "\n") == [4, 8, 10]
    assert split_steps(text + "\n", "\n") == [
        "Sure: one",
        "two",
        "banana",
    ]  # a trailing delimiter ends a step
    assert split_steps("", "\n") == [""]
    assert step_end_tokens(tok, [], "", "\n") == [-1]


def test_step_scores_are_checked_per_answer() -> None:
    from heed.rewards.combine import RewardError, RewardSet, RewardSource

    def per_step(prompts: list[str], completions: list[str], **_: Any) -> list[Any]:
        return (
            [[1.0] * len(c.split("\n")) for c in completions[:1]] + [[0.5]] + [None] * (len(completions) - 2)
        )

    batch = RewardSet([RewardSource("prm", per_step, 2.0, "\n")])(["p"] * 3, ["a\nb", "c", "d"])
    assert batch.total == [4.0, 1.0, None] and batch.per_source["prm"] == [2.0, 0.5, None]
    assert batch.steps["prm"] == [[1.0, 1.0], [0.5], None]
    with pytest.raises(
        RewardError, match=r"returned 1 step scores for completion #1, which has 2 steps split on '\\n'"
    ):
        RewardSet([RewardSource("prm", per_step, 1.0, "\n")])(["p"] * 2, ["a", "b\nc"])


def test_ppo_learns_from_per_word_step_rewards(tmp_path: Path) -> None:
    """Each word (a step, split on spaces) costs 0.1, given on the token that ends it: PPO learns to
    answer shorter, as with the same penalty given once at the end."""
    prm = tmp_path / "prm.py"
    prm.write_text(
        "def reward(prompts, completions, **cols):\n    return [[-0.1] * len(c.split(' ')) for c in completions]\n"
    )
    cfg = _cfg(
        tmp_path / "ppo",
        algorithm="ppo",
        rewards=[{"function": f"{prm}:reward", "name": "prm", "step_delimiter": " "}],
        **{
            "rollout.prompts_per_step": 8,
            "rollout.max_new_tokens": 16,
            "train.updates": 6,
            "update.epochs": 2,
            "update.minibatch_size": 16,
            "ppo.critic_lr": 3e-3,
        },
    )
    train_rl(cfg)
    rewards = [r["reward/mean"] for r in _rows(tmp_path / "ppo")]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.1, rewards

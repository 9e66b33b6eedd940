"""heed rl on the micro model: every algorithm learns, resume continues the same run, bad input stops cleanly.

The micro model is too weak for the banana task in a few updates, so the smoke tests reward short
answers (length_penalty), which a policy learns within a handful of updates by ending earlier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from heed.config import config_from_dict, load_config
from heed.config.base import set_dotted
from heed.config.rl import RLConfig
from heed.demo.builtin import resolve_config
from heed.errors import ConfigError, DataError, HeedError, TrainingDivergedError
from heed.train.common import latest_checkpoint
from heed.train.rl import train_rl

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(out: Path, **over: Any) -> RLConfig:
    base: dict[str, Any] = {
        "model": {"path": "builtin:micro"},
        "data": {"prompts": "builtin:micro:prompts_train"},
        "rewards": [{"function": "length_penalty", "args": {"per_word": 0.1}}],
        "rollout": {"prompts_per_step": 8, "k": 4, "max_new_tokens": 16},
        "optim": {"lr": 5e-4},
        "train": {"updates": 6},
        "log": {"progress": False},
        "out": str(out),
    }
    for key, value in over.items():
        set_dotted(base, key, value)
    return resolve_config(config_from_dict(RLConfig, base, "test"))


def _train_rows(run: Path) -> list[dict[str, Any]]:
    return [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"
    ]


PPO = {"update.epochs": 2, "update.minibatch_size": 16, "ppo.critic_lr": 3e-3}


@pytest.mark.parametrize("algo, extra", [("rloo", {}), ("grpo", {}), ("reinforce", {}), ("ppo", PPO)])
def test_every_algorithm_learns(tmp_path: Path, algo: str, extra: dict[str, Any]) -> None:
    summary = train_rl(_cfg(tmp_path / algo, algorithm=algo, **extra))
    rows = _train_rows(tmp_path / algo)
    rewards = [r["reward/mean"] for r in rows]
    first, last = sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2
    assert last > first + 0.1, rewards  # answers got shorter: reward rose
    for key in (
        "kl/k1",
        "kl/k3",
        "clipfrac",
        "approx_kl/k1",
        "approx_kl/k3",
        "entropy",
        "length/mean",
        "reward/std",
        "diversity/distinct_2",
        "kl/beta",
    ):
        assert key in rows[-1], key
    # where each update's time went: the steps' own timers, which together fit inside the update
    parts = ("time/generate", "time/reward", "time/logprobs", "time/advantages", "time/update")
    for r in rows:
        assert all(r[p] >= 0 for p in parts) and r["time/generate"] > 0 and r["time/update"] > 0
        assert sum(r[p] for p in parts) <= r["time/step"] + 1e-6
    if algo == "ppo":
        assert "explained_variance" in rows[-1] and "value_loss" in rows[-1]
        # the sampler's log-probs are the old ones: the values come from the policy's body alone
        assert "rollout/logprob_diff" not in rows[-1]
        assert (tmp_path / algo / "final" / "value_head.pt").exists()
    else:
        # one epoch over the whole batch with the sampler's log-probs as the old ones: ratio 1 up to float noise
        assert all(abs(r["ratio"] - 1) < 1e-3 for r in rows) and "rollout/logprob_diff" not in rows[-1]
    assert summary["algo"] == algo and (tmp_path / algo / "final" / "config.json").exists()
    assert (tmp_path / algo / "alarms.jsonl").exists()


def test_resume_continues_the_same_run(tmp_path: Path) -> None:
    """A run stopped by a NaN reward at update 3 keeps its update-2 checkpoint; resuming it reproduces
    the uninterrupted run's updates 3-4."""
    bomb = tmp_path / "bomb.py"
    bomb.write_text(
        "calls = 0\n"
        "def reward(prompts, completions, **cols):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    return [float('nan') if calls == 3 else -0.1 * len(c.split()) for c in completions]\n"
    )
    common = {
        "train.updates": 4,
        "log.save_every": 1,
        "log.keep_checkpoints": 1,
        "rollout.prompts_per_step": 4,
        "rollout.max_new_tokens": 8,
    }
    train_rl(_cfg(tmp_path / "straight", **common))
    crashed = _cfg(
        tmp_path / "resumed", rewards=[{"function": f"{bomb}:reward", "name": "length_penalty"}], **common
    )
    with pytest.raises(TrainingDivergedError, match="step 3: reward 'length_penalty' is nan"):
        train_rl(crashed)
    ckpt = latest_checkpoint(tmp_path / "resumed")
    assert ckpt is not None and ckpt.name == "step-2" and (ckpt / "config.json").exists()
    train_rl(_cfg(tmp_path / "resumed", **common), resume=True)
    a, b = _train_rows(tmp_path / "straight"), _train_rows(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a[2:], b[2:], strict=True):
        assert ra["reward/mean"] == pytest.approx(rb["reward/mean"], abs=1e-6)
        assert ra["kl/k1"] == pytest.approx(rb["kl/k1"], abs=1e-4)


def test_ppo_ptx_separate_critic_adaptive_kl_and_eval(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path / "run",
        algorithm="ppo",
        **{
            "train.updates": 2,
            "rollout.prompts_per_step": 4,
            "ppo.critic": "separate",
            "ptx.data": "builtin:micro:text",
            "ptx.coef": 0.5,
            "ptx.batch_size": 4,
            "kl.adaptive": True,
            "kl.target": 0.01,
            "kl.horizon": 100,
            "data.eval_prompts": "builtin:micro:prompts_eval",
            "eval.num_prompts": 8,
            "eval.samples": 3,
            "eval.metrics": [{"function": "banana_success"}],
            "eval.gold": [{"function": "builtin:gold_positivity", "name": "positivity"}],
        },
    )
    summary = train_rl(cfg)
    rows = _train_rows(tmp_path / "run")
    assert all(r["ptx_loss"] > 0 for r in rows)
    # KL above target (0.01) on update 1 -> beta grows: 0.05 * (1 + 0.2 * 16 / 100) = 0.0516
    assert rows[1]["kl/beta"] == pytest.approx(0.05 * (1 + 0.2 * 16 / 100)) or rows[0]["kl/k1"] <= 0.01
    for key in (
        "eval/banana_success",
        "eval/kl",
        "eval/entropy",
        "eval/distinct_1",
        "eval/distinct_2",
        "eval/length",
        "gold/positivity",
        "eval/reward/length_penalty",
        "start/eval/kl",
    ):
        assert key in summary, key
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["policy"] for s in samples} == {"sft", "ppo"} and {
        "step",
        "prompt",
        "completion",
        "reward",
        "gold",
    } <= set(samples[0])


def test_second_round_continues_from_a_ppo_policy(tmp_path: Path) -> None:
    """Round 2 starts from round 1's final/ (policy and value head), with the SFT model as reference."""
    small = {"algorithm": "ppo", "train.updates": 2, "rollout.prompts_per_step": 4, "ppo.critic_lr": 1e-2}
    train_rl(_cfg(tmp_path / "round1", **small))
    train_rl(
        _cfg(
            tmp_path / "round2",
            **{
                **small,
                "train.updates": 1,
                "model.path": str(tmp_path / "round1" / "final"),
                "ref_model": "builtin:micro",
            },
        )
    )
    first = _train_rows(tmp_path / "round2")[0]
    assert first["values/mean"] != 0.0  # a fresh value head is zero-initialised: this one was loaded
    assert first["kl/k1"] != 0.0  # the policy starts away from its reference


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="algorithm"):
        load_config(
            RLConfig,
            None,
            ["algorithm=ppg", "model.path=x", "data.prompts=x", "rewards=[{function: banana_format}]"],
        )
    with pytest.raises(ConfigError, match="expected a built-in"):
        train_rl(_cfg(tmp_path / "a", rewards=[{"function": "banana"}]))
    with pytest.raises(DataError, match=r"prompts_train.jsonl:1: prompt: \d+ tokens, over the limit of 2"):
        train_rl(_cfg(tmp_path / "b", **{"data.max_prompt_length": 2}))
    bad = tmp_path / "bad.py"
    bad.write_text("def r(prompts, completions, **k):\n    return [1.0]\n")
    with pytest.raises(HeedError, match=r"step 1: reward 'r' returned 1 values for 32 completions"):
        train_rl(_cfg(tmp_path / "c", rewards=[{"function": f"{bad}:r"}]))
    with pytest.raises(ConfigError, match=r"rollout\.k"):
        _cfg(tmp_path / "d", algorithm="rloo", **{"rollout.k": 1})


def test_cli_rl_and_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from heed.cli import main

    cfg = tmp_path / "rl.yaml"
    cfg.write_text(
        "algorithm: rloo\nmodel: {path: 'builtin:micro'}\n"
        "data: {prompts: 'builtin:micro:prompts_train', eval_prompts: 'builtin:micro:prompts_eval'}\n"
        "rewards: [{function: banana_format}]\nrollout: {prompts_per_step: 2, k: 2, max_new_tokens: 8}\n"
        "train: {updates: 1}\neval: {num_prompts: 4, at_start: false, metrics: [{function: banana_success}]}\n"
        "log: {progress: false}\n"
    )
    main(["rl", "--config", str(cfg), "--out", str(tmp_path / "run")])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "eval/banana_success" in summary and "eval/kl" in summary
    capsys.readouterr()
    main(
        [
            "eval",
            "--model",
            str(tmp_path / "run" / "final"),
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["eval/banana_success"] <= 1.0 and (tmp_path / "ev" / "eval.json").exists()
    with pytest.raises(SystemExit) as exc:
        main(["rl", "--config", str(cfg), "--out", str(tmp_path / "run")])  # folder holds a run: refuse
    assert exc.value.code == 2


@pytest.mark.parametrize("algo", ["rloo", "ppo"])
def test_shared_prompt_and_engine_logprobs_change_nothing_but_speed(tmp_path: Path, algo: str) -> None:
    """The fast paths (prompt run once per group, the sampler's log-probs as the old ones, PPO's values
    from the body alone) against the plain ones (row-by-row forwards, recomputed log-probs with the
    values): the same first update up to float noise. Sampling is keyed per answer, so both runs draw
    the same answers."""
    common = {"train.updates": 2, "rollout.prompts_per_step": 4, "algorithm": algo}
    fast = _cfg(tmp_path / "fast", **common)
    plain = _cfg(
        tmp_path / "plain", **common, **{"rollout.share_prompt": False, "rollout.reuse_logprobs": False}
    )
    train_rl(fast)
    train_rl(plain)
    a, b = _train_rows(tmp_path / "fast")[0], _train_rows(tmp_path / "plain")[0]
    assert a["reward/mean"] == b["reward/mean"] and a["length/mean"] == b["length/mean"]
    keys = ["kl/k1", "loss", "policy_loss", "entropy", "grad_norm"]
    if algo == "ppo":  # the old values too: from the value head over the body's hidden states
        keys += ["value_loss", "values/mean", "returns/mean", "explained_variance"]
    for key in keys:
        assert a[key] == pytest.approx(b[key], abs=1e-4, rel=1e-4), key
    assert b["rollout/logprob_diff"] < 1e-4 and "rollout/logprob_diff" not in a


def test_evaluation_draws_are_the_same_every_time(tmp_path: Path) -> None:
    """Evaluation samples are keyed by prompt: a policy that does not change (lr 1e-12) gives the
    same answers before and after training, although training consumed random numbers in between,
    so a change between two evaluations is the policy's."""
    cfg = _cfg(
        tmp_path / "e",
        **{
            "data.eval_prompts": "builtin:micro:prompts_eval",
            "eval.num_prompts": 12,
            "eval.temperature": 1.0,
            "eval.at_start": True,
            "optim.lr": 1e-12,
            "train.updates": 2,
        },
    )
    summary = train_rl(cfg)
    assert summary["start/eval/reward"] == summary["eval/reward"]
    assert summary["start/eval/length"] == summary["eval/length"]

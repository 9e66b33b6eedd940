"""heed.train.online_dpo and heed.train.rs on the micro model with a rule judge: online DPO raises the
judge's reward and the chosen-vs-rejected margin, iterative rounds save their policies and pairs,
rejection sampling keeps the argmax of the scores and its SFT step lowers their loss; bad inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from heed.config import config_from_dict
from heed.config.online import OnlineDPOConfig
from heed.config.rs import RSConfig
from heed.errors import ConfigError
from heed.rewards.combine import RewardError

pytestmark = pytest.mark.usefixtures("one_thread")

# a rule judge: shorter answers are better (−words), a signal the micro model can learn in a few steps;
# `unscored` returns None for every answer; `shorter` appends the answers of each call it scores to
# seen.jsonl beside itself (for the argmax check)
JUDGES = """
import json, pathlib

def shorter(prompts, completions, **columns):
    with open(pathlib.Path(__file__).with_name("seen.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(completions) + chr(10))
    return [-float(len(c.split())) for c in completions]

def unscored(prompts, completions, **columns):
    return [None] * len(completions)

def every_other(prompts, completions, **columns):
    return [None if i % 4 == 0 else -float(len(c.split())) for i, c in enumerate(completions)]
"""


@pytest.fixture
def judges(tmp_path: Path) -> Path:
    f = tmp_path / "judges.py"
    f.write_text(JUDGES, encoding="utf-8")
    return f


def online_config(
    model: Path, corpus: dict[str, Path], judge: str | None, out: Path, **over: Any
) -> OnlineDPOConfig:
    cfg: dict[str, Any] = {
        "model": {"path": str(model)},
        "data": {"prompts": str(corpus["prompts_train"]), "eval_prompts": str(corpus["prompts_eval"])},
        "rewards": [{"name": "judge", "function": judge}] if judge else [],
        "loss": {"beta": 0.1},
        "rollout": {"max_new_tokens": 24},
        "train": {"updates": 16, "prompts_per_step": 8},
        "optim": {"lr": 2e-4, "schedule": "constant"},
        "eval": {"num_prompts": 24, "temperature": 1.0},
        "log": {"progress": False},
        "out": str(out),
    }
    for key, value in over.items():
        node = cfg
        *path, leaf = key.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config_from_dict(OnlineDPOConfig, cfg)


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_online_dpo_raises_the_judges_reward_and_the_margin(
    micro_sft_model: Path, corpus_files: dict[str, Path], judges: Path, tmp_path: Path
) -> None:
    from heed.train.online_dpo import train_online_dpo

    run = tmp_path / "run"
    summary = train_online_dpo(online_config(micro_sft_model, corpus_files, f"{judges}:shorter", run))
    train = [m for m in metrics(run) if m.get("split", "train") == "train"]
    assert len(train) == 16
    # step 1: the policy is the reference, so every implicit reward, the margin and KL are 0 and the loss log 2
    assert abs(train[0]["dpo/margin"]) < 1e-4 and abs(train[0]["loss"] - 0.6931) < 1e-3
    assert abs(train[0]["kl/k1"]) < 1e-3
    late = train[-4:]
    assert sum(m["dpo/margin"] for m in late) / 4 > 0.05  # the chosen answers gained on the rejected ones
    assert sum(m["dpo/accuracy"] for m in late) / 4 > 0.6
    # the judge's reward on held-out prompts, the same draws for the initial and the tuned policy
    assert summary["eval/reward"] > summary["start/eval/reward"] + 2.0
    assert summary["kl/k1"] > 0
    for m in train:  # chosen always scored above rejected; every pair accounted for
        assert m["online/reward_chosen"] > m["online/reward_rejected"]
        assert m["online/selected"] + m["online/ties"] + m["online/unscored"] == 8
    assert summary["data/selected"] + summary["data/ties"] + summary["data/unscored"] == 16 * 8
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["policy"] for s in samples} == {"initial", "online_dpo"}
    assert (run / "final" / "config.json").is_file()


def test_best_vs_worst_of_four_answers(
    micro_sft_model: Path, corpus_files: dict[str, Path], judges: Path, tmp_path: Path
) -> None:
    from heed.train.online_dpo import train_online_dpo

    run = tmp_path / "run"
    cfg = online_config(
        micro_sft_model,
        corpus_files,
        f"{judges}:shorter",
        run,
        rollout__num_samples=4,
        train__updates=2,
        train__prompts_per_step=4,
        eval__num_prompts=0,
    )
    train_online_dpo(cfg)
    first = next(m for m in metrics(run) if m.get("split", "train") == "train")
    calls = [json.loads(line) for line in (judges.with_name("seen.jsonl")).read_text().splitlines()]
    answers = calls[0]  # update 1: 4 prompts x 4 answers, prompt-major
    assert len(answers) == 16
    scores = [[-float(len(a.split())) for a in answers[4 * i : 4 * i + 4]] for i in range(4)]
    kept = [s for s in scores if max(s) > min(s)]  # a prompt whose answers all score the same is a tie
    assert first["online/selected"] == len(kept) and first["online/ties"] == 4 - len(kept)
    # the pair of each prompt: its best against its worst answer
    assert first["online/reward_chosen"] == pytest.approx(sum(max(s) for s in kept) / len(kept))
    assert first["online/reward_rejected"] == pytest.approx(sum(min(s) for s in kept) / len(kept))
    assert first["online/reward"] == pytest.approx(sum(sum(s) for s in scores) / 16)


def test_iterative_rounds_save_each_policy_and_its_pairs(
    micro_sft_model: Path, corpus_files: dict[str, Path], judges: Path, tmp_path: Path
) -> None:
    from heed.train.online_dpo import train_online_dpo

    run = tmp_path / "run"
    cfg = online_config(
        micro_sft_model,
        corpus_files,
        f"{judges}:shorter",
        run,
        iterative={"rounds": 2, "prompts_per_round": 32, "batch_size": 16, "epochs": 2},
        eval__num_prompts=8,
    )
    summary = train_online_dpo(cfg)
    assert summary["steps"] == 2 * 4  # 2 rounds x 2 epochs x 32 pairs / 16
    for rnd in (1, 2):
        folder = run / f"round-{rnd}"
        assert (folder / "config.json").is_file()
        pairs = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
        assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
        assert json.loads((folder / "round.json").read_text())["round"] == rnd
    # round 2 samples with round 1's policy: its answers are shorter (the judge's reward is higher)
    assert summary["round-2/dpo/margin"] > 0
    r1, r2 = (json.loads((run / f"round-{r}" / "round.json").read_text()) for r in (1, 2))
    assert r2["round/reward"] > r1["round/reward"]


def test_rejection_sampling_keeps_the_argmax_and_sft_lowers_its_loss(
    micro_sft_model: Path, corpus_files: dict[str, Path], judges: Path, tmp_path: Path
) -> None:
    from heed.train.rs import RS_DATA, train_rs

    run = tmp_path / "rs"
    cfg = config_from_dict(
        RSConfig,
        {
            "model": {"path": str(micro_sft_model)},
            "data": {
                "prompts": str(corpus_files["prompts_train"]),
                "eval_prompts": str(corpus_files["prompts_eval"]),
            },
            "rewards": [{"name": "judge", "function": f"{judges}:shorter"}],
            "rollout": {"num_samples": 4, "max_new_tokens": 24},
            "train": {"prompts_per_round": 24, "batch_size": 8, "epochs": 2},
            "optim": {"lr": 1e-3, "schedule": "constant"},
            "eval": {"num_prompts": 8},
            "log": {"progress": False},
            "out": str(run),
        },
    )
    summary = train_rs(cfg)
    calls = [json.loads(line) for line in judges.with_name("seen.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (run / RS_DATA).read_text().splitlines()]
    assert len(records) == 24 and summary["records"] == 24
    # the judge's first call scored the round's 4 answers of each prompt, prompt-major
    assert len(calls[0]) == 24 * 4
    for i, rec in enumerate(records):
        answers = calls[0][4 * i : 4 * i + 4]
        scores = [-len(a.split()) for a in answers]
        assert rec["completion"] == answers[scores.index(max(scores))]
        assert rec["reward"] == max(scores) and rec["mean_reward"] == sum(scores) / 4
    assert summary["rs/best_reward"] > summary["rs/reward"]
    assert summary["rs/sft_loss_after"] < summary["rs/sft_loss_before"] - 0.2
    assert (run / "round-1" / "config.json").is_file() and (run / "final" / "config.json").is_file()


def test_a_judge_that_scores_nothing_stops_the_run(
    micro_sft_model: Path, corpus_files: dict[str, Path], judges: Path, tmp_path: Path
) -> None:
    from heed.train.online_dpo import train_online_dpo

    cfg = online_config(
        micro_sft_model,
        corpus_files,
        f"{judges}:unscored",
        tmp_path / "r",
        train__updates=5,
        train__prompts_per_step=2,
    )
    with pytest.raises(RewardError, match=r"steps 1-3: reward 'judge' returned None for every answer"):
        train_online_dpo(cfg)


def test_unscored_pairs_are_skipped_and_counted(
    micro_sft_model: Path, corpus_files: dict[str, Path], judges: Path, tmp_path: Path
) -> None:
    from heed.train.online_dpo import train_online_dpo

    cfg = online_config(
        micro_sft_model,
        corpus_files,
        f"{judges}:every_other",
        tmp_path / "r",
        train__updates=2,
        eval__num_prompts=0,
    )
    summary = train_online_dpo(cfg)
    # None on rows 0, 4, 8, 12 of each step's 16 answers: pairs 0, 2, 4, 6 of 8 are unscored
    assert summary["data/unscored"] == 2 * 4
    assert summary["data/selected"] + summary["data/ties"] == 2 * 4


def test_config_errors() -> None:
    base = {"model": {"path": "m"}, "data": {"prompts": "p.jsonl"}}
    with pytest.raises(ConfigError, match=r"^rewards: online DPO needs a judge"):
        config_from_dict(OnlineDPOConfig, base)
    with pytest.raises(ConfigError, match=r"^rollout.num_samples: .* at least 2 \(got 1\)"):
        config_from_dict(
            RSConfig, {**base, "rewards": [{"function": "f.py:f"}], "rollout": {"num_samples": 1}}
        )
    with pytest.raises(ConfigError, match=r"^rewards: rejection sampling needs a judge"):
        config_from_dict(RSConfig, base)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["online-dpo", "--set", "model.path=m", "--set", "data.prompts=p.jsonl"],
            "rewards: online DPO needs a judge",
        ),
        (
            [
                "rs",
                "--set",
                "model.path=m",
                "--set",
                "data.prompts=p.jsonl",
                "--set",
                "rewards=[{function: f.py:f}]",
                "--set",
                "rollout.num_samples=1",
            ],
            "rollout.num_samples",
        ),
    ],
)
def test_cli_errors_are_one_line(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    from heed.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.match(rf"error: {re.escape(expected)}", err)


def test_online_resume_retraces_the_run(
    micro_sft_model: Path, corpus_files: dict[str, Path], judges: Path, tmp_path: Path
) -> None:
    import shutil

    from heed.train.online_dpo import train_online_dpo

    over = {"train__updates": 4, "train__prompts_per_step": 4, "log__save_every": 2, "eval__num_prompts": 0}
    a, b = tmp_path / "a", tmp_path / "b"
    train_online_dpo(online_config(micro_sft_model, corpus_files, f"{judges}:shorter", a, **over))
    shutil.copytree(a, b)  # b: as if killed after step 3, its last checkpoint step-2
    shutil.rmtree(b / "final")
    (b / "metrics.jsonl").write_text("".join((a / "metrics.jsonl").read_text().splitlines(True)[:3]))
    train_online_dpo(
        online_config(micro_sft_model, corpus_files, f"{judges}:shorter", b, **over), resume=True
    )
    full, resumed = metrics(a), metrics(b)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for x, y in zip(
        full[2:], resumed[2:], strict=True
    ):  # steps 3-4 redone from step-2: the same answers and loss
        assert x["online/reward"] == y["online/reward"]
        assert abs(x["loss"] - y["loss"]) < 1e-5

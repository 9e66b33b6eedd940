"""heed.train.reward: the K-wise reward-model loop, its data handling, resume and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from heed.config import config_from_dict
from heed.config.reward import RMConfig
from heed.data.io import write_jsonl
from heed.data.records import PreferenceGroup
from heed.demo.preferences import make_ranked_groups
from heed.errors import ConfigError, DataError
from heed.report.metrics import read_metrics
from heed.train.reward import EncodedGroup, make_reward_fn, split_by_prompt, stack_groups, train_reward


def rm_config(model_path: Path, data: Path, out: Path, **sections) -> RMConfig:
    raw = {
        "model": {"path": str(model_path)},
        "data": {"train": str(data), "eval_split": 0.2},
        "train": {"batch_size": 16, "epochs": 1},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "log": {"progress": False, "log_every": 1},
        "out": str(out),
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_dict(RMConfig, raw)


@pytest.fixture(scope="module")
def groups_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rmdata") / "groups.jsonl"
    write_jsonl(path, make_ranked_groups(200, k=4, seed=0))
    return path


@pytest.fixture(scope="module")
def small_groups_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rmdata") / "small.jsonl"
    write_jsonl(path, make_ranked_groups(80, k=4, seed=1))
    return path


def test_stack_groups_reshapes_ragged_k():
    # groups of K=2 and K=3 -> (2, 3) with the last slot of the first group masked out
    groups = [
        EncodedGroup([[1], [2]], [1.0, 2.0], 0.5, 1.0, 0),
        EncodedGroup([[3], [4], [5]], [2.0, 1.0, 3.0], 0.0, 2.0, 2),
    ]
    b = stack_groups(groups, torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0]))
    assert b["mask"].tolist() == [[True, True, False], [True, True, True]]
    assert b["rewards"][b["mask"]].tolist() == [10.0, 11.0, 12.0, 13.0, 14.0]
    assert b["ranks"].tolist() == [[1.0, 2.0, 0.0], [2.0, 1.0, 3.0]]
    assert b["margins"].tolist() == [0.5, 0.0] and b["weights"].tolist() == [1.0, 2.0]


def test_one_forward_of_k_responses_per_group(micro_sft_model: Path):
    """G groups of K responses cost one forward, not 2 sequences per pair: G·K padded rows, or with
    ``share_prompt`` G packed rows, each holding its group's shared prompt once."""
    from heed.models.reward import build_reward_model, mask_free

    model, tok, _ = build_reward_model(micro_sft_model)
    assert mask_free(model)  # probed once, before the forwards are counted
    calls: list[tuple[int, int]] = []
    for module in (model, model.model):  # the whole model (padded rows) and its trunk (packed rows)
        module.register_forward_pre_hook(
            lambda m, args, kwargs: calls.append(
                tuple(kwargs.get("input_ids", args[0] if args else None).shape)
            ),
            with_kwargs=True,
        )
    # 3 groups of 4 responses: a 2-token prompt [5, 6], then one token each (3 × C(4,2) = 18 pairs)
    groups = [
        EncodedGroup([[5, 6, 7 + j] for j in range(4)], [1.0, 2.0, 3.0, 4.0], 0.0, 1.0, 4 * i)
        for i in range(3)
    ]
    rewards = make_reward_fn(model, tok.pad_token_id, "cpu", None, None, share_prompt=False)(groups)
    assert calls == [(12, 3), (12, 3)] and rewards.shape == (12,)  # the model's forward, then its trunk's
    calls.clear()
    make_reward_fn(model, tok.pad_token_id, "cpu", None, None, share_prompt=True)(groups)  # probes once
    calls.clear()
    shared = make_reward_fn(model, tok.pad_token_id, "cpu", None, None, share_prompt=True)(groups)
    assert calls == [(3, 6)]  # one row per group: 2 prompt tokens + 4 answer tokens
    assert torch.allclose(shared, rewards, atol=1e-5)


def test_eval_split_is_by_prompt_and_seeded():
    groups = [PreferenceGroup(f"prompt {i % 10}", ["a", "b"], [1.0, 2.0]) for i in range(40)]
    train, held = split_by_prompt(groups, 0.2, seed=1)
    assert {g.prompt for g in train}.isdisjoint({g.prompt for g in held})
    assert len({g.prompt for g in held}) == 2 and len(held) == 8  # 20% of 10 prompts, 4 groups each
    assert split_by_prompt(groups, 0.2, seed=1)[1] == held
    assert split_by_prompt(groups, 0.2, seed=2)[1] != held


@pytest.mark.parametrize(
    "record,message",
    [
        (
            {"prompt": "p", "responses": ["a"], "ranks": [1]},
            "responses: a ranked group needs at least 2 responses, got 1",
        ),
        ({"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2, 3]}, "ranks: 3 ranks for 2 responses"),
        ({"prompt": "p", "responses": ["a", "b"], "ranks": [2, 2]}, "ranks: all responses are tied"),
    ],
)
def test_bad_groups_are_one_line_errors(record, message, tmp_path: Path, micro_sft_model: Path):
    data = tmp_path / "bad.jsonl"
    write_jsonl(data, [{"prompt": "q", "chosen": "x", "rejected": "y"}, record])
    with pytest.raises(DataError) as err:
        train_reward(rm_config(micro_sft_model, data, tmp_path / "run"))
    assert str(err.value).startswith(f"{data}:2: {message}") and "\n" not in str(err.value)


def test_scratch_needs_backbone_and_tokenizer(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"model\.backbone must be decoder or encoder"):
        config_from_dict(RMConfig, {"model": {"init": "scratch", "tokenizer": "t"}, "data": {"train": "x"}})


def test_training_learns_the_hidden_preference(micro_sft_model: Path, groups_file: Path, tmp_path: Path):
    """Held-out pairwise accuracy climbs from chance; final/ loads with plain transformers."""
    from transformers import AutoModelForSequenceClassification

    from heed.models.reward import load_reward_model

    out = tmp_path / "run"
    cfg = rm_config(
        micro_sft_model, groups_file, out, train={"epochs": 2}, log={"eval_every": 5, "log_every": 1}
    )
    summary = train_reward(cfg)
    rows = read_metrics(out)
    evals = [r for r in rows if r["split"] == "eval"]
    train = [r for r in rows if r["split"] == "train"]
    assert {
        "rm/eval_loss",
        "rm/accuracy",
        "rm/top1_accuracy",
        "rm/kendall_tau",
        "rm/reward_mean",
        "rm/reward_std",
    } <= set(evals[-1])
    assert evals[0]["step"] == 5 and evals[-1]["step"] == summary["steps"]
    assert summary["rm/accuracy"] >= 0.8, summary  # chance is 0.5
    assert summary["rm/eval_loss"] < evals[0]["rm/eval_loss"] < 0.69
    assert sum(r["loss"] for r in train[-5:]) < sum(r["loss"] for r in train[:5])
    stats = json.loads((out / "final" / "reward_stats.json").read_text())
    assert stats["split"] == "eval" and stats["count"] == 4 * summary["eval_groups"]
    assert abs(stats["mean"] - summary["rm/reward_mean"]) < 1e-6
    assert {"config.yaml", "metrics.jsonl", "summary.json", "final"} <= {p.name for p in out.iterdir()}
    hf = AutoModelForSequenceClassification.from_pretrained(str(out / "final"))
    assert hf.config.num_labels == 1 and hf.config.heed_chat is True
    rm = load_reward_model(out / "final")
    good, bad = rm.score(
        ["How do you feel about tea?"] * 2,
        [
            "Tea is wonderful and full of joy.",
            "Tea often leads to frustration. Most people regret spending time on tea. Honestly, tea is disappointing.",
        ],
    )
    assert good > bad


def test_frozen_backbone_trains_only_the_head_and_resumes(
    micro_sft_model: Path, small_groups_file: Path, tmp_path: Path
):
    """Head-only training on cached features; a run resumed from step 3 ends exactly like an uninterrupted one."""
    from heed.models.loading import load_causal_lm
    from heed.models.reward import load_reward_model

    out = tmp_path / "frozen"
    cfg = rm_config(
        micro_sft_model,
        small_groups_file,
        out,
        model={"freeze_backbone": True, "head": "mlp"},
        train={"max_steps": 6},
        optim={"lr": 3e-3, "schedule": "constant", "warmup_steps": 0},
        log={"save_every": 3, "log_every": 1},
    )
    summary = train_reward(cfg)
    assert summary["frozen_backbone"] and summary["rm/accuracy"] > 0.6
    uninterrupted = {r["step"]: r["loss"] for r in read_metrics(out) if r["split"] == "train"}
    rm = load_reward_model(out / "final")
    lm = load_causal_lm(micro_sft_model)
    for (
        name,
        p,
    ) in (
        lm.model.state_dict().items()
    ):  # the trunk did not move (its final norm now sits after the head block)
        if name != "norm.weight":
            torch.testing.assert_close(rm.model.model.state_dict()[name], p, rtol=0, atol=0)
    assert rm.model.config.num_hidden_layers == lm.config.num_hidden_layers + 1  # the MLP head block
    assert (out / "checkpoints" / "step-3").is_dir()
    resumed = train_reward(cfg, resume=True)  # continues from checkpoints/step-3
    again = {r["step"]: r["loss"] for r in read_metrics(out) if r["split"] == "train"}
    assert sorted(again) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert abs(again[step] - uninterrupted[step]) < 1e-6
    assert abs(resumed["rm/eval_loss"] - summary["rm/eval_loss"]) < 1e-6


def test_cli_train_and_score(micro_sft_model: Path, small_groups_file: Path, tmp_path: Path, capsys):
    from heed.cli import main

    out = tmp_path / "cli-run"
    main(
        [
            "rm",
            "train",
            "--set",
            f"model.path={micro_sft_model}",
            "--set",
            f"data.train={small_groups_file}",
            "--set",
            "model.freeze_backbone=true",
            "--set",
            "train.max_steps=3",
            "--set",
            "log.progress=false",
            "--out",
            str(out),
        ]
    )
    capsys.readouterr()
    main(
        [
            "rm",
            "score",
            "--model",
            str(out / "final"),
            "--prompt",
            "Tea?",
            "--response",
            "Tea is lovely.",
            "--response",
            "Tea is bad.",
        ]
    )
    lines = capsys.readouterr().out.split()
    assert len(lines) == 2 and all(float(x) == float(x) for x in lines)
    data = tmp_path / "answers.jsonl"
    write_jsonl(
        data,
        [
            {"prompt": "Tea?", "response": "Tea is lovely.", "id": 7},
            {"prompt": "Tea?", "responses": ["Tea is lovely.", "Tea is bad."]},
        ],
    )
    main(
        [
            "rm",
            "score",
            "--model",
            str(out / "final"),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "scored.jsonl"),
        ]
    )
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert scored[0]["id"] == 7 and abs(scored[0]["score"] - float(lines[0])) < 1e-5
    assert [round(s, 5) for s in scored[1]["scores"]] == [round(float(x), 5) for x in lines]


def test_cli_score_rejects_a_causal_lm(micro_sft_model: Path, capsys):
    from heed.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["rm", "score", "--model", str(micro_sft_model), "--prompt", "p", "--response", "r"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not a reward model" in err and "\n" not in err


def test_scratch_encoder_reward_model(micro_sft_model: Path, small_groups_file: Path, tmp_path: Path):
    """init: scratch builds a new BERT-style reward model with the given tokenizer and trains it."""
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "scratch"
    cfg = rm_config(
        micro_sft_model,
        small_groups_file,
        out,
        model={
            "init": "scratch",
            "path": None,
            "backbone": "encoder",
            "size": "micro",
            "tokenizer": str(micro_sft_model),
        },
        train={"max_steps": 2},
    )
    summary = train_reward(cfg)
    assert summary["backbone"] == "encoder" and summary["steps"] == 2
    hf = AutoModelForSequenceClassification.from_pretrained(str(out / "final"))
    assert type(hf).__name__ == "BertForSequenceClassification" and hf.config.num_labels == 1


def test_shipped_config_loads():
    from heed.config import load_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(RMConfig, root / "configs" / "rm.yaml", ["model.path=m", "data.train=d.jsonl"])
    assert cfg.model.path == "m" and cfg.data.train == "d.jsonl" and cfg.model.head == "linear"


def test_every_config_field_is_read():
    """A config knob that nothing reads is a bug: each field is used as `.name` by the RM code."""
    import inspect

    import heed.cli.rm_cmds
    import heed.data.records
    import heed.models.reward
    import heed.train.common
    import heed.train.reward

    source = "".join(
        inspect.getsource(m)
        for m in (
            heed.train.reward,
            heed.train.common,
            heed.models.reward,
            heed.cli.rm_cmds,
            heed.data.records,
        )
    )
    from heed.config.reward import RMDataConfig, RMModelConfig, RMTrainConfig

    for section in (RMModelConfig, RMDataConfig, RMTrainConfig):
        for name in section.model_fields:
            assert f".{name}" in source, f"{section.__name__}.{name} is never read"
    for name in ("lr", "weight_decay", "betas", "eps", "warmup_steps", "max_grad_norm"):
        assert f".{name}" in source, name


def test_continue_from_an_existing_reward_model(
    micro_sft_model: Path, small_groups_file: Path, tmp_path: Path
):
    """A reward model folder is a starting point: its head is kept, not replaced by a new one."""
    from safetensors.torch import load_file

    first = tmp_path / "first"
    train_reward(
        rm_config(
            micro_sft_model, small_groups_file, first, model={"freeze_backbone": True}, train={"max_steps": 2}
        )
    )
    second = tmp_path / "second"
    summary = train_reward(
        rm_config(
            first / "final",
            small_groups_file,
            second,
            model={"freeze_backbone": True},
            train={"max_steps": 1},
            optim={"lr": 1e-12, "warmup_steps": 0},
        )
    )
    before = load_file(first / "final" / "model.safetensors")["score.weight"]
    after = load_file(second / "final" / "model.safetensors")["score.weight"]
    torch.testing.assert_close(after, before, atol=1e-9, rtol=0)  # lr ~0: the head is the trained one
    assert summary["backbone"] == "decoder"

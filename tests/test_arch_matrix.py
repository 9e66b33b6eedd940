"""Every causal architecture through every command, on the real CLI entry point.

For each tiny random-weight model of ``tests/archs.py``: ``sft`` (full and LoRA with the default
settings), ``dpo``, ``rm train``, ``rl`` (PPO, RLOO, GRPO), ``generate``, ``eval`` and ``rm score``;
every ``final/`` loads with plain ``transformers`` Auto classes. The commands run in this process
through ``heed.cli.main`` (the same code path as the ``heed`` script, without a Python start-up per
command); a command that fails prints its one-line error and the test names the command.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archs import CAUSAL, causal_model_dir
from heed.data.io import write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Tell me about cats.", "How do you feel about rain?", "Name a fruit.", "What is a river?"]
ANSWERS = ["I like them a lot.", "It is fine, I think.", "A banana is good.", "Water that flows."]

REWARDS_PY = '''
def length(prompts, completions, **columns):
    """A rule reward: longer answers score higher (bounded), so RL has something to move."""
    return [min(len(c.split()), 8) / 8.0 for c in completions]
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matrix-data")
    chat = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
        for p, a in zip(PROMPTS * 4, ANSWERS * 4, strict=True)
    ]
    pairs = [
        {"prompt": p, "chosen": a, "rejected": ANSWERS[(i + 1) % len(ANSWERS)]}
        for i, (p, a) in enumerate(zip(PROMPTS * 2, ANSWERS * 2, strict=True))
    ]
    ranked = [
        {"prompt": p, "responses": [a, *(ANSWERS[(i + j) % 4] for j in (1, 2))], "ranks": [1, 2, 3]}
        for i, (p, a) in enumerate(zip(PROMPTS * 2, ANSWERS * 2, strict=True))
    ]
    paths = {
        "chat": root / "chat.jsonl",
        "pairs": root / "pairs.jsonl",
        "ranked": root / "ranked.jsonl",
        "prompts": root / "prompts.jsonl",
        "rewards": root / "rewards.py",
    }
    write_jsonl(paths["chat"], chat)
    write_jsonl(paths["pairs"], pairs)
    write_jsonl(paths["ranked"], ranked)
    write_jsonl(paths["prompts"], [{"prompt": p} for p in PROMPTS])
    paths["rewards"].write_text(REWARDS_PY)
    return paths


def heed(*args: str) -> None:
    """Run one ``heed`` command in this process; fail with the command and its exit code."""
    from heed.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        if exc.code not in (0, None):
            pytest.fail(f"heed {' '.join(map(str, args))} exited {exc.code}")


def rl_config(path: Path, data: dict[str, Path], algorithm: str) -> Path:
    import yaml

    cfg = {
        "algorithm": algorithm,
        "data": {"prompts": str(data["prompts"]), "eval_prompts": str(data["prompts"])},
        "rewards": [{"function": f"{data['rewards']}:length"}],
        "rollout": {"prompts_per_step": 2, "k": 2, "max_new_tokens": 12},
        "update": {"epochs": 1, "micro_batch_size": 4},
        "train": {"updates": 2},
        "eval": {"num_prompts": 2, "max_new_tokens": 8, "at_start": False},
        "log": {"eval_every": 0, "save_every": 0, "log_every": 1, "progress": False},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


TRAIN_SETS = ["--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "log.progress=false"]


@pytest.mark.parametrize("arch", list(CAUSAL))
def test_every_command_on_every_architecture(
    arch: str, data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp(f"matrix-{arch}")
    model = causal_model_dir(arch, root / "models")
    runs = root / "runs"
    base = ["--set", f"model.path={model}"]

    heed("sft", *base, "--set", f"data.train={data['chat']}", *TRAIN_SETS, "--out", runs / "sft")
    AutoModelForCausalLM.from_pretrained(runs / "sft" / "final")
    heed(
        "sft",
        *base,
        "--set",
        f"data.train={data['chat']}",
        "--set",
        "model.lora.r=4",
        *TRAIN_SETS,
        "--out",
        runs / "sft-lora",
    )
    heed("dpo", *base, "--set", f"data.train={data['pairs']}", *TRAIN_SETS, "--out", runs / "dpo")
    AutoModelForCausalLM.from_pretrained(runs / "dpo" / "final")
    heed("rm", "train", *base, "--set", f"data.train={data['ranked']}", *TRAIN_SETS, "--out", runs / "rm")
    AutoModelForSequenceClassification.from_pretrained(runs / "rm" / "final")

    for algorithm in ("ppo", "rloo", "grpo"):
        cfg = rl_config(root / f"{algorithm}.yaml", data, algorithm)
        heed("rl", "--config", cfg, *base, "--out", runs / algorithm)
        AutoModelForCausalLM.from_pretrained(runs / algorithm / "final")
        summary = json.loads((runs / algorithm / "summary.json").read_text())
        assert summary, f"{algorithm}: empty summary"

    generated = root / "generated.jsonl"
    heed(
        "generate",
        "--model",
        runs / "sft" / "final",
        "--prompts",
        data["prompts"],
        "--num-samples",
        "2",
        "--max-new-tokens",
        "8",
        "--out",
        generated,
    )
    rows = [json.loads(line) for line in generated.read_text().splitlines()]
    assert len(rows) == len(PROMPTS) and all(len(r["responses"]) == 2 for r in rows)

    heed(
        "eval",
        "--model",
        runs / "rloo" / "final",
        "--config",
        root / "rloo.yaml",
        *base,
        "--out",
        root / "eval",
    )
    assert (root / "eval" / "eval.json").exists()

    heed(
        "rm",
        "score",
        "--model",
        runs / "rm" / "final",
        "--prompt",
        PROMPTS[0],
        "-r",
        ANSWERS[0],
        "-r",
        ANSWERS[1],
    )

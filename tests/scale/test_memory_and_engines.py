"""Memory savers and engine choice: gradient checkpointing in PPO's value-head path, bf16 autocast
through accelerate, offload_ref, and one-line errors for vllm / fp16 where they cannot run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from heed.config import config_from_dict
from heed.config.rl import RLConfig
from heed.demo.builtin import resolve_config
from heed.errors import ConfigError, HeedError

torch.set_num_threads(1)


def _rl(out: Path, **over: Any) -> RLConfig:
    base: dict[str, Any] = {
        "algorithm": "ppo",
        "model": {"path": "builtin:micro"},
        "data": {"prompts": "builtin:micro:prompts_train"},
        "rewards": [{"function": "length_penalty", "args": {"per_word": 0.1}}],
        "rollout": {"prompts_per_step": 4, "k": 2, "max_new_tokens": 12},
        "optim": {"lr": 1e-3},
        "ppo": {"critic_lr": 3e-3},
        "train": {"updates": 2},
        "eval": {"at_start": False},
        "log": {"progress": False},
        "out": str(out),
    }
    base.update(over)
    return resolve_config(config_from_dict(RLConfig, base, "test"))


def test_ppo_value_head_with_gradient_checkpointing_matches_without(tmp_path: Path) -> None:
    """Recomputing activations changes memory, not maths: same losses and values to float noise."""
    from heed.report.metrics import read_metrics
    from heed.train.rl import train_rl

    runs = {}
    for gc in (False, True):
        out = tmp_path / f"gc{gc}"
        train_rl(_rl(out, model={"path": "builtin:micro", "gradient_checkpointing": gc}, offload_ref=True))
        runs[gc] = [r for r in read_metrics(out) if r["split"] == "train"]
    for a, b in zip(runs[False], runs[True], strict=True):
        for key in ("loss", "value_loss", "values/mean", "kl/k1"):
            assert abs(a[key] - b[key]) < 1e-4, (key, a[key], b[key])
    assert runs[True][-1]["value_loss"] > 0


def test_sft_in_bf16_autocast_learns(tmp_path: Path, micro_sft_model: Path, corpus_files: dict) -> None:
    from heed.config.sft import SFTConfig
    from heed.report.metrics import read_metrics
    from heed.train.sft import train_sft

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(corpus_files["chat"].read_text().splitlines(keepends=True)[:64]))
    cfg = config_from_dict(
        SFTConfig,
        {
            "model": {"path": str(micro_sft_model), "mixed_precision": "bf16"},
            "data": {"train": str(data), "max_length": 64, "eval_split": 0.0},
            "train": {"batch_size": 16, "max_steps": 8},
            "optim": {"lr": 3e-3},
            "log": {"log_every": 1, "progress": False},
            "out": str(tmp_path / "run"),
        },
    )
    train_sft(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    # 4 batches per epoch: epoch 2 sees the same batches as epoch 1, with lower loss
    assert sum(losses[4:]) < sum(losses[:4]), losses


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU errors")
def test_vllm_and_fp16_without_a_gpu_are_one_line_errors(tmp_path: Path) -> None:
    from heed.train.rl import train_rl
    from heed.train.sft import train_sft

    with pytest.raises(ConfigError) as err:
        train_rl(_rl(tmp_path / "v", rollout={"engine": "vllm"}))
    assert "\n" not in str(err.value) and "GPU" in str(err.value) and "engine: heed" in str(err.value)
    from heed.config.sft import SFTConfig

    cfg = config_from_dict(
        SFTConfig,
        {
            "model": {"path": "m", "mixed_precision": "fp16"},
            "data": {"train": "x"},
            "out": str(tmp_path / "s"),
        },
    )
    with pytest.raises(HeedError, match=r"fp16 needs a GPU.*bf16"):
        train_sft(cfg)

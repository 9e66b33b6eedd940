"""Reward model with LoRA: adapters on the backbone, the new score head trains in full; final/ is the
merged plain reward model (so `heed rm score` and RL reward sources load it), adapter/ the adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from heed.config import config_from_dict
from heed.config.reward import RMConfig
from heed.data.io import write_jsonl
from heed.errors import ConfigError

torch.set_num_threads(1)


def test_reward_model_with_lora_learns_and_final_is_plain(micro_sft_model: Path, tmp_path: Path) -> None:
    from heed.demo.preferences import make_ranked_groups
    from heed.models.reward import load_reward_model
    from heed.report.metrics import read_metrics
    from heed.train.reward import train_reward

    data = tmp_path / "groups.jsonl"
    write_jsonl(data, make_ranked_groups(120, k=4, seed=0))
    cfg = config_from_dict(
        RMConfig,
        {
            "model": {
                "path": str(micro_sft_model),
                "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
            },
            "data": {"train": str(data), "eval_split": 0.2},
            "train": {"batch_size": 16, "epochs": 2},
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            "log": {"progress": False, "log_every": 1},
            "out": str(tmp_path / "run"),
        },
    )
    summary = train_reward(cfg)
    train = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert sum(r["loss"] for r in train[-4:]) < sum(r["loss"] for r in train[:4])
    assert summary["rm/accuracy"] > 0.6, summary  # chance is 0.5
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    rm = load_reward_model(tmp_path / "run" / "final")  # a plain reward-model folder
    assert abs(rm.score(["How is tea?"], ["Tea is wonderful."])[0]) < 1e4


def test_lora_with_frozen_backbone_or_mlp_head_is_a_config_error() -> None:
    for extra in ({"freeze_backbone": True}, {"head": "mlp"}):
        with pytest.raises(ConfigError, match=r"model\.lora"):
            config_from_dict(RMConfig, {"model": {"path": "m", "lora": {}, **extra}, "data": {"train": "x"}})

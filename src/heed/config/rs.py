"""Config of ``heed rs``: rejection sampling (best-of-N answers become SFT data, Llama 2's recipe)."""

from __future__ import annotations

from pydantic import Field, model_validator

from heed.config.base import HeedConfig, ModelConfig, OptimConfig
from heed.config.online import (
    JudgedEvalConfig,
    OnlineLogConfig,
    PromptDataConfig,
    SamplingConfig,
    check_judge,
)
from heed.config.rl import RewardSpec
from heed.errors import ConfigError


class RSSamplingConfig(SamplingConfig):
    """N answers per prompt from the current policy."""

    num_samples: int = Field(
        8, description="N: answers sampled per prompt; the best-scored one is kept (N >= 2)."
    )


class RSTrainConfig(HeedConfig):
    """Rounds of best-of-N sampling, each followed by SFT on the round's best answers."""

    rounds: int = Field(1, ge=1, description="Rounds; each samples with the policy the previous round tuned.")
    prompts_per_round: int | None = Field(
        None, ge=1, description="Prompts sampled per round (default: all of data.prompts)."
    )
    min_reward: float | None = Field(
        None, description="Keep a prompt's best answer only when its score reaches this (null: always)."
    )
    epochs: float = Field(1.0, gt=0, description="SFT passes over a round's best-of-N records.")
    batch_size: int = Field(32, ge=1, description="SFT records per optimizer step.")
    micro_batch_size: int | None = Field(None, ge=1, description="Records per forward pass (default: all).")
    max_length: int = Field(256, ge=8, description="Tokens of prompt + answer in SFT; longer ones are cut.")
    seed: int = Field(0, description="Seed for prompt order, sampling draws and SFT batches.")


class RSConfig(HeedConfig):
    """``heed rs``: sample N answers per prompt, keep the judge's best, fine-tune on them."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy to sample from and tune.")
    data: PromptDataConfig = Field(..., description="Prompts.")
    rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="The judge: reward sources (as in heed rl) whose weighted sum picks the best.",
    )
    rollout: RSSamplingConfig = Field(
        default_factory=RSSamplingConfig, description="Sampling of the N answers."
    )
    train: RSTrainConfig = Field(default_factory=RSTrainConfig, description="Rounds and the SFT step.")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-5, schedule="constant"),
        description="Optimizer of the SFT step.",
    )
    eval: JudgedEvalConfig = Field(default_factory=JudgedEvalConfig, description="Final evaluation.")
    log: OnlineLogConfig = Field(default_factory=OnlineLogConfig, description="Logging.")
    out: str = Field("runs/rs", description="Run folder.")
    overwrite: bool = Field(False, description="Replace an existing run in `out` instead of refusing.")

    @model_validator(mode="after")
    def _check(self) -> RSConfig:
        if not self.model.path or self.model.init != "pretrained":
            raise ConfigError(
                "model.path: rejection sampling tunes an existing model (e.g. builtin or an SFT run's final/)"
            )
        if self.rollout.num_samples < 2:
            raise ConfigError(
                f"rollout.num_samples: rejection sampling keeps the best of N answers, so N must be at least 2 "
                f"(got {self.rollout.num_samples})"
            )
        check_judge(self.rewards, "rejection sampling")
        return self

"""Config of ``heed online-dpo``: online DPO (fresh answers labelled by a judge at every update) and
iterative DPO (rounds of sample -> label -> offline DPO); the sections shared with ``heed rs``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from heed.config.base import HeedConfig, LogConfig, ModelConfig, OptimConfig
from heed.config.dpo import DPOLossConfig
from heed.config.rl import RewardSpec
from heed.errors import ConfigError

JUDGE_HINT = (
    "a reward model (model: DIR from heed rm train), a rule (function: module:function) or a "
    "classifier (pipeline: DIR), e.g. rewards: [{model: builtin:reward_model}]"
)


def check_judge(rewards: list[RewardSpec], command: str) -> None:
    """The ``rewards:`` list of a command whose judge labels the answers: at least one source, distinct names."""
    if not rewards:
        raise ConfigError(f"rewards: {command} needs a judge to score the sampled answers; give {JUDGE_HINT}")
    names = [r.display_name for r in rewards]
    if len(set(names)) != len(names):
        raise ConfigError(f"rewards: two sources share a name ({', '.join(names)}); set `name:` on each")


class PromptDataConfig(HeedConfig):
    """Prompts the policy answers (training) and held-out prompts (evaluation)."""

    prompts: str = Field(
        ...,
        description="Training prompts ({\"prompt\": ...} records); 'builtin:prompts_train' for the built-in ones.",
        examples=["prompts.jsonl", "builtin:prompts_train"],
    )
    eval_prompts: str | None = Field(
        None,
        description="Held-out prompts for the final evaluation; 'builtin:prompts_eval' for the built-in ones.",
    )
    chat: Literal["auto", "true", "false"] = Field(
        "auto", description="Use the tokenizer's chat template (auto: if it has one)."
    )
    max_prompt_length: int = Field(
        128, ge=1, description="Longest prompt in tokens; a longer one is an error naming its file:line."
    )


class SamplingConfig(HeedConfig):
    """How the policy samples its answers (draws keyed per answer: batching never changes them)."""

    max_new_tokens: int = Field(48, ge=1, description="Longest answer in tokens (answers are cut there).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0 = off).")
    batch_size: int = Field(128, ge=1, description="Rows per generate call.")
    engine: Literal["heed", "hf"] = Field(
        "heed",
        description="Generation engine: heed (lean KV-cache loop, keyed draws) or hf (transformers generate).",
    )


class OnlineSamplingConfig(SamplingConfig):
    """The answers online / iterative DPO samples per prompt and pairs up."""

    num_samples: int = Field(
        2,
        ge=2,
        description="Answers sampled per prompt; its best- and worst-scored ones form the pair (2: the pair as sampled).",
    )


class JudgedEvalConfig(HeedConfig):
    """The final evaluation on ``data.eval_prompts``: the initial and the tuned policy answer the same
    prompts; judge reward, gold metrics and KL(policy ‖ initial policy)."""

    num_prompts: int = Field(64, ge=0, description="Held-out prompts answered (the first N); 0 disables.")
    temperature: float = Field(0.8, gt=0, description="Sampling temperature of the evaluation answers.")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Default: the training answers' max_new_tokens."
    )
    batch_size: int = Field(64, ge=1, description="Rows per generate / log-prob call.")
    gold: list[RewardSpec] = Field(
        default_factory=list,
        description="Gold metrics (never trained on), logged as gold/<name>; e.g. builtin:gold_positivity.",
    )


class OnlineTrainConfig(HeedConfig):
    """Online mode (``iterative.rounds: 0``): every update samples two answers to fresh prompts."""

    updates: int = Field(100, ge=1, description="Online mode: sample -> label -> DPO updates.")
    prompts_per_step: int = Field(
        16, ge=1, description="Online mode: prompts per update, two answers each (at most that many pairs)."
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="Pairs per forward pass (default: all of the step's pairs)."
    )
    seed: int = Field(0, description="Seed for prompt order and the keyed sampling draws.")
    share_prompt: bool = Field(
        True,
        description="Run each pair's prompt once ([prompt | chosen | rejected] packed with a block mask).",
    )
    max_none_updates: int = Field(
        3,
        ge=0,
        description="Stop when this many updates in a row leave no pair to train on (all unscored or tied; 0 = never).",
    )


class IterativeConfig(HeedConfig):
    """Iterative DPO: ``rounds`` of (sample two answers for every prompt -> label -> offline DPO), each
    round starting from the last round's policy, which is also that round's reference."""

    rounds: int = Field(0, ge=0, description="0: online DPO (train.updates); N: N rounds of iterative DPO.")
    prompts_per_round: int | None = Field(
        None, ge=1, description="Prompts sampled and labelled per round (default: all of data.prompts)."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over a round's labelled pairs.")
    batch_size: int = Field(32, ge=1, description="Pairs per optimizer step within a round.")


class OnlineLogConfig(LogConfig):
    """Logging: every update by default."""

    log_every: int = Field(1, ge=1, description="Write metrics every N updates.")


class OnlineDPOConfig(HeedConfig):
    """``heed online-dpo``: DPO / IPO / SimPO on pairs of the policy's own answers, labelled by a judge."""

    model: ModelConfig = Field(
        default_factory=ModelConfig, description="Policy to tune; its initial weights are the reference."
    )
    data: PromptDataConfig = Field(..., description="Prompts.")
    rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="The judge: reward sources (as in heed rl) whose weighted sum ranks the two answers.",
    )
    loss: DPOLossConfig = Field(
        default_factory=DPOLossConfig, description="Preference loss (sigmoid, ipo, hinge, simpo)."
    )
    rollout: OnlineSamplingConfig = Field(
        default_factory=OnlineSamplingConfig,
        description="Sampling of the answers (rollout.num_samples per prompt, best vs worst paired).",
    )
    train: OnlineTrainConfig = Field(default_factory=OnlineTrainConfig, description="Online-mode loop.")
    iterative: IterativeConfig = Field(default_factory=IterativeConfig, description="Iterative DPO (rounds).")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=5e-6, schedule="constant"),
        description="Optimizer and schedule.",
    )
    eval: JudgedEvalConfig = Field(default_factory=JudgedEvalConfig, description="Final evaluation.")
    log: OnlineLogConfig = Field(default_factory=OnlineLogConfig, description="Logging and checkpoints.")
    out: str = Field("runs/online-dpo", description="Run folder.")
    overwrite: bool = Field(False, description="Replace an existing run in `out` instead of refusing.")

    @model_validator(mode="after")
    def _check(self) -> OnlineDPOConfig:
        if not self.model.path or self.model.init != "pretrained":
            raise ConfigError(
                "model.path: online DPO tunes an existing model (e.g. builtin or an SFT run's final/)"
            )
        check_judge(self.rewards, "online DPO")
        return self

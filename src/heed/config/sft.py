"""Config of ``heed sft`` and ``heed pretrain`` (one loop: language modelling or chat SFT)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from heed.config.base import DataFilesConfig, HeedConfig, LogConfig, ModelConfig, OptimConfig


class SFTDataConfig(DataFilesConfig):
    """Training data for SFT / language modelling."""

    train: str = Field(
        ...,
        description="Training file (.jsonl/.json/.parquet) or datasets folder: chats, "
        '{"prompt", "completion"} or, for heed pretrain, {"text"} records',
        examples=["data.jsonl", "builtin:chat or builtin:text for the built-in chats or text"],
    )
    eval: str | None = Field(
        None, description="Evaluation file; if unset, `eval_split` of train is held out."
    )
    eval_split: float = Field(
        0.05, ge=0, lt=1, description="Fraction of train held out for eval when `eval` is unset."
    )
    kind: Literal["sft", "text"] = Field(
        "sft", description="sft: chat or prompt/completion (loss on answers); text: plain LM."
    )
    max_length: int = Field(
        256, ge=8, description="Tokens per sequence; longer ones are truncated (with a warning)."
    )
    packing: bool = Field(
        False, description="Concatenate sequences into full rows of max_length (no padding)."
    )
    pack_boundaries: bool = Field(
        True,
        description="With packing: attention stays inside each sequence (its positions restart at 0); "
        "false lets it cross into the previous ones, GPT-style.",
    )
    chat: Literal["auto", "true", "false"] = Field(
        "auto", description="Use the tokenizer's chat template (auto: if it has one)."
    )
    group_by_length: bool = Field(
        True, description="Batch sequences of similar length together (less padding)."
    )


class SFTTrainConfig(HeedConfig):
    """Loop settings."""

    batch_size: int = Field(32, ge=1, description="Sequences per optimizer step, over all processes.")
    micro_batch_size: int | None = Field(
        None, ge=1, description="Sequences per forward pass per process (default: all)."
    )
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training data (ignored when max_steps is set)."
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    seed: int = Field(0, description="Seed for data order and initialisation.")
    eval_batch_size: int = Field(64, ge=1, description="Sequences per evaluation forward pass.")


class SFTConfig(HeedConfig):
    """``heed sft`` / ``heed pretrain``."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Model to train.")
    data: SFTDataConfig = Field(..., description="Training data.")
    train: SFTTrainConfig = Field(default_factory=SFTTrainConfig, description="Loop settings.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and schedule.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging, evaluation and checkpoints.")
    out: str = Field("runs/sft", description="Run folder.")
    overwrite: bool = Field(False, description="Replace an existing run in `out` instead of refusing.")

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        if self.model.init == "pretrained" and not self.model.path:
            raise ValueError("model.path is required unless model.init is 'scratch'")
        return self


PRETRAIN_DEFAULTS = {
    "model": {"init": "scratch"},
    "data": {"kind": "text", "packing": True},
    "optim": {"lr": 2e-3, "warmup_steps": 20},
    "out": "runs/pretrain",
}

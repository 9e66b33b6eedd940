"""Config of ``heed kto``: Kahneman-Tversky optimisation from thumbs up / down on single answers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from heed.config.base import DataFilesConfig, HeedConfig, LogConfig, ModelConfig, OptimConfig
from heed.config.monitor import MonitorConfig


class KTODataConfig(DataFilesConfig):
    """Unpaired feedback; preference pairs and ranked groups in the same files become thumbs."""

    train: str = Field(
        ...,
        description="Feedback file (.jsonl/.json/.parquet) or datasets folder: {prompt, completion, label} "
        "records, and/or pairs and ranked groups (best answers up, worst down).",
    )
    eval: str | None = Field(
        None, description="Held-out feedback file; if unset, `eval_split` of the train prompts is held out."
    )
    eval_split: float = Field(
        0.1, ge=0, lt=1, description="Fraction of train prompts held out for eval when `eval` is unset."
    )
    allow_negative_weights: bool = Field(
        False, description="Accept records with a negative `weight`; refused otherwise."
    )
    max_length: int = Field(
        256, ge=8, description="Tokens of prompt + answer; longer answers are cut (with a counted warning)."
    )
    chat: Literal["auto", "true", "false"] = Field(
        "auto", description="Use the tokenizer's chat template (auto: if it has one)."
    )


class KTOLossConfig(HeedConfig):
    """KTO's coefficients (formula in heed.algos.losses.kto_loss)."""

    beta: float = Field(
        0.1, gt=0, description="β: inverse temperature of the implicit reward β·log(π/π_ref)."
    )
    desirable_weight: float = Field(1.0, gt=0, description="λ_D: weight of the loss on thumbs-up answers.")
    undesirable_weight: float = Field(
        1.0, gt=0, description="λ_U: weight of the loss on thumbs-down answers."
    )


class KTOTrainConfig(HeedConfig):
    """Loop settings."""

    batch_size: int = Field(
        32,
        ge=2,
        description="Examples per optimizer step, over all processes; its answers shifted by one give the KL estimate.",
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="Examples per forward pass per process (default: all)."
    )
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training examples (ignored when max_steps is set)."
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    seed: int = Field(0, description="Seed for the eval split, batches and sampling.")
    eval_batch_size: int = Field(64, ge=1, description="Rows per evaluation / reference forward pass.")
    precompute_ref: bool = Field(
        True,
        description="Reference log-probs (of the examples and of their KL rows) once before training, "
        "cached in the run folder, instead of per batch.",
    )


class KTOSampleConfig(HeedConfig):
    """Answers sampled at the end from the reference and the tuned policy (samples.jsonl, KL to the reference)."""

    prompts: str | None = Field(
        None, description="Prompts file for samples; default: prompts of the eval examples."
    )
    num_prompts: int = Field(16, ge=0, description="How many prompts to answer; 0 disables sampling.")
    num_samples: int = Field(1, ge=1, description="Answers per prompt.")
    temperature: float = Field(0.8, gt=0, description="Sampling temperature.")
    max_new_tokens: int = Field(64, ge=1, description="Longest sampled answer in tokens.")


class KTOConfig(HeedConfig):
    """``heed kto``."""

    model: ModelConfig = Field(
        default_factory=ModelConfig, description="Policy to tune (usually the SFT model)."
    )
    ref_model: str | None = Field(
        None,
        description="Reference model folder; default: model.path (the policy before tuning; with LoRA, the "
        "policy with its adapter disabled).",
    )
    offload_ref: bool = Field(
        False, description="Keep a separately loaded reference model on the CPU (saves accelerator memory)."
    )
    data: KTODataConfig = Field(..., description="Unpaired feedback.")
    loss: KTOLossConfig = Field(default_factory=KTOLossConfig, description="KTO loss.")
    train: KTOTrainConfig = Field(default_factory=KTOTrainConfig, description="Loop settings.")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=5e-6, warmup_steps=10), description="Optimizer and schedule."
    )
    log: LogConfig = Field(default_factory=LogConfig, description="Logging, evaluation and checkpoints.")
    sample: KTOSampleConfig = Field(
        default_factory=KTOSampleConfig, description="Final samples and KL to the reference."
    )
    monitor: MonitorConfig = Field(default_factory=MonitorConfig, description="Reward-hacking monitors.")
    out: str = Field("runs/kto", description="Run folder.")
    overwrite: bool = Field(False, description="Replace an existing run in `out` instead of refusing.")

    @model_validator(mode="after")
    def _needs_model(self) -> KTOConfig:
        from heed.errors import ConfigError

        if self.model.init != "pretrained" or not self.model.path:
            raise ConfigError(
                "model.path: KTO tunes an existing model; set model.path to a local model folder "
                "(e.g. an SFT run's final/, or builtin)"
            )
        return self

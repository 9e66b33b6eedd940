"""Config of ``heed dpo``: offline preference optimisation (DPO, cDPO, IPO, hinge, SimPO, + RPO's SFT term)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from heed.config.base import DataFilesConfig, HeedConfig, LogConfig, ModelConfig, OptimConfig
from heed.config.monitor import MonitorConfig

PairMode = Literal["all", "best_vs_rest", "best_vs_worst"]
DPOLoss = Literal["sigmoid", "ipo", "hinge", "simpo"]


class DPODataConfig(DataFilesConfig):
    """Preference data: pairs and/or ranked groups (one file may mix them)."""

    train: str = Field(
        ...,
        description="Preference file (.jsonl/.json/.parquet) or datasets folder: pairs or ranked groups",
        examples=["prefs.jsonl", "builtin:pairs or builtin:rankings for the built-in data"],
    )
    eval: str | None = Field(
        None, description="Held-out preference file; if unset, `eval_split` of train groups is held out."
    )
    eval_split: float = Field(
        0.1, ge=0, lt=1, description="Fraction of train groups held out for eval when `eval` is unset."
    )
    allow_negative_weights: bool = Field(
        False,
        description="Accept records with a negative `weight` (they push towards the worse answer); refused otherwise.",
    )
    pairs: PairMode = Field(
        "all",
        description="How a ranked group becomes pairs: all, best_vs_rest or best_vs_worst (ties skipped).",
    )
    max_length: int = Field(
        256, ge=8, description="Tokens of prompt + answer; longer answers are cut (with a counted warning)."
    )
    chat: Literal["auto", "true", "false"] = Field(
        "auto", description="Use the tokenizer's chat template (auto: if it has one)."
    )


class DPOLossConfig(HeedConfig):
    """Which preference loss, and its coefficients (formulas in heed.algos.losses)."""

    type: DPOLoss = Field(
        "sigmoid", description="sigmoid (DPO), ipo, hinge or simpo (reference-free, length-normalised)."
    )
    beta: float = Field(0.1, gt=0, description="β: inverse temperature of the implicit reward (IPO: its τ).")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="ε of conservative DPO (sigmoid only): share of flipped labels."
    )
    simpo_gamma: float = Field(0.5, ge=0, description="γ, SimPO's target reward margin (simpo only).")
    sft_coef: float = Field(
        0.0, ge=0, description="Weight of an NLL term on the chosen answer (RPO); 0 disables."
    )

    @model_validator(mode="after")
    def _coherent(self) -> DPOLossConfig:
        from heed.errors import ConfigError

        if self.label_smoothing and self.type != "sigmoid":
            raise ConfigError(
                f"loss.label_smoothing is only used by loss.type: sigmoid (got type {self.type!r})"
            )
        return self


class DPOTrainConfig(HeedConfig):
    """Loop settings."""

    batch_size: int = Field(32, ge=1, description="Preference pairs per optimizer step, over all processes.")
    micro_batch_size: int | None = Field(
        None, ge=1, description="Pairs per forward pass per process (default: all)."
    )
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training pairs (ignored when max_steps is set)."
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    seed: int = Field(0, description="Seed for the eval split, data order and sampling.")
    eval_batch_size: int = Field(64, ge=1, description="Pairs per evaluation / reference forward pass.")
    precompute_ref: bool = Field(
        True,
        description="Reference log-probs once before training (cached in the run folder) instead of per batch.",
    )
    share_prompt: bool = Field(
        True,
        description="Run the prompt once per pair: [prompt | chosen | rejected] packed with a block mask "
        "(sdpa or eager attention; pairs whose prompts differ fall back to one row per answer).",
    )


class DPOSampleConfig(HeedConfig):
    """Answers sampled at the end from the reference and the tuned policy (samples.jsonl, KL to the reference)."""

    prompts: str | None = Field(
        None, description="Prompts file for samples; default: prompts of the eval pairs."
    )
    num_prompts: int = Field(16, ge=0, description="How many prompts to answer; 0 disables sampling.")
    num_samples: int = Field(1, ge=1, description="Answers per prompt.")
    temperature: float = Field(0.8, gt=0, description="Sampling temperature.")
    max_new_tokens: int = Field(64, ge=1, description="Longest sampled answer in tokens.")


class DPOConfig(HeedConfig):
    """``heed dpo``."""

    model: ModelConfig = Field(
        default_factory=ModelConfig, description="Policy to tune (usually the SFT model)."
    )
    ref_model: str | None = Field(
        None,
        description="Reference model folder; default: model.path (the policy before tuning; with LoRA, the policy with its adapter disabled).",
    )
    offload_ref: bool = Field(
        False, description="Keep a separately loaded reference model on the CPU (saves accelerator memory)."
    )
    data: DPODataConfig = Field(..., description="Preference data.")
    loss: DPOLossConfig = Field(default_factory=DPOLossConfig, description="Preference loss.")
    train: DPOTrainConfig = Field(default_factory=DPOTrainConfig, description="Loop settings.")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=5e-6, warmup_steps=10), description="Optimizer and schedule."
    )
    log: LogConfig = Field(default_factory=LogConfig, description="Logging, evaluation and checkpoints.")
    sample: DPOSampleConfig = Field(
        default_factory=DPOSampleConfig, description="Final samples and KL to the reference."
    )
    monitor: MonitorConfig = Field(default_factory=MonitorConfig, description="Reward-hacking monitors.")
    out: str = Field("runs/dpo", description="Run folder.")
    overwrite: bool = Field(False, description="Replace an existing run in `out` instead of refusing.")

    @model_validator(mode="after")
    def _needs_model(self) -> DPOConfig:
        from heed.errors import ConfigError

        if self.model.init != "pretrained" or not self.model.path:
            raise ConfigError(
                "model.path: DPO tunes an existing model; set model.path to a local model folder "
                "(e.g. an SFT run's final/)"
            )
        return self

"""Config of ``heed rm train``: a reward model trained on ranked groups and preference pairs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from heed.config.base import DataFilesConfig, HeedConfig, LogConfig, LoraConfig, MixedPrecision, OptimConfig


class RMModelConfig(HeedConfig):
    """The backbone: a causal LM folder (a score head replaces its softmax layer), an encoder
    folder (BERT-style), an existing reward model, or (init: scratch) a new built-in model."""

    path: str | None = Field(
        None, description="Causal LM, encoder or reward model folder (required unless init: scratch)."
    )
    init: Literal["pretrained", "scratch"] = Field(
        "pretrained", description="Load `path`, or build a new built-in model."
    )
    size: str = Field(
        "tiny", description="Built-in architecture size when init: scratch (micro, tiny, small, 100m)."
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer folder; defaults to `path` (required when init: scratch)."
    )
    max_position_embeddings: int = Field(512, ge=16, description="Context length of a scratch decoder.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype when loading."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass to save memory."
    )
    lora: LoraConfig | None = Field(
        None,
        description="LoRA adapters on the backbone (the score head trains fully); null = full fine-tuning.",
    )
    mixed_precision: MixedPrecision = Field(
        "no", description="Autocast compute through accelerate: no, bf16 or fp16 (GPU)."
    )

    backbone: Literal["auto", "decoder", "encoder"] = Field(
        "auto",
        description="Backbone kind: auto reads it from the folder; scratch models need decoder or encoder.",
    )
    freeze_backbone: bool = Field(
        False, description="Train only the head on cached features of the frozen backbone."
    )
    head: Literal["linear", "mlp"] = Field(
        "linear",
        description="Scalar head: linear (replaces the LM's softmax layer) or mlp (BERT's pooler; an extra MLP block on decoders).",
    )


class RMDataConfig(DataFilesConfig):
    """Preference data: pairs and ranked groups, in one file or several kinds mixed."""

    train: str = Field(
        ...,
        description="Training file (.jsonl/.json/.parquet) of pairs and/or ranked groups",
        examples=["rankings.jsonl", "builtin:rankings or builtin:pairs for the built-in data"],
    )
    eval: str | None = Field(
        None, description="Evaluation file; if unset, `eval_split` of the prompts is held out."
    )
    eval_split: float = Field(
        0.1, ge=0, lt=1, description="Fraction of prompts held out for eval when `eval` is unset."
    )
    allow_negative_weights: bool = Field(
        False,
        description="Accept records with a negative `weight` (they push towards the worse answer); refused otherwise.",
    )
    max_length: int = Field(
        256, ge=8, description="Tokens per (prompt, response); longer ones are truncated (with a warning)."
    )
    chat: Literal["auto", "true", "false"] = Field(
        "auto", description="Render prompt + response as a chat turn (auto: if the tokenizer has a template)."
    )
    use_margin: bool = Field(
        True, description="Subtract a record's `margin` column inside the loss, −log σ(r_w − r_l − m)."
    )
    use_weight: bool = Field(
        True, description="Weight each record's loss by its `weight` column (e.g. annotator agreement)."
    )


class RMTrainConfig(HeedConfig):
    """Loop settings."""

    batch_size: int = Field(
        16, ge=1, description="Ranked groups (prompts) per optimizer step, over all processes."
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="Groups per forward pass per process (default: all)."
    )
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training groups (ignored when max_steps is set)."
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    seed: int = Field(0, description="Seed for the eval split, data order and the new head's initialisation.")
    eval_batch_size: int = Field(64, ge=1, description="Responses per evaluation forward pass.")
    share_prompt: bool = Field(
        False,
        description="Run the tokens a group's responses share (the prompt) once: [prompt | response 1 | ... | "
        "response K] packed with a block mask (decoders whose probe matches; others run padded rows). Fewer "
        "tokens, but attention over the whole packed row: slower than padded rows on CPU (benchmarks/rm_vs_trl.py).",
    )
    centering_coef: float = Field(
        0.0, ge=0, description="Reward-centering term c · mean(r²) added to each group's loss."
    )


class RMConfig(HeedConfig):
    """``heed rm train``."""

    model: RMModelConfig = Field(default_factory=RMModelConfig, description="Backbone to train.")
    data: RMDataConfig = Field(..., description="Preference data.")
    train: RMTrainConfig = Field(default_factory=RMTrainConfig, description="Loop settings.")
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10), description="Optimizer and schedule."
    )
    log: LogConfig = Field(default_factory=LogConfig, description="Logging, evaluation and checkpoints.")
    out: str = Field("runs/rm", description="Run folder.")
    overwrite: bool = Field(False, description="Replace an existing run in `out` instead of refusing.")

    @model_validator(mode="after")
    def _check(self) -> RMConfig:
        m = self.model
        if m.init == "pretrained" and not m.path:
            raise ValueError("model.path is required unless model.init is 'scratch'")
        if m.lora is not None and m.freeze_backbone:
            raise ValueError(
                "model.lora and model.freeze_backbone exclude each other (a frozen backbone has no adapters to train)"
            )
        if m.lora is not None and m.init == "scratch":
            raise ValueError(
                "model.lora: LoRA adapts a pretrained backbone; set model.init: pretrained and model.path"
            )
        if m.lora is not None and m.lora.quantize != "none":
            raise ValueError(
                "model.lora.quantize: heed rm train does not quantize the backbone (its score head trains "
                "in full); use quantize: none"
            )
        if m.lora is not None and m.head == "mlp":
            raise ValueError(
                "model.lora: use head: linear with LoRA (the mlp head's new block would stay frozen)"
            )
        if m.init == "scratch":
            if m.backbone == "auto":
                raise ValueError("model.backbone must be decoder or encoder when model.init is 'scratch'")
            if not m.tokenizer:
                raise ValueError("model.tokenizer is required when model.init is 'scratch'")
        return self

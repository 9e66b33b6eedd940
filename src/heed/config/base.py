"""Config machinery shared by every command.

A config is a frozen pydantic model that forbids unknown keys. It is built once from a
YAML file and ``--set a.b=c`` overrides, derived values are computed at load, and it is
never mutated afterwards. Errors name the dotted key and what is allowed.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from heed.errors import ConfigError

C = TypeVar("C", bound="HeedConfig")


class HeedConfig(BaseModel):
    """Base of every config: unknown keys are errors, instances are immutable, and every number is
    finite (``.inf`` / ``.nan`` in YAML or ``--set`` are refused: a run with an infinite learning rate
    or KL coefficient would learn nothing and still exit 0)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), allow_inf_nan=False)


class DataFilesConfig(HeedConfig):
    """Where a trainer's records come from: a training file, and an evaluation file or a held-out share
    of the training records. Each trainer's data section adds what it reads."""

    train: str = Field(..., description="Training file (.jsonl/.json/.parquet) or datasets folder.")
    eval: str | None = Field(
        None, description="Evaluation file; if unset, `eval_split` of train is held out."
    )
    eval_split: float = Field(
        0.1, ge=0, lt=1, description="Fraction of train held out for eval when `eval` is unset."
    )
    split: str | None = Field(
        None,
        description="Split of a DatasetDict folder in `train` (e.g. train_prefs); unset: its only split, or 'train'.",
    )
    eval_split_name: str | None = Field(
        None,
        description="Split of a DatasetDict folder in `eval` (e.g. test_prefs); unset: its only split.",
    )


class OptimConfig(HeedConfig):
    """AdamW with warmup and a decay schedule."""

    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW (beta1, beta2).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (optimizer steps).")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="Final LR as a fraction of the peak (cosine/linear)."
    )
    max_grad_norm: float | None = Field(
        1.0, description="Clip the global gradient norm to this; null disables."
    )


class LogConfig(HeedConfig):
    """How often to log, evaluate and checkpoint, and where metrics go."""

    log_every: int = Field(10, ge=1, description="Write metrics every N optimizer steps.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps; 0 evaluates only at the end.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps; 0 saves only the final model.")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    tensorboard: bool = Field(False, description="Also write TensorBoard events (needs `tensorboard`).")
    progress: bool = Field(True, description="Show a progress bar with ETA.")


class LoraConfig(HeedConfig):
    """LoRA adapters (via ``peft``): only the low-rank matrices train, the base weights stay frozen."""

    r: int = Field(16, ge=1, description="Rank of the update matrices.")
    alpha: float = Field(32.0, gt=0, description="Scale of the update: W + (alpha / r)·B·A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="Names (last component) of the layers that get adapters, or 'all-linear' (every "
        "linear and Conv1D layer except the output / score head).",
    )
    quantize: Literal["none", "4bit", "8bit"] = Field(
        "none", description="QLoRA: load the frozen base in 4-bit NF4 or 8-bit with bitsandbytes (CUDA only)."
    )


MixedPrecision = Literal["no", "bf16", "fp16"]


class ModelConfig(HeedConfig):
    """Which model to train and how to load it."""

    path: str | None = Field(
        None, description="Local Hugging Face model folder (required unless init: scratch)."
    )
    init: Literal["pretrained", "scratch"] = Field(
        "pretrained", description="Load `path`, or build a new model."
    )
    size: str = Field(
        "tiny", description="Built-in architecture size when init: scratch (micro, tiny, small, 100m)."
    )
    tokenizer: str | None = Field(None, description="Tokenizer folder; defaults to `path`.")
    vocab_size: int = Field(
        2048,
        ge=64,
        description="Vocabulary of a tokenizer trained from the data (init: scratch, no tokenizer).",
    )
    max_position_embeddings: int = Field(512, ge=16, description="Context length of a scratch model.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype when loading."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass to save memory."
    )
    lora: LoraConfig | None = Field(
        None, description="LoRA adapters ({r, alpha, dropout, target_modules}); null = full fine-tuning."
    )
    mixed_precision: MixedPrecision = Field(
        "no", description="Autocast compute through accelerate: no, bf16 or fp16 (GPU)."
    )

    @model_validator(mode="after")
    def _lora_needs_a_base(self) -> ModelConfig:
        if self.lora is not None and self.init == "scratch":
            raise ValueError(
                "model.lora: LoRA adapts a pretrained model; set model.init: pretrained and model.path"
            )
        return self


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1, 2]"]`` into a nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=1e-4")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: the key must be dotted names, e.g. optim.lr")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(nested, key, value, where=f"--set {item!r}")
    return nested


def set_dotted(tree: dict[str, Any], key: str, value: Any, where: str = "config") -> None:
    """``tree["a"]["b"] = value`` for ``key="a.b"``, creating sections on the way."""
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: '{part}' is set to a value and also used as a section")
        node = child
    node[parts[-1]] = value


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _allowed_keys(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Walk ``cls`` along ``loc`` (minus the last element) and list the field names there."""
    model: Any = cls
    for part in loc[:-1]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        candidates = [a for a in (typing.get_args(annotation) or (annotation,)) if isinstance(a, type)]
        model = next((a for a in candidates if issubclass(a, BaseModel)), None)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return sorted(model.model_fields)
    return None


def _section(annotation: Any) -> Any:
    """The config class inside a field's annotation (``X`` or ``X | None``), if there is one."""
    candidates = [a for a in (typing.get_args(annotation) or (annotation,)) if isinstance(a, type)]
    return next((a for a in candidates if issubclass(a, BaseModel)), None)


def _required_keys(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[tuple[str, Any]]:
    """``(dotted key, field)`` of what the user must set at ``loc``: the field itself when it has no
    default, or, for a required section, its own required keys (``data`` -> ``data.train``)."""
    model: Any = cls
    info: Any = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        info = model.model_fields[part]
        model = _section(info.annotation)
    if info is None or not info.is_required():
        return []
    key = ".".join(str(p) for p in loc)
    inner = (
        [(f"{key}.{name}", f) for name, f in model.model_fields.items() if f.is_required()] if model else []
    )
    return inner or [(key, info)]


def _missing_key_message(info: Any, key: str, source: str) -> str:
    """``config key 'data.train' is required: set it ... --set data.train=prefs.jsonl (what it holds; ...)``:
    the example is the field's first ``examples`` entry, the other entries (built-in names) follow."""
    examples = list(info.examples or ["VALUE"])
    what = (info.description or "").rstrip(".")
    if examples[1:]:
        what += f"; or {', '.join(str(x) for x in examples[1:])}"
    hint = f" ({what})" if what else ""
    return f"{source}: config key '{key}' is required: set it in the config or with --set {key}={examples[0]}{hint}"


def _format_validation_error(cls: type[BaseModel], err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        key = ".".join(str(p) for p in loc) or "(root)"
        required = _required_keys(cls, loc) if e["type"] == "missing" or e.get("input", 0) is None else []
        if required:  # left out, or set to null
            lines += [_missing_key_message(info, k, source) for k, info in required]
        elif e["type"] == "extra_forbidden":
            allowed = _allowed_keys(cls, loc)
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{source}: unknown config key '{key}'{hint}")
        else:
            got = e.get("input")
            got_txt = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
            lines.append(f"{source}: config key '{key}': {e['msg']}{got_txt}")
    return "\n".join(lines)


def config_from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Validate a plain dict into ``cls``, turning pydantic's errors into a :class:`ConfigError`."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(cls, err, source)) from None


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    defaults: dict[str, Any] | None = None,
) -> C:
    """Build ``cls`` from ``defaults`` < YAML file at ``path`` < ``--set`` overrides."""
    data: dict[str, Any] = dict(defaults or {})
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of config keys at the top level")
        data = _deep_merge(data, loaded)
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
        source = f"{source} (with --set)"
    return config_from_dict(cls, data, source)


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (the run folder's ``config.yaml``)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")

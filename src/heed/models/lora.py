"""LoRA adapters through ``peft``: wrap a model, find its base, resume an adapter, merge for export.

A LoRA layer computes ``W x + (alpha / r) · B A x`` with ``A`` (r, in) and ``B`` (out, r); ``B``
starts at zero, so the wrapped model is exactly the base model before the first step
(Hu et al. 2021, https://arxiv.org/abs/2106.09685). Only ``A`` and ``B`` train (plus a reward
model's new score head). With the adapter disabled (``with model.disable_adapter():``) the same
weights compute the base model, which DPO and RL use as their reference: no second copy.

The default ``target_modules: all-linear`` adapts every linear layer, ``nn.Linear`` and
``transformers``' ``Conv1D`` (GPT-2's attention and MLP) alike, except the output layer (``lm_head``)
and a classifier's ``score`` / ``classifier`` head: peft's own rule, so it fits every architecture.

A LoRA run's ``final/`` holds the adapter (``adapter_config.json``, ``adapter_model.safetensors``)
and the tokenizer; ``heed merge`` (:func:`merge_adapter`) writes a plain Hugging Face model.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal

from heed.config.base import LoraConfig
from heed.errors import ConfigError, ModelLoadError

ADAPTER_CONFIG = "adapter_config.json"
Task = Literal["causal_lm", "seq_cls"]


def is_adapter_folder(path: str | Path) -> bool:
    """True for a folder written by a LoRA run (an adapter, not a whole model)."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


ALL_LINEAR = "all-linear"


def _linear_types() -> tuple[type, ...]:
    import torch
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D)


def _adaptable_types() -> tuple[type, ...]:
    """Layer types peft's LoRA can wrap (besides linear ones: embeddings and convolutions)."""
    import torch

    return (*_linear_types(), torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def linear_names(model: Any) -> list[str]:
    """Last-component names of the model's linear layers, ``nn.Linear`` and ``Conv1D`` (GPT-2's
    ``c_attn``, ``c_proj``, ``c_fc``): what ``target_modules`` may name."""
    kinds = _linear_types()
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, kinds)}
    )


def _has_conv1d(model: Any) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list entry: the module's full name, or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def check_targets(model: Any, targets: list[str] | str) -> None:
    """One-line error, before any adapter is made, when ``target_modules`` names no layer of
    ``model`` that LoRA can adapt (the message lists its linear and Conv1D layers).

    A list names modules by (a dotted suffix of) their name, a string other than ``all-linear`` is
    a regular expression matched against full module names: peft's rules.
    """
    import re

    cls = type(model).__name__
    layers = f"its linear/Conv1D layers are: {', '.join(linear_names(model)) or 'none'}"
    modules = [(name, m) for name, m in model.named_modules() if name]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        if not linear_names(model):
            raise ConfigError(
                f"model.lora.target_modules: {ALL_LINEAR}, but {cls} has no linear or Conv1D layer"
            )
        return
    adaptable = _adaptable_types()
    if isinstance(targets, str):
        try:
            hits = [m for name, m in modules if re.fullmatch(targets, name)]
        except re.error as exc:
            raise ConfigError(
                f"model.lora.target_modules: {targets!r} is not a valid regular expression ({exc})"
            ) from None
        if not any(isinstance(m, adaptable) for m in hits):
            raise ConfigError(
                f"model.lora.target_modules: the pattern {targets!r} matches no linear layer of {cls}; "
                f"{layers} (or use '{ALL_LINEAR}')"
            )
        return
    wanted = list(targets)
    if not wanted:
        raise ConfigError(
            f"model.lora.target_modules: empty; name the linear layers to adapt (or '{ALL_LINEAR}')"
        )
    missing, wrong = [], []
    for t in wanted:
        hits = [m for name, m in modules if _matches(name, t)]
        if not hits:
            missing.append(t)
        elif not any(isinstance(m, adaptable) for m in hits):
            wrong.append(f"{t} ({type(hits[0]).__name__})")
    if missing:
        raise ConfigError(
            f"model.lora.target_modules: {', '.join(missing)} not in {cls}; {layers} (or use '{ALL_LINEAR}')"
        )
    if wrong:
        raise ConfigError(
            f"model.lora.target_modules: {', '.join(wrong)} in {cls} is not a layer LoRA can adapt; "
            f"{layers} (or use '{ALL_LINEAR}')"
        )


def quantization_kwargs(cfg: LoraConfig | None) -> dict[str, Any]:
    """``from_pretrained`` arguments that load the frozen base quantized for QLoRA (Dettmers et al.
    2023, https://arxiv.org/abs/2305.14314): 4-bit NF4 with double quantization and bf16 compute,
    or 8-bit, through bitsandbytes, on this process's GPU. ``{}`` without ``lora.quantize``."""
    if cfg is None or cfg.quantize == "none":
        return {}
    import importlib.util
    import os

    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"model.lora.quantize: {cfg.quantize} (QLoRA) needs a CUDA GPU for the bitsandbytes kernels "
            "and none is visible; use quantize: none"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"model.lora.quantize: {cfg.quantize} needs bitsandbytes; pip install bitsandbytes "
            "(or use quantize: none)"
        )
    from transformers import BitsAndBytesConfig

    if cfg.quantize == "4bit":
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": q, "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))}}


def is_quantized(model: Any) -> bool:
    """Whether the (peft-wrapped) model's base weights are bitsandbytes-quantized."""
    base = base_of(model)
    return bool(
        getattr(base, "is_quantized", False)
        or getattr(base, "is_loaded_in_4bit", False)
        or getattr(base, "is_loaded_in_8bit", False)
    )


def place(model: Any, device: Any) -> Any:
    """``model.to(device)``, except for a quantized base, which stays where bitsandbytes loaded it."""
    return model if is_quantized(model) else model.to(device)


def apply_lora(
    model: Any, cfg: LoraConfig, task: Task = "causal_lm", adapter: str | Path | None = None
) -> Any:
    """Wrap ``model`` with LoRA adapters (a new adapter, or the trainable one saved in ``adapter``).

    ``task: seq_cls`` also trains the reward model's score head in full (peft's ``modules_to_save``).
    The base weights are frozen; the returned ``PeftModel`` saves only the adapter.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, TaskType, get_peft_model

    check_targets(model, cfg.target_modules)
    if is_quantized(model):  # QLoRA: norms in fp32, inputs that carry gradients into the adapters
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if adapter is not None and (Path(adapter) / ADAPTER_CONFIG).is_file():
        with quiet_peft():
            return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    base_path = str(getattr(model.config, "_name_or_path", "") or "")
    if base_path and Path(base_path).is_dir():
        base_path = str(Path(base_path).resolve())  # heed merge finds the base through this absolute path
    peft_cfg = PeftLoraConfig(
        base_model_name_or_path=base_path or None,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        fan_in_fan_out=_has_conv1d(model),  # Conv1D stores W transposed (GPT-2); peft would warn and fix it
        task_type=TaskType.SEQ_CLS if task == "seq_cls" else TaskType.CAUSAL_LM,
    )
    with quiet_peft():
        return get_peft_model(model, peft_cfg)


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft's own calls into transformers warn about APIs Heed does not use (``is_gradient_checkpointing``
    on transformers 5) and about its built-in per-architecture patterns that a model lacks
    (``alpha_pattern`` / ``rank_pattern`` keys); neither is the user's to act on, so neither reaches them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*(alpha|rank)_pattern keys did not match.*")
        yield


def is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def base_of(model: Any) -> Any:
    """The transformers model under a ``PeftModel`` (its layers carry the adapters), else ``model``."""
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if is_peft(model) else model


def adapter_disabled(model: Any) -> AbstractContextManager[Any]:
    """Context in which a LoRA model computes its base model (the reference); a no-op otherwise."""
    model = getattr(model, "module", model)
    return model.disable_adapter() if is_peft(model) else nullcontext()


def enable_gradient_checkpointing(model: Any) -> None:
    """Gradient checkpointing that also works when the embeddings are frozen (LoRA): the
    non-reentrant variant needs no input that requires grad."""
    base = base_of(model)
    if hasattr(base, "activation_checkpointing_enable"):  # transformers' newer name (the old one warns)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_adapter_base(path: str | Path, dtype: str = "float32") -> Any:
    """Load the base model named in an adapter folder and apply the adapter (not merged, frozen)."""
    import json

    from peft import PeftModel

    from heed.models.loading import load_causal_lm

    p = Path(path)
    try:
        base_path = json.loads((p / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{p / ADAPTER_CONFIG}: unreadable adapter config ({exc})") from None
    if not base_path or not Path(base_path).is_dir():
        raise ModelLoadError(
            f"{p}: the adapter's base model {base_path!r} is not a local folder; "
            "re-run heed merge with --base DIR"
        )
    with quiet_peft():
        return PeftModel.from_pretrained(load_causal_lm(base_path, dtype=dtype), str(p))


def merge_adapter(
    adapter: str | Path, out: str | Path, base: str | Path | None = None, dtype: str = "float32"
) -> Path:
    """``heed merge``: base + adapter -> a plain Hugging Face model folder (``merge_and_unload``), with the tokenizer."""
    import json
    import shutil

    from peft import PeftModel

    from heed.models.loading import load_causal_lm, load_tokenizer, save_pretrained

    a = Path(adapter)
    if not (a / ADAPTER_CONFIG).is_file():
        raise ModelLoadError(
            f"{a}: no {ADAPTER_CONFIG}; --adapter must be a LoRA run's final/ (or a checkpoint)"
        )
    if base is not None:
        with quiet_peft():
            model = PeftModel.from_pretrained(load_causal_lm(base, dtype=dtype), str(a))
    else:
        model = load_adapter_base(a, dtype)
    merged = model.merge_and_unload()
    tok_dir = (
        a
        if (a / "tokenizer_config.json").is_file()
        else Path(
            base or json.loads((a / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
        )
    )
    tokenizer = load_tokenizer(tok_dir)
    out = save_pretrained(merged, tokenizer, out)
    gen = a / "generation_config.json"
    if gen.is_file() and not (out / "generation_config.json").exists():
        shutil.copy(gen, out / "generation_config.json")
    return out

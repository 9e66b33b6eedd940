"""Loading models and tokenizers from local folders, with errors that name the folder."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from heed.errors import ModelLoadError

DTYPES = ("float32", "bfloat16", "float16")

# transformers' loading is not thread-safe: two threads loading at once can leave a model's tied
# weights on the meta device (and race its lazy imports), so every load in a process holds this lock
LOAD_LOCK = threading.RLock()


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and advisory warnings."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _check_folder(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(
            f"{p}: {what} folder not found (Heed loads local folders only; nothing is downloaded)"
        )
    if not p.is_dir():
        raise ModelLoadError(f"{p}: expected a {what} folder, found a file")
    return p


def read_model_config(path: str | Path) -> dict[str, Any]:
    p = _check_folder(path, "model")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{p}: no config.json, not a Hugging Face model folder")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg}: unreadable ({exc.msg})") from None


def load_tokenizer(path: str | Path, padding_side: str = "right") -> Any:
    """``AutoTokenizer`` from a local folder; a missing pad token falls back to EOS."""
    quiet_transformers()
    p = _check_folder(path, "tokenizer")
    try:
        with LOAD_LOCK:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{p}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(f"{p}: the tokenizer has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        from heed.errors import ConfigError

        raise ConfigError(f"model.dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def load_causal_lm(path: str | Path, dtype: str = "float32", **kwargs: Any) -> Any:
    """``AutoModelForCausalLM`` from a local folder (a reward-model or encoder folder is an error).

    A LoRA run's ``final/`` (an adapter folder) loads as its base model with the adapter merged in."""
    quiet_transformers()
    from heed.models.lora import is_adapter_folder, load_adapter_base

    if is_adapter_folder(path):
        return load_adapter_base(path, dtype).merge_and_unload()
    cfg = read_model_config(path)
    archs = cfg.get("architectures") or []
    if archs and not any(
        a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs
    ):
        raise ModelLoadError(
            f"{path}: holds a {archs[0]}, not a causal language model (expected *ForCausalLM)"
        )
    try:
        with LOAD_LOCK:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch_dtype(dtype), local_files_only=True, **kwargs
            )
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot load a causal LM ({str(exc).splitlines()[0]})") from None
    return model


def save_pretrained(model: Any, tokenizer: Any, out: str | Path) -> Path:
    """Save model and tokenizer in Hugging Face format, atomically (temp folder, then rename)."""
    import shutil

    quiet_transformers()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    unwrapped = getattr(model, "module", model)
    unwrapped.save_pretrained(str(tmp))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out

"""Built-in assets, made on demand and cached: corpus files, the tiny base and SFT models.

Builds are deterministic, so a cache keyed by the build settings is safe to share between
runs and test sessions. The cache lives in ``$HEED_CACHE`` (default ``~/.cache/heed``); each
asset is built in a temporary folder and renamed into place, so a killed build never leaves a
half-written asset behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from heed.data.io import write_jsonl
from heed.demo.corpus import make_corpus, make_prompts, make_text


def cache_dir() -> Path:
    return Path(os.environ.get("HEED_CACHE", Path.home() / ".cache" / "heed"))


def spec_key(spec: Any) -> str:
    """A cache key of a dataclass of build settings: 12 hex digits of the hash of its fields."""
    return hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class BuiltinSpec:
    """Settings of the built-in base + SFT model."""

    size: str = "tiny"
    n_records: int = 8000
    seed: int = 0
    vocab_size: int = 2048
    max_length: int = 128
    pretrain_epochs: float = 3.0
    pretrain_lr: float = 3e-3
    sft_epochs: float = 2.0
    sft_lr: float = 1e-3
    batch_size: int = 32
    version: int = 3  # bump when the build recipe changes, so caches are rebuilt (3: packed documents attend to themselves only)

    def key(self) -> str:
        return spec_key(self)


# A much smaller model for fast tests: learns the format, not much more.
MICRO = BuiltinSpec(
    size="micro", n_records=1500, pretrain_epochs=1.0, sft_epochs=1.0, pretrain_lr=5e-3, sft_lr=3e-3
)


def write_corpus(
    out_dir: str | Path, n_records: int = 4000, seed: int = 0, n_eval_prompts: int = 200
) -> dict[str, Path]:
    """Write the corpus files a pipeline needs; returns their paths by name.

    ``text.jsonl`` (language modelling), ``chat.jsonl`` (SFT, with hidden labels),
    ``prompts_train.jsonl`` (training-distribution prompts), ``prompts_eval.jsonl`` (held-out prompts).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = make_corpus(n_records, seed=seed)
    paths = {
        "text": out / "text.jsonl",
        "chat": out / "chat.jsonl",
        "prompts_train": out / "prompts_train.jsonl",
        "prompts_eval": out / "prompts_eval.jsonl",
    }
    write_jsonl(paths["text"], make_text(records))
    write_jsonl(paths["chat"], [r.chat() for r in records])
    write_jsonl(paths["prompts_train"], make_prompts(1000, seed=seed, heldout=False))
    write_jsonl(paths["prompts_eval"], make_prompts(n_eval_prompts, seed=seed, heldout=True))
    return paths


def base_config(spec: BuiltinSpec, text_file: str | Path, out: str | Path, progress: bool = True) -> Any:
    """Config of the built-in base model: a tokenizer trained on the text, a model of ``spec.size``,
    packed rows of ``spec.max_length`` tokens, each document attending to itself only."""
    from heed.config import config_from_dict
    from heed.config.sft import SFTConfig

    return config_from_dict(
        SFTConfig,
        {
            "model": {"init": "scratch", "size": spec.size, "vocab_size": spec.vocab_size},
            "data": {
                "train": str(text_file),
                "kind": "text",
                "packing": True,
                "pack_boundaries": True,
                "max_length": spec.max_length,
            },
            "train": {"batch_size": spec.batch_size, "epochs": spec.pretrain_epochs, "seed": spec.seed},
            "optim": {"lr": spec.pretrain_lr, "warmup_steps": 20},
            "log": {"progress": progress, "log_every": 10, "save_every": 100},
            "out": str(out),
        },
        "built-in base model",
    )


def sft_config(
    spec: BuiltinSpec, base: str | Path, chat_file: str | Path, out: str | Path, progress: bool = True
) -> Any:
    """Config of the built-in SFT model: chats packed into full rows (loss on assistant tokens), each
    chat attending to itself only (with attention across chats the model learned to answer about
    the previous chat's topic: 7% of answers named the asked topic, against 94% now)."""
    from heed.config import config_from_dict
    from heed.config.sft import SFTConfig

    return config_from_dict(
        SFTConfig,
        {
            "model": {"path": str(base)},
            "data": {
                "train": str(chat_file),
                "kind": "sft",
                "packing": True,
                "pack_boundaries": True,
                "max_length": spec.max_length,
            },
            "train": {"batch_size": spec.batch_size, "epochs": spec.sft_epochs, "seed": spec.seed},
            "optim": {"lr": spec.sft_lr, "warmup_steps": 10},
            "log": {"progress": progress, "log_every": 10, "save_every": 100},
            "out": str(out),
        },
        "built-in SFT model",
    )


def build_builtin(
    out_dir: str | Path, spec: BuiltinSpec = BuiltinSpec(), progress: bool = True
) -> dict[str, Any]:
    """corpus → tokenizer → base model → SFT model, in ``out_dir``; returns paths and timings."""
    from heed.train.sft import train_sft

    out = Path(out_dir)
    files = write_corpus(out / "data", spec.n_records, spec.seed)
    t0 = time.time()
    base = train_sft(base_config(spec, files["text"], out / "base", progress))
    t1 = time.time()
    sft = train_sft(sft_config(spec, out / "base" / "final", files["chat"], out / "sft", progress))
    t2 = time.time()
    return {
        "base": out / "base" / "final",
        "sft": out / "sft" / "final",
        "data": files,
        "seconds": {"pretrain": t1 - t0, "sft": t2 - t1},
        "base_summary": base,
        "sft_summary": sft,
    }


def builtin_sft_model(
    spec: BuiltinSpec = BuiltinSpec(), root: str | Path | None = None, progress: bool = False
) -> Path:
    """Folder of the built-in SFT model (tokenizer included), built once and cached.

    The folder ``../../data`` (beside ``sft/``), holds the corpus files it was trained on.
    """
    root = Path(root) if root is not None else cache_dir()
    target = root / f"builtin-{spec.size}-{spec.key()}"
    if (target / "sft" / "final" / "config.json").exists():
        return target / "sft" / "final"
    tmp = root / f".builtin-{spec.size}-{spec.key()}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    info = build_builtin(tmp, spec, progress=progress)
    # paths inside config.yaml point into tmp; the models themselves are self-contained
    (tmp / "build.json").write_text(json.dumps({"seconds": info["seconds"], "spec": asdict(spec)}, indent=2))
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target / "sft" / "final"


def builtin_data(spec: BuiltinSpec = BuiltinSpec(), root: str | Path | None = None) -> dict[str, Path]:
    """Corpus files that belong to the cached built-in model."""
    sft = builtin_sft_model(spec, root)
    data = sft.parent.parent / "data"
    return {p.stem: p for p in data.glob("*.jsonl")}

"""Built-in assets, made on demand and cached: corpus files, preference data, the tiny base and
SFT models, a reward model.

Builds are deterministic, so a cache keyed by the build settings is safe to share between
runs and test sessions. The cache lives in ``$HEED_CACHE`` (default ``~/.cache/heed``); each
asset is built in a temporary folder and renamed into place (:func:`cached_build`), so a killed
build never leaves a half-written asset behind. Configs name these assets ``builtin:...``
(:mod:`heed.demo.builtin`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from heed.data.io import write_jsonl
from heed.demo.corpus import make_corpus, make_prompts, make_text
from heed.demo.preferences import make_pairs, make_ranked_groups


def cache_dir() -> Path:
    return Path(os.environ.get("HEED_CACHE", Path.home() / ".cache" / "heed"))


def spec_key(spec: Any) -> str:
    """A cache key of a dataclass of build settings: 12 hex digits of the hash of its fields."""
    return hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]


def cached_build(name: str, done: str, build: Callable[[Path], Any], root: str | Path | None = None) -> Path:
    """``root/name``, built once: ``build(tmp)`` fills a temporary folder, which is renamed into place.

    ``done`` is the path (inside the folder) whose existence marks a finished build. Two processes (or
    threads) may build at the same time; the first rename wins and the other's copy is dropped.
    """
    root = Path(root) if root is not None else cache_dir()
    target = root / name
    if (target / done).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"  # per process and thread
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    build(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_cached(name: str, done: str, root: str | Path | None = None) -> bool:
    """Whether :func:`cached_build` would find ``root/name`` already built."""
    return ((Path(root) if root is not None else cache_dir()) / name / done).exists()


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


def sft_model_name(spec: BuiltinSpec) -> str:
    return f"builtin-{spec.size}-{spec.key()}"


def builtin_sft_model(
    spec: BuiltinSpec = BuiltinSpec(), root: str | Path | None = None, progress: bool = False
) -> Path:
    """Folder of the built-in SFT model (tokenizer included), built once and cached.

    The folder ``../../base/final`` holds the base model it was tuned from, and ``../../data``
    (beside ``sft/``) the corpus files it was trained on.
    """

    def build(tmp: Path) -> None:
        info = build_builtin(tmp, spec, progress=progress)
        # paths inside config.yaml point into tmp; the models themselves are self-contained
        (tmp / "build.json").write_text(
            json.dumps({"seconds": info["seconds"], "spec": asdict(spec)}, indent=2)
        )

    return cached_build(sft_model_name(spec), "sft/final/config.json", build, root) / "sft" / "final"


CORPUS_FILES = ("text", "chat", "prompts_train", "prompts_eval")


def corpus_name(spec: BuiltinSpec) -> str:
    return f"corpus-{spec.n_records}-{spec.seed}"


def builtin_corpus(spec: BuiltinSpec = BuiltinSpec(), root: str | Path | None = None) -> dict[str, Path]:
    """The corpus files of the built-in model of ``spec`` (:func:`write_corpus`: the very files it
    was trained on, as the build is deterministic), written once without building the model."""
    folder = cached_build(
        corpus_name(spec),
        "prompts_eval.jsonl",
        lambda tmp: write_corpus(tmp, spec.n_records, spec.seed),
        root,
    )
    return {name: folder / f"{name}.jsonl" for name in CORPUS_FILES}


@dataclass(frozen=True)
class PreferenceSpec:
    """Settings of the built-in preference data: corpus answers ranked by the hidden utility
    (:func:`heed.demo.preferences.hidden_utility`) plus Gumbel noise (a Plackett-Luce sample)."""

    n_groups: int = 2000  # ranked groups, and as many pairs
    k: int = 4  # answers per ranked group
    noise: float = 0.1  # scale of the Gumbel noise: a careful annotator (DEFAULT_ANNOTATORS' first)
    seed: int = 0
    version: int = 1

    def key(self) -> str:
        return spec_key(self)


PREFERENCE_FILES = ("rankings", "pairs")


def builtin_preferences(
    spec: PreferenceSpec = PreferenceSpec(), root: str | Path | None = None
) -> dict[str, Path]:
    """``rankings.jsonl`` (``{"prompt", "responses", "ranks", "topic"}``, K answers per prompt) and
    ``pairs.jsonl`` (``{"prompt", "chosen", "rejected", "topic"}``), written once and cached.

    The answers are the corpus's own (the kind the built-in SFT model learned to give): one prompt's
    answers differ in tone and length, and the ranks follow the world's hidden preference (positive,
    concise) with noise, so a reward model or DPO trained on them can be checked against the gold.
    """

    def build(tmp: Path) -> None:
        groups = make_ranked_groups(spec.n_groups, k=spec.k, seed=spec.seed, noise=spec.noise)
        write_jsonl(tmp / "rankings.jsonl", groups)
        write_jsonl(tmp / "pairs.jsonl", make_pairs(spec.n_groups, seed=spec.seed, noise=spec.noise))

    folder = cached_build(f"preferences-{spec.key()}", "pairs.jsonl", build, root)
    return {name: folder / f"{name}.jsonl" for name in PREFERENCE_FILES}


@dataclass(frozen=True)
class RewardModelSpec:
    """Settings of the built-in reward model: the built-in SFT model of ``model`` with a score head,
    trained with the K-wise ranking loss on ``data``'s rankings."""

    model: BuiltinSpec = field(default_factory=BuiltinSpec)
    data: PreferenceSpec = field(default_factory=PreferenceSpec)
    epochs: float = 1.0
    lr: float = 1e-3
    batch_size: int = 16
    max_length: int = 128
    version: int = 1

    def key(self) -> str:
        return spec_key(self)


def reward_model_config(spec: RewardModelSpec, sft: str | Path, rankings: str | Path, out: str | Path) -> Any:
    """Config of the built-in reward model (``heed rm train``'s, with the demo's learning rate)."""
    from heed.config import config_from_dict
    from heed.config.reward import RMConfig

    return config_from_dict(
        RMConfig,
        {
            "model": {"path": str(sft)},
            "data": {"train": str(rankings), "eval_split": 0.1, "max_length": spec.max_length},
            "train": {"batch_size": spec.batch_size, "epochs": spec.epochs, "seed": spec.model.seed},
            "optim": {"lr": spec.lr, "warmup_steps": 5},
            "log": {"progress": False, "log_every": 10, "eval_every": 0},
            "out": str(out),
        },
        "built-in reward model",
    )


def builtin_reward_model(spec: RewardModelSpec = RewardModelSpec(), root: str | Path | None = None) -> Path:
    """Folder of the built-in reward model (``final/`` of a ``heed rm train`` run), built once and
    cached; ``../summary.json`` holds its held-out accuracy."""
    from heed.train.reward import train_reward

    sft = builtin_sft_model(spec.model, root)
    rankings = builtin_preferences(spec.data, root)["rankings"]

    def build(tmp: Path) -> None:
        train_reward(reward_model_config(spec, sft, rankings, tmp / "run"))

    name = f"reward-model-{spec.model.size}-{spec.key()}"
    return cached_build(name, "run/final/config.json", build, root) / "run" / "final"

"""Reward sources behind one signature: ``fn(prompts, completions, **columns) -> list[float | None]``.

- Python callables named ``package.module:function`` or ``path/to/file.py:function`` (TRL-compatible)
- built-ins (:mod:`heed.rewards.builtin`)
- a trained reward model folder (``heed rm train``), optionally normalised with its saved mean/std
- a ``transformers`` text-classification pipeline with a label -> multiplier map
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from heed.errors import ConfigError, ModelLoadError

RewardFn = Callable[..., list[float | None]]


def resolve_callable(ref: str, base_dir: str | Path | None = None) -> Callable[..., Any]:
    """Import ``package.module:function`` or ``path/to/file.py:function``.

    A relative file path is looked up from the current folder, then from ``base_dir``
    (the config file's folder).
    """
    from heed.rewards.builtin import BUILTINS

    if ref in BUILTINS:
        return BUILTINS[ref]
    if ":" not in ref:
        raise ConfigError(
            f"reward function {ref!r}: expected a built-in ({', '.join(BUILTINS)}), "
            "'package.module:function' or 'path/to/file.py:function'"
        )
    target, name = ref.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file() and base_dir is not None and (Path(base_dir) / target).is_file():
            path = Path(base_dir) / target
        if not path.is_file():
            raise ConfigError(f"reward function {ref!r}: file {target} not found")
        mod_name = f"heed_user_rewards_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"reward function {ref!r}: cannot import {target}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigError(
                f"reward function {ref!r}: importing {target} failed: {type(exc).__name__}: {exc}"
            ) from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError(f"reward function {ref!r}: cannot import module {target!r} ({exc})") from None
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise ConfigError(f"reward function {ref!r}: {target} has no function {name!r}")
    return fn


def function_source(
    ref: str, args: dict[str, Any] | None = None, base_dir: str | Path | None = None
) -> RewardFn:
    fn = resolve_callable(ref, base_dir)
    return functools.partial(fn, **args) if args else fn


def reward_model_source(
    path: str, normalize: bool = False, batch_size: int = 64, device: Any = None
) -> RewardFn:
    """A reward model folder as a reward function (``heed.load_reward_model(path).score``)."""
    import heed

    if not Path(path).is_dir():
        raise ModelLoadError(f"{path}: reward model folder not found")
    rm = heed.load_reward_model(path)
    if device is not None and hasattr(rm, "to"):
        rm = rm.to(device)

    def reward_model(prompts: list[Any], completions: list[str], **columns: Any) -> list[float | None]:
        scores = rm.score(list(prompts), list(completions), batch_size=batch_size, normalize=normalize)
        return [float(s) for s in (scores.tolist() if hasattr(scores, "tolist") else scores)]

    return reward_model


def pipeline_source(
    path: str, labels: dict[str, float], use_score: bool = True, batch_size: int = 64
) -> RewardFn:
    """A text-classification model run on each completion: ``labels[top_label] × p(top_label)``
    (or the multiplier alone with ``use_score=False``). A label missing from the map scores 0."""
    if not Path(path).is_dir():
        raise ModelLoadError(f"{path}: classifier folder not found")
    from transformers import pipeline

    from heed.models.loading import quiet_transformers

    quiet_transformers()
    try:
        clf = pipeline("text-classification", model=str(path), tokenizer=str(path), device="cpu")
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: cannot load a text-classification pipeline ({str(exc).splitlines()[0]})"
        ) from None
    known = set(clf.model.config.id2label.values())
    unknown = sorted(set(labels) - known)
    if unknown:
        raise ConfigError(f"{path}: labels {unknown} are not labels of this classifier ({sorted(known)})")

    def classifier(prompts: list[Any], completions: list[str], **columns: Any) -> list[float | None]:
        results = clf(list(completions), batch_size=batch_size, truncation=True)
        return [labels.get(r["label"], 0.0) * (float(r["score"]) if use_score else 1.0) for r in results]

    return classifier

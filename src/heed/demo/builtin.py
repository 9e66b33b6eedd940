"""The ``builtin`` names of configs and command options, turned into real paths once, at the edge.

``heed.cli`` (and ``heed.demo``) call :func:`resolve_config` on every validated config, and
:func:`resolve_name` on every path option, before a trainer sees them: below ``heed.cli`` /
``heed.demo`` nothing knows these names, and every trainer reads plain paths.

Grammar: ``builtin[:SIZE][:NAME]``, SIZE ``tiny`` (the default) or ``micro`` (a much smaller build,
for tests and quick runs), NAME one of

========================================  ===============================================================
(none)                                    the built-in SFT model folder
``base``                                  the base model it was tuned from
``text`` ``chat`` ``prompts_train``       the corpus files it was trained on: ``{"text"}``, chats
``prompts_eval``                          (``{"messages"}``), training prompts, held-out prompts
``rankings`` ``pairs``                    preference data of the built-in world: ranked groups (K=4)
                                          and pairs, ranked by its hidden preference with noise
``reward_model``                          a reward model trained on ``rankings`` from the SFT model
``thumbs`` ``thumbs_eval``                simulated thumbs up / down on the SFT model's own answers (KTO)
``tone_classifier``                       the optimism task's POSITIVE/NEGATIVE classifier
``gold_positivity``                       the hidden gold tone of an answer, as a reward function
========================================  ===============================================================

Every asset is built on first use and cached in ``$HEED_CACHE`` (:mod:`heed.demo.assets`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from heed.demo.assets import (
    CORPUS_FILES,
    MICRO,
    PREFERENCE_FILES,
    BuiltinSpec,
    RewardModelSpec,
    builtin_corpus,
    builtin_preferences,
    builtin_reward_model,
    builtin_sft_model,
    cache_dir,
    is_cached,
    sft_model_name,
)
from heed.errors import ConfigError

C = TypeVar("C", bound=BaseModel)

SIZES = {"tiny": BuiltinSpec(), "micro": MICRO}
MODELS = ("base",)
ASSETS = ("reward_model", "tone_classifier", "thumbs", "thumbs_eval")
FUNCTIONS = {"gold_positivity": "heed.demo.builtin:gold_positivity"}
NAMES = (*MODELS, *CORPUS_FILES, *PREFERENCE_FILES, *ASSETS, *FUNCTIONS)
GRAMMAR = f"builtin[:tiny|:micro][:{'|:'.join(NAMES)}]"

Say = Callable[[str], None]


def is_builtin_name(value: Any) -> bool:
    """``builtin`` or ``builtin:...``."""
    return isinstance(value, str) and (value == "builtin" or value.startswith("builtin:"))


def gold_positivity(prompts: list[Any], completions: list[str], **columns: Any) -> list[float]:
    """Gold positivity of each answer in [−1, 1] (:func:`heed.demo.corpus.tone_of`): the built-in
    world's hidden tone, which no policy is trained on, so it shows what a proxy reward really bought."""
    from heed.demo.corpus import tone_of

    return [tone_of(t) for t in completions]


def resolve_name(value: str, say: Say | None = None, where: str = "") -> str:
    """The path (or ``module:function``) a built-in name stands for; any other value unchanged.

    Assets that are not cached yet are built now (``say`` is told first: the tiny model takes a
    few minutes on a CPU). ``where`` (a config key or option) prefixes the error of an unknown name.
    """
    if not is_builtin_name(value):
        return value
    parts = value.split(":")[1:]
    spec = BuiltinSpec()
    if parts and parts[0] in SIZES:
        spec = SIZES[parts.pop(0)]
    if len(parts) > 1 or (parts and parts[0] not in NAMES):
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}{value!r} is not a built-in name; expected {GRAMMAR}")
    name = parts[0] if parts else ""

    def building(what: str, done: bool) -> None:
        if not done and say is not None:
            say(f"building {what} for {value!r} (once; cached in {cache_dir()})")

    if name in FUNCTIONS:
        return FUNCTIONS[name]
    if name in CORPUS_FILES:
        return str(builtin_corpus(spec)[name])
    if name in PREFERENCE_FILES:
        return str(builtin_preferences()[name])
    if name == "tone_classifier":
        from heed.demo.classifier import ClassifierSpec, builtin_tone_classifier

        building("the tone classifier", is_cached(f"tone-classifier-{ClassifierSpec().key()}", "config.json"))
        return str(builtin_tone_classifier())
    building(f"the built-in {spec.size} model", is_cached(sft_model_name(spec), "sft/final/config.json"))
    if name in ("thumbs", "thumbs_eval"):
        from heed.demo.thumbs import builtin_thumbs

        return str(builtin_thumbs(model=spec)[name])
    sft = builtin_sft_model(spec)
    if name == "base":
        return str(sft.parent.parent / "base" / "final")
    if name == "reward_model":
        rm = RewardModelSpec(model=spec)
        building(
            f"the built-in {spec.size} reward model",
            is_cached(f"reward-model-{spec.size}-{rm.key()}", "run/final/config.json"),
        )
        return str(builtin_reward_model(rm))
    return str(sft)


def resolve_tree(tree: Any, say: Say | None = None, where: str = "") -> Any:
    """A copy of a nested dict / list with every built-in name replaced by its path."""
    if isinstance(tree, dict):
        return {k: resolve_tree(v, say, f"{where}.{k}" if where else str(k)) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(resolve_tree(v, say, f"{where}[{i}]") for i, v in enumerate(tree))
    if isinstance(tree, Path):
        return Path(resolve_name(str(tree), say, where))
    return resolve_name(tree, say, where) if is_builtin_name(tree) else tree


def resolve_config(cfg: C, say: Say | None = None) -> C:
    """``cfg`` with every built-in name in it replaced by a path, validated again (same class)."""
    from heed.config import config_from_dict

    data = cfg.model_dump()
    resolved = resolve_tree(data, say)
    if resolved == data:
        return cfg
    return config_from_dict(type(cfg), resolved, "config (built-in names resolved)")

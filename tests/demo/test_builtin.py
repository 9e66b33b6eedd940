"""Built-in names: each resolves to its cached asset, a whole config is resolved once, unknown names
and unresolved configs are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from heed.config import config_from_dict
from heed.config.rl import RLConfig
from heed.demo.assets import MICRO, PreferenceSpec, builtin_preferences
from heed.demo.builtin import gold_positivity, resolve_config, resolve_name
from heed.errors import ConfigError


def test_names_resolve_to_cached_assets(micro_sft_model: Path) -> None:
    assert resolve_name("builtin:micro") == str(micro_sft_model)
    assert resolve_name("builtin:micro:base") == str(micro_sft_model.parent.parent / "base" / "final")
    chat = Path(resolve_name("builtin:micro:chat"))
    # the micro corpus is the very file the micro model was trained on (written without building it)
    assert chat.read_bytes() == (micro_sft_model.parent.parent / "data" / "chat.jsonl").read_bytes()
    assert len(chat.read_text().splitlines()) == MICRO.n_records
    assert resolve_name("builtin:gold_positivity") == "heed.demo.builtin:gold_positivity"
    assert resolve_name("runs/sft/final") == "runs/sft/final"  # anything else is left alone
    assert resolve_name("builtins.jsonl") == "builtins.jsonl"


def test_preference_data_is_ranked_by_the_hidden_utility(tmp_path: Path) -> None:
    files = builtin_preferences(PreferenceSpec(n_groups=50, noise=0.0), root=tmp_path)
    again = builtin_preferences(PreferenceSpec(n_groups=50, noise=0.0), root=tmp_path)
    assert files == again  # cached: the second call builds nothing
    groups = [json.loads(x) for x in files["rankings"].read_text().splitlines()]
    pairs = [json.loads(x) for x in files["pairs"].read_text().splitlines()]
    assert len(groups) == len(pairs) == 50 and all(len(g["responses"]) == 4 for g in groups)
    # without noise, rank 1 is the answer of highest gold positivity minus 0.15 per extra sentence
    from heed.demo.preferences import hidden_utility

    for g in groups:
        best = g["responses"][g["ranks"].index(1)]
        assert hidden_utility(best) == max(hidden_utility(r) for r in g["responses"])
    assert all(hidden_utility(p["chosen"]) > hidden_utility(p["rejected"]) for p in pairs)


def test_a_config_is_resolved_once_and_errors_name_the_key(micro_sft_model: Path) -> None:
    cfg = config_from_dict(
        RLConfig,
        {
            "model": {"path": "builtin:micro"},
            "ref_model": "builtin:micro",
            "data": {"prompts": "builtin:micro:prompts_train", "eval_prompts": "my_prompts.jsonl"},
            "rewards": [{"function": "banana_format"}],
            "eval": {"gold": [{"function": "builtin:gold_positivity"}]},
        },
    )
    resolved = resolve_config(cfg)
    assert resolved.model.path == resolved.ref_model == str(micro_sft_model)
    assert resolved.data.prompts.endswith("prompts_train.jsonl") and Path(resolved.data.prompts).is_file()
    assert resolved.data.eval_prompts == "my_prompts.jsonl"
    assert resolved.eval.gold[0].function == "heed.demo.builtin:gold_positivity"
    assert resolve_config(resolved) is resolved  # nothing left to resolve

    bad = cfg.model_copy(update={"rewards": [cfg.rewards[0].model_copy(update={"function": "builtin:nope"})]})
    with pytest.raises(ConfigError) as err:
        resolve_config(bad)
    assert str(err.value).startswith(
        "rewards[0].function: 'builtin:nope' is not a built-in name; expected builtin["
    )

    from heed.train.rl import train_rl

    with pytest.raises(
        ConfigError, match=r"model.path=builtin:micro, ref_model=builtin:micro, .*resolve_config"
    ):
        train_rl(cfg)  # the trainer takes paths only


def test_gold_positivity_is_the_hidden_tone() -> None:
    from heed.demo.corpus import tone_of

    texts = ["Chess is wonderful and full of joy.", "Chess is boring and a waste of time."]
    assert gold_positivity(["p", "p"], texts) == [tone_of(t) for t in texts]
    assert gold_positivity(["p", "p"], texts)[0] > 0 > gold_positivity(["p", "p"], texts)[1]


def test_nothing_below_the_edge_imports_heed_demo() -> None:
    """Only heed.cli and heed.demo know the built-in world; every other package takes paths."""
    import ast

    src = Path(__file__).resolve().parents[2] / "src" / "heed"
    offenders = []
    for f in sorted(src.rglob("*.py")):
        if f.relative_to(src).parts[0] in ("cli", "demo"):
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{f.relative_to(src)}:{node.lineno}: {n}" for n in names if n.startswith("heed.demo")
            ]
    assert not offenders, offenders

"""Config loading: YAML < --set overrides, unknown keys and bad values name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from heed.config import load_config, parse_overrides, save_config
from heed.config.sft import SFTConfig
from heed.errors import ConfigError


def test_yaml_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: m}\ndata: {train: t.jsonl, max_length: 64}\noptim: {lr: 0.001}\n")
    cfg = load_config(SFTConfig, f, ["optim.lr=5e-4", "data.packing=true", "train.max_steps=7"])
    assert cfg.optim.lr == 5e-4 and cfg.data.packing is True and cfg.train.max_steps == 7
    assert cfg.data.max_length == 64 and cfg.model.path == "m"


def test_parse_overrides_nested_and_typed() -> None:
    assert parse_overrides(["a.b=1", "a.c=[1, 2]", "d=hello", "e=null"]) == {
        "a": {"b": 1, "c": [1, 2]},
        "d": "hello",
        "e": None,
    }
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["novalue"])


def test_unknown_key_names_key_and_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, None, ["model.path=m", "data.train=t", "optim.lrr=1"])
    msg = str(err.value)
    assert "unknown config key 'optim.lrr'" in msg and "lr" in msg and "warmup_steps" in msg


def test_bad_value_names_key_and_allowed() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, None, ["model.path=m", "data.train=t", "data.kind=images"])
    assert "data.kind" in str(err.value) and "'sft' or 'text'" in str(err.value)
    with pytest.raises(ConfigError, match=r"optim\.lr.*greater than 0"):
        load_config(SFTConfig, None, ["model.path=m", "data.train=t", "optim.lr=-1"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_config(SFTConfig, bad)


def test_saved_config_reloads_identically(tmp_path: Path) -> None:
    cfg = load_config(SFTConfig, None, ["model.path=m", "data.train=t", "optim.betas=[0.8, 0.9]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(SFTConfig, tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["betas"] == [0.8, 0.9]


def test_configs_are_frozen() -> None:
    cfg = load_config(SFTConfig, None, ["model.path=m", "data.train=t"])
    with pytest.raises(Exception, match="frozen"):
        cfg.out = "x"  # type: ignore[misc]


def test_rl_old_key_names_move_to_their_new_place_and_warn_once() -> None:
    import warnings

    from heed.config import load_config
    from heed.config.rl import RLConfig, _warned

    _warned.clear()
    sets = [
        "model.path=builtin",
        "data.prompts=p.jsonl",
        "rewards=[{function: banana_format}]",
        "ppo.epochs=3",
        "ppo.grpo_scale=false",
        "critic_lr=0.002",
        "ppo.vf_coef=0.5",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(RLConfig, None, sets)
        load_config(RLConfig, None, sets)  # a second load warns no more
    assert cfg.update.epochs == 3
    assert cfg.advantages.scale_rewards == "none"  # false meant Dr. GRPO: no scaling
    assert cfg.ppo.critic_lr == 0.002 and cfg.ppo.vf_coef == 0.5
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, FutureWarning))
    assert messages == [
        "config key 'critic_lr' is now 'ppo.critic_lr'; the old name still works in this release",
        "config key 'ppo.epochs' is now 'update.epochs'; the old name still works in this release",
        "config key 'ppo.grpo_scale' is now 'advantages.scale_rewards'; the old name still works in this release",
    ]


def test_rl_old_and_new_name_together_is_an_error() -> None:
    from heed.config import load_config
    from heed.config.rl import RLConfig
    from heed.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'ppo\.epochs' and its new name 'update\.epochs' are both set"):
        load_config(
            RLConfig,
            None,
            [
                "model.path=builtin",
                "data.prompts=p.jsonl",
                "rewards=[{function: f}]",
                "ppo.epochs=2",
                "update.epochs=3",
            ],
        )


def test_rl_unknown_key_is_still_an_error() -> None:
    from heed.config import load_config
    from heed.config.rl import RLConfig
    from heed.errors import ConfigError

    with pytest.raises(ConfigError, match=r"update\.epoch"):
        load_config(
            RLConfig,
            None,
            ["model.path=builtin", "data.prompts=p.jsonl", "rewards=[{function: f}]", "update.epoch=2"],
        )


def test_missing_required_key_says_which_key_to_set_with_an_example(tmp_path: Path) -> None:
    from heed.config.dpo import DPOConfig
    from heed.config.reward import RMConfig

    # set to null in a YAML file (as the old configs/rm.yaml did), and left out altogether
    f = tmp_path / "rm.yaml"
    f.write_text("model: {path: m}\ndata: {train: null}\n")
    with pytest.raises(ConfigError) as err:
        load_config(RMConfig, f)
    assert str(err.value) == (
        f"{f}: config key 'data.train' is required: set it in the config or with --set "
        "data.train=rankings.jsonl (Training file (.jsonl/.json/.parquet) of pairs and/or ranked groups; "
        "or builtin:rankings or builtin:pairs for the built-in data)"
    )
    # a whole required section left out names the key inside it
    with pytest.raises(ConfigError) as err:
        load_config(DPOConfig, None, ["model.path=m"])
    msg = str(err.value)
    assert "config key 'data.train' is required" in msg and "--set data.train=prefs.jsonl" in msg
    assert "builtin:pairs" in msg and "\n" not in msg
    # other errors keep their form
    with pytest.raises(
        ConfigError, match=r"config key 'data.train': Input should be a valid string \(got 3\)"
    ):
        load_config(DPOConfig, None, ["model.path=m", "data.train=3"])

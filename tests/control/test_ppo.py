"""PPO on CartPole learns on a small CPU budget; run folder, eval, resume and bad-input errors."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from heed.cli import main
from heed.control.config import ControlConfig
from heed.control.envs import make_vec_env
from heed.control.ppo import evaluate_run, train
from heed.errors import ConfigError, HeedError
from heed.report.metrics import read_metrics, series

SMALL = {"num_envs": 4, "num_steps": 128, "progress": False, "eval_episodes": 3}


def test_cartpole_return_rises_on_a_small_budget(tmp_path) -> None:
    cfg = ControlConfig(env_id="CartPole-v1", total_steps=16_384, out=str(tmp_path / "run"), seed=0, **SMALL)
    summary = train(cfg)
    returns = [r for _, r in series(read_metrics(tmp_path / "run"), "episode_return")]
    # A random CartPole policy lasts ~22 steps; after 32 updates the recent episodes last far longer.
    assert np.mean(returns[:2]) < 40
    assert returns[-1] > 2.5 * np.mean(returns[:2])
    assert summary["eval_return_mean"] > 100
    for name in ("config.yaml", "metrics.jsonl", "policy.pt", "summary.json"):
        assert (tmp_path / "run" / name).is_file()
    row = read_metrics(tmp_path / "run")[0]
    for key in ("approx_kl", "approx_kl_k1", "clipfrac", "explained_variance", "entropy", "episode_length"):
        assert key in row
    flat = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert all(not isinstance(v, dict | list) for v in flat.values())
    # The saved policy replays deterministically from the run folder.
    again = evaluate_run(tmp_path / "run", episodes=3)
    assert again["mean"] == pytest.approx(summary["eval_return_mean"])


def test_pendulum_runs_with_normalisation_and_logs_action_std(tmp_path) -> None:
    cfg = ControlConfig(
        env_id="Pendulum-v1", total_steps=1024, num_envs=2, num_steps=256, normalize_obs=True,
        normalize_reward=True, gamma=0.9, out=str(tmp_path / "p"), progress=False, eval_episodes=1,
    )  # fmt: skip
    summary = train(cfg)
    rows = read_metrics(tmp_path / "p")
    # Pendulum never terminates: its episodes always end by truncation at 200 steps.
    assert [r["episode_length"] for r in rows if r["split"] == "train"][-1] == 200
    assert "action_std" in rows[0]
    assert summary["eval_episode_length_mean"] == 200


def test_resume_continues_from_the_last_checkpoint(tmp_path) -> None:
    base = dict(env_id="CartPole-v1", total_steps=2048, out=str(tmp_path / "r"), save_every=2, **SMALL)
    train(ControlConfig(**base))
    assert (tmp_path / "r" / "checkpoints" / "update-4" / "state.pt").is_file()
    # A longer budget picks up at update 4 (step 2048) and logs only the new updates.
    train(ControlConfig(**{**base, "total_steps": 3072}), resume=True)
    steps = [r["step"] for r in read_metrics(tmp_path / "r") if r["split"] == "train"]
    assert steps == [512, 1024, 1536, 2048, 2560, 3072]


def test_unknown_env_id_is_one_clear_error() -> None:
    with pytest.raises(HeedError, match="unknown Gymnasium environment id 'NoSuchEnv-v0'"):
        make_vec_env("NoSuchEnv-v0", 1)


class _OddEnv(gym.Env):
    def __init__(self, action_space) -> None:
        self.observation_space = spaces.Box(-1.0, 1.0, shape=(3,), dtype=np.float32)
        self.action_space = action_space

    def reset(self, *, seed=None, options=None):
        return np.zeros(3, dtype=np.float32), {}

    def step(self, action):
        return np.zeros(3, dtype=np.float32), 0.0, True, False, {}


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            spaces.MultiDiscrete([2, 3]),
            "action space MultiDiscrete is not supported; expected Box or Discrete",
        ),
        (spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32), "Box action space has infinite bounds"),
        (
            spaces.Box(np.array([-1.0, -1.0], np.float32), np.array([1.0, np.inf], np.float32)),
            "Box action space has infinite bounds",
        ),
    ],
)
def test_unsupported_action_spaces_are_clear_errors(space, message) -> None:
    with pytest.raises(HeedError, match=message):
        make_vec_env(lambda: _OddEnv(space), 1, name="odd")


def test_bad_minibatch_split_names_the_keys() -> None:
    with pytest.raises(ConfigError, match="num_minibatches"):
        from heed.config import config_from_dict

        config_from_dict(ControlConfig, {"num_envs": 3, "num_steps": 5, "num_minibatches": 4})


def test_cli_unknown_env_prints_one_line_and_exits_2(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["control", "--env", "NoSuchEnv-v0", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown Gymnasium environment id 'NoSuchEnv-v0'")
    assert "\n" not in err


def test_cli_trains_and_evaluates(tmp_path, capsys) -> None:
    run = tmp_path / "cli"
    main(["control", "--env", "CartPole-v1", "--steps", "1024", "--out", str(run),
          "--set", "progress=false", "--set", "eval_episodes=2"])  # fmt: skip
    assert json.loads((run / "summary.json").read_text())["env_steps"] >= 1024
    capsys.readouterr()
    main(["control", "--eval", str(run), "--episodes", "2"])
    assert "CartPole-v1: return" in capsys.readouterr().out


def test_cli_eval_of_a_folder_without_policy_is_clear(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["control", "--eval", str(tmp_path)])
    assert exc.value.code == 2
    assert "no saved policy here" in capsys.readouterr().err


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_shipped_presets_load_and_are_picked_by_env_id(env_id) -> None:
    from heed.cli.control_cmds import preset_for
    from heed.config import load_config

    preset = preset_for(env_id)
    assert preset is not None
    cfg = load_config(ControlConfig, preset)
    assert cfg.env_id == env_id
    assert cfg.total_steps == 100_000


def test_every_config_field_is_read() -> None:
    from pathlib import Path

    from heed.control.config import BanditConfig

    src = Path(__file__).resolve().parents[2] / "src" / "heed" / "control"
    ppo_src = (src / "ppo.py").read_text()
    # the bandit's texts are drawn where its data is made: the command line (heed.demo gives them)
    bandit_src = (src / "bandit.py").read_text() + (src.parent / "cli" / "control_cmds.py").read_text()
    derived = (src / "config.py").read_text()  # total_steps is read through num_updates
    for name in ControlConfig.model_fields:
        assert f"cfg.{name}" in ppo_src or f"self.{name}" in derived, f"ControlConfig.{name} is never read"
    for name in BanditConfig.model_fields:
        assert f"cfg.{name}" in bandit_src, f"BanditConfig.{name} is never read"

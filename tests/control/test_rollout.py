"""Termination, truncation and next-step autoreset on a tiny hand-made env, checked step by step."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from heed.control.config import ControlConfig
from heed.control.envs import ObsNormalizer, RewardScaler, RunningMeanStd, make_vec_env
from heed.control.ppo import RolloutCollector, make_policy, rollout_advantages


class ChainEnv(gym.Env):
    """Deterministic episodes that alternate: even episodes *terminate* after 3 steps, odd ones are
    *truncated* after 2. Observation ``[k, e]`` = (step within the episode, episode number), so the
    final observation of every episode is recognisable. Reward at step k is ``1 + 0.1 k``.
    Every action the env receives is recorded in ``received``."""

    def __init__(self, box: bool = False) -> None:
        self.observation_space = spaces.Box(-100.0, 100.0, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32) if box else spaces.Discrete(2)
        self.episode = -1
        self.k = 0
        self.received: list = []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.k = 0
        return np.array([self.k, self.episode], dtype=np.float32), {}

    def step(self, action):
        self.received.append(np.array(action).copy())
        reward = 1.0 + 0.1 * self.k
        self.k += 1
        terminated = self.episode % 2 == 0 and self.k == 3
        truncated = self.episode % 2 == 1 and self.k == 2
        return np.array([self.k, self.episode], dtype=np.float32), reward, terminated, truncated, {}


def _collector(box: bool = False, log_std_init: float = 0.0):
    envs = make_vec_env(lambda: ChainEnv(box), num_envs=1, name="chain")
    torch.manual_seed(0)
    policy = make_policy(envs, ControlConfig(hidden_sizes=(8,), log_std_init=log_std_init))
    coll = RolloutCollector(
        envs, policy, ObsNormalizer((2,), enabled=False), RewardScaler(1, 0.9, enabled=False), seed=0
    )
    return envs, policy, coll


def test_rollout_marks_reset_steps_and_keeps_termination_and_truncation_apart() -> None:
    envs, policy, coll = _collector()
    ro = coll.collect(8)
    # t: obs fed      -> obs returned, reward, flags
    # 0: [0,0]        -> [1,0] 1.0
    # 1: [1,0]        -> [2,0] 1.1
    # 2: [2,0]        -> [3,0] 1.2  terminated (episode 0 ends after 3 steps)
    # 3: [3,0] reset step: the env ignores the action, returns [0,1] with reward 0
    # 4: [0,1]        -> [1,1] 1.0
    # 5: [1,1]        -> [2,1] 1.1  truncated (episode 1 is cut after 2 steps)
    # 6: [2,1] reset step -> [0,2]
    # 7: [0,2]        -> [1,2] 1.0
    assert ro.obs[0, :, 0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert ro.valid_mask[0].tolist() == [True, True, True, False, True, True, False, True]
    assert ro.terminated[0].tolist() == [False, False, True, False, False, False, False, False]
    assert ro.truncated[0].tolist() == [False, False, False, False, False, True, False, False]
    assert ro.rewards[0].tolist() == pytest.approx([1.0, 1.1, 1.2, 0.0, 1.0, 1.1, 0.0, 1.0])
    # The truncated step bootstraps from V(final observation [2, 1]) ...
    with torch.no_grad():
        v_final = policy.value(torch.tensor([[2.0, 1.0]]))[0]
        v_last = policy.value(torch.tensor([[1.0, 2.0]]))[0]
    assert ro.next_values[0, 5].item() == pytest.approx(v_final.item())
    # ... and the rollout's last step from V(the observation after it).
    assert ro.next_values[0, 7].item() == pytest.approx(v_last.item())
    # The env received 6 actions for 8 steps: the two reset steps never reached `step`.
    assert len(envs.envs[0].received) == 6
    # Episode stats count only real steps: 3 steps of 1.0+1.1+1.2, then 2 steps of 1.0+1.1.
    assert coll.drain_episodes() == [(pytest.approx(3.3), 3), (pytest.approx(2.1), 2)]


def test_gae_cuts_at_episode_ends_and_bootstraps_truncation() -> None:
    _, _, coll = _collector()
    ro = coll.collect(8)
    ro.values.fill_(0.5)
    ro.next_values.fill_(0.5)
    adv, ret = rollout_advantages(ro, gamma=0.9, lam=0.8)
    # delta_t = r_t + d_t * 0.5 - 0.5 with d_t = 0.9, or 0 at the terminal step (t=2) and reset steps.
    # A_t = delta_t + d_t * lam * c_t * A_{t+1}, c_t = 0 at every episode end (t=2, t=5) and reset step.
    # t7: 1.0 + 0.45 - 0.5 = 0.95 (last step)
    # t6: reset step, 0 - 0.5 = -0.5 (not learned from)
    # t5: truncated: 1.1 + 0.45 - 0.5 = 1.05, no link to t6
    # t4: 0.95 + 0.9*0.8*1.05 = 1.706
    # t3: reset step -0.5
    # t2: terminated: 1.2 - 0.5 = 0.7 (no bootstrap, no link)
    # t1: 1.05 + 0.72*0.7 = 1.554
    # t0: 0.95 + 0.72*1.554 = 2.06888
    expected = [2.06888, 1.554, 0.7, -0.5, 1.706, 1.05, -0.5, 0.95]
    assert adv[0].tolist() == pytest.approx(expected, abs=1e-5)
    assert ret[0].tolist() == pytest.approx([a + 0.5 for a in expected], abs=1e-5)


def test_box_actions_are_clipped_for_the_env_but_stored_unclipped() -> None:
    envs, _, coll = _collector(box=True, log_std_init=1.0)  # std e = 2.7: most samples leave [-1, 1]
    ro = coll.collect(16)
    stored = ro.actions[0][ro.valid_mask[0]].squeeze(-1).numpy()
    received = np.concatenate(envs.envs[0].received)
    assert np.abs(stored).max() > 1.0
    assert np.abs(received).max() <= 1.0
    np.testing.assert_allclose(received, np.clip(stored, -1, 1), rtol=1e-6)


def test_running_mean_std_matches_numpy_over_batches() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(300, 2))
    rms = RunningMeanStd((2,), epsilon=0.0)
    for chunk in np.array_split(data, 7):
        rms.update(chunk)
    np.testing.assert_allclose(rms.mean, data.mean(0), rtol=1e-10)
    np.testing.assert_allclose(rms.var, data.var(0), rtol=1e-10)


def test_reward_scaler_divides_by_return_std_and_restarts_at_episode_end() -> None:
    scaler = RewardScaler(num_envs=1, gamma=0.5, enabled=True)
    valid, ended = np.array([True]), np.array([False])
    scaler(np.array([2.0]), ended, valid)  # G = 2
    scaler(np.array([2.0]), np.array([True]), valid)  # G = 0.5*2 + 2 = 3, then restarts
    assert scaler.returns[0] == 0.0
    out = scaler(np.array([4.0]), ended, np.array([False]))  # reset step: statistics untouched
    # statistics of {2, 3} (plus a 1e-4-weight prior at mean 0 var 1): var ~ 0.25
    assert scaler.rms.var == pytest.approx(0.25, rel=1e-2)
    assert out[0] == pytest.approx(4.0 / np.sqrt(scaler.rms.var + 1e-8), rel=1e-6)

"""Gymnasium vector environments for PPO, with the checks that turn bad input into one-line errors.

Autoreset: the vector env runs in Gymnasium 1.x's default *next-step* mode. When an episode ends at
step t (terminated or truncated), the observation returned at t is the episode's final observation;
the next ``step`` ignores its action and returns the first observation of a new episode with
reward 0 and no end flags. The trainer therefore (1) bootstraps a truncated step from the value of
the observation returned with it, (2) marks the following step as a reset step that is not learned
from, and (3) cuts GAE at every episode end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from heed.errors import HeedError

EnvFactory = Callable[[], Any]


def check_spaces(env_id: str, observation_space: Any, action_space: Any) -> None:
    """Raise a one-line :class:`HeedError` unless the env has a flat Box observation and a
    Discrete or finite Box action space."""
    from gymnasium import spaces

    if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 1:
        raise HeedError(
            f"{env_id}: observation space {observation_space} is not supported; "
            "expected a flat Box (a 1-D vector of floats)"
        )
    if isinstance(action_space, spaces.Discrete):
        return
    if isinstance(action_space, spaces.Box):
        if len(action_space.shape) != 1:
            raise HeedError(f"{env_id}: Box action space must be 1-D, got shape {action_space.shape}")
        if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
            raise HeedError(
                f"{env_id}: Box action space has infinite bounds (low={action_space.low}, high={action_space.high}); "
                "PPO clips actions to the bounds, so they must be finite"
            )
        return
    raise HeedError(
        f"{env_id}: action space {type(action_space).__name__} is not supported; expected Box or Discrete"
    )


def env_factory(env_id: str, **kwargs: Any) -> EnvFactory:
    """A factory for ``gymnasium.make(env_id)``; raises :class:`HeedError` for an unknown id at once."""
    import gymnasium as gym

    try:
        gym.spec(env_id)
    except gym.error.Error as exc:
        raise HeedError(
            f"unknown Gymnasium environment id '{env_id}' ({exc}); e.g. CartPole-v1, Pendulum-v1"
        ) from None

    def make() -> Any:
        try:
            return gym.make(env_id, **kwargs)
        except gym.error.Error as exc:  # e.g. DependencyNotInstalled (box2d, mujoco)
            raise HeedError(f"cannot create Gymnasium environment '{env_id}': {exc}") from None

    return make


def make_vec_env(env: str | EnvFactory, num_envs: int, name: str | None = None) -> Any:
    """A synchronous vector env of ``num_envs`` copies in next-step autoreset mode.

    ``env`` is a Gymnasium id or a zero-argument factory (tests pass hand-made envs).
    """
    from gymnasium.vector import AutoresetMode, SyncVectorEnv

    factory = env_factory(env) if isinstance(env, str) else env
    label = name or (env if isinstance(env, str) else getattr(env, "__name__", "env"))
    # Check the spaces on one instance before building the vector (clear error, nothing left open).
    probe = factory()
    try:
        check_spaces(label, probe.observation_space, probe.action_space)
    finally:
        probe.close()
    return SyncVectorEnv([factory for _ in range(num_envs)], autoreset_mode=AutoresetMode.NEXT_STEP)


class RunningMeanStd:
    """Running mean and variance over a stream of batches (Chan et al.'s parallel update).

    https://en.wikipedia.org/wiki/Algorithms_for_calculating_variance#Parallel_algorithm
    """

    def __init__(self, shape: tuple[int, ...] = (), epsilon: float = 1e-4) -> None:
        self.mean = np.zeros(shape, dtype=np.float64)
        self.var = np.ones(shape, dtype=np.float64)
        self.count = epsilon

    def update(self, x: np.ndarray) -> None:
        """Fold a batch ``x`` of shape ``(N, *shape)`` into the statistics."""
        if x.shape[0] == 0:
            return
        batch_mean, batch_var, n = x.mean(axis=0), x.var(axis=0), x.shape[0]
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * n / total
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": float(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = np.asarray(state["mean"], dtype=np.float64)
        self.var = np.asarray(state["var"], dtype=np.float64)
        self.count = float(state["count"])


class ObsNormalizer:
    """``clip((obs - mean) / sqrt(var + eps), -clip, clip)`` with running statistics; identity when disabled."""

    def __init__(self, shape: tuple[int, ...], enabled: bool, clip: float = 10.0, eps: float = 1e-8) -> None:
        self.enabled = enabled
        self.rms = RunningMeanStd(shape)
        self.clip = clip
        self.eps = eps

    def __call__(self, obs: np.ndarray, update: bool = False) -> np.ndarray:
        if not self.enabled:
            return obs.astype(np.float32)
        if update:
            self.rms.update(obs)
        out = (obs - self.rms.mean) / np.sqrt(self.rms.var + self.eps)
        return np.clip(out, -self.clip, self.clip).astype(np.float32)


class RewardScaler:
    """Scale rewards by the running std of the discounted return ``G_t = gamma*G_{t-1} + r_t``.

    The reward-normalisation of OpenAI baselines' ``VecNormalize`` (no mean subtraction, so the
    sign of rewards is kept); ``G`` restarts at every episode end. Identity when disabled.
    """

    def __init__(
        self, num_envs: int, gamma: float, enabled: bool, clip: float = 10.0, eps: float = 1e-8
    ) -> None:
        self.enabled = enabled
        self.gamma = gamma
        self.rms = RunningMeanStd(())
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.clip = clip
        self.eps = eps

    def __call__(self, rewards: np.ndarray, ended: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """``rewards``, ``ended`` (terminated or truncated) and ``valid`` (not a reset step): shape ``(num_envs,)``."""
        if not self.enabled:
            return rewards.astype(np.float32)
        self.returns = np.where(valid, self.returns * self.gamma + rewards, self.returns)
        self.rms.update(self.returns[valid])
        self.returns = np.where(ended, 0.0, self.returns)
        out = rewards / np.sqrt(self.rms.var + self.eps)
        return np.clip(out, -self.clip, self.clip).astype(np.float32)

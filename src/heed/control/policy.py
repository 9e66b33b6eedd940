"""Actor and critic MLPs for classic control: a Gaussian policy for Box actions, a categorical one
for Discrete actions, and a separate value network.

Orthogonal init as in the PPO implementation details (Huang et al. 2022,
https://iclr-blog-track.github.io/2022/03/25/ppo-implementation-details/): hidden layers gain
sqrt(2), the policy output gain 0.01 (near-uniform start), the value output gain 1, biases 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Categorical, Normal


def layer_init(layer: nn.Linear, gain: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    """Orthogonal weight init with ``gain``, constant bias."""
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.constant_(layer.bias, bias)
    return layer


def mlp(
    in_dim: int, hidden: tuple[int, ...], out_dim: int, activation: str, out_gain: float
) -> nn.Sequential:
    """``in -> hidden... -> out`` with ``activation`` between layers, orthogonally initialised."""
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    last = in_dim
    for width in hidden:
        layers += [layer_init(nn.Linear(last, width)), act()]
        last = width
    layers.append(layer_init(nn.Linear(last, out_dim), gain=out_gain))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class PolicySpec:
    """Everything needed to rebuild a policy from its saved weights."""

    obs_dim: int
    action_dim: int  # number of actions (Discrete) or action vector size (Box)
    discrete: bool
    hidden_sizes: tuple[int, ...]
    activation: str
    log_std_init: float
    action_low: tuple[float, ...] | None = None
    action_high: tuple[float, ...] | None = None


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs.

    Discrete: ``pi(a|s) = Categorical(logits = actor(s))``.
    Box: ``pi(a|s) = Normal(actor(s), exp(log_std))`` per dimension, with ``log_std`` a learned
    state-independent vector; log-probs and entropies sum over action dimensions.
    Shapes: ``obs (B, obs_dim)`` -> values ``(B,)``, log-probs ``(B,)``, actions ``(B,)`` or ``(B, action_dim)``.
    """

    def __init__(self, spec: PolicySpec) -> None:
        super().__init__()
        self.spec = spec
        self.actor = mlp(spec.obs_dim, spec.hidden_sizes, spec.action_dim, spec.activation, out_gain=0.01)
        self.critic = mlp(spec.obs_dim, spec.hidden_sizes, 1, spec.activation, out_gain=1.0)
        if not spec.discrete:
            self.log_std = nn.Parameter(torch.full((spec.action_dim,), float(spec.log_std_init)))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s): ``(B, obs_dim) -> (B,)``."""
        return self.critic(obs).squeeze(-1)

    def distribution(self, obs: torch.Tensor) -> Categorical | Normal:
        out = self.actor(obs)
        if self.spec.discrete:
            return Categorical(logits=out)
        return Normal(out, self.log_std.exp().expand_as(out))

    def log_prob_entropy(
        self, dist: Categorical | Normal, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``log pi(a|s)`` and the entropy, both ``(B,)``."""
        if self.spec.discrete:
            return dist.log_prob(actions.long()), dist.entropy()
        return dist.log_prob(actions).sum(-1), dist.entropy().sum(-1)

    def act(self, obs: torch.Tensor, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample (or take the mode of) an action; returns ``(actions, log-probs (B,))``.

        Box actions are returned unclipped (what the policy sampled); :meth:`env_action` clips them.
        """
        dist = self.distribution(obs)
        if deterministic:
            actions = dist.probs.argmax(-1) if self.spec.discrete else dist.mean
        else:
            actions = dist.sample()
        logprobs, _ = self.log_prob_entropy(dist, actions)
        return actions, logprobs

    def env_action(self, actions: torch.Tensor):  # -> np.ndarray
        """The action handed to the env: integer labels, or Box actions clipped to the bounds."""
        arr = actions.cpu().numpy()
        if self.spec.discrete:
            return arr.astype("int64")
        import numpy as np

        return np.clip(arr, np.asarray(self.spec.action_low), np.asarray(self.spec.action_high)).astype(
            np.float32
        )

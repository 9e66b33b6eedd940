"""The math of Heed: pure torch functions shared by LLM RL and classic control.

Only ``torch`` is imported here. Time is the last dimension; ``*_mask`` is True where
an entry counts. Losses return unreduced tensors plus a frozen stats dataclass of
detached scalars; :func:`aggregate` does every reduction.
"""

from __future__ import annotations

from heed.algos.advantages import (
    ema_update,
    gae,
    grpo_advantages,
    informative_groups,
    overlong_penalty,
    reinforce_advantages,
    rloo_advantages,
    step_token_rewards,
    token_gae,
)
from heed.algos.correction import engine_importance_weights
from heed.algos.entropy import EntropyController
from heed.algos.kl import (
    AdaptiveKLController,
    FixedKLController,
    best_of_n_kl,
    kl_estimate,
    kl_penalized_rewards,
)
from heed.algos.losses import (
    PolicyStats,
    RankingStats,
    ValueStats,
    bradley_terry_loss,
    dpo_loss,
    kto_loss,
    lm_loss,
    policy_loss,
    ranking_loss,
    simpo_loss,
    value_loss,
)
from heed.algos.ops import (
    aggregate,
    entropy_from_logits,
    explained_variance,
    inverse_cdf,
    masked_mean,
    masked_sum,
    masked_var,
    selective_log_softmax,
    selective_log_softmax_with_entropy,
    whiten,
)

__all__ = [
    "AdaptiveKLController",
    "EntropyController",
    "FixedKLController",
    "PolicyStats",
    "RankingStats",
    "ValueStats",
    "aggregate",
    "best_of_n_kl",
    "bradley_terry_loss",
    "dpo_loss",
    "ema_update",
    "engine_importance_weights",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "grpo_advantages",
    "informative_groups",
    "inverse_cdf",
    "kl_estimate",
    "kl_penalized_rewards",
    "kto_loss",
    "lm_loss",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "overlong_penalty",
    "policy_loss",
    "ranking_loss",
    "reinforce_advantages",
    "rloo_advantages",
    "selective_log_softmax",
    "selective_log_softmax_with_entropy",
    "simpo_loss",
    "step_token_rewards",
    "token_gae",
    "value_loss",
    "whiten",
]

"""Configs of the classic-control commands: PPO on Gymnasium and the bandit classifier.

Defaults follow CleanRL's ``ppo.py`` / ``ppo_continuous_action.py``; the tuned presets for
CartPole-v1 and Pendulum-v1 live in ``configs/control/``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from heed.config import HeedConfig


class ControlConfig(HeedConfig):
    """PPO on a Gymnasium vector environment (``heed control``)."""

    env_id: str = Field(
        "CartPole-v1", description="Gymnasium environment id, e.g. CartPole-v1 or Pendulum-v1."
    )
    out: str = Field(
        "runs/control", description="Run folder (config.yaml, metrics.jsonl, policy.pt, summary.json)."
    )
    seed: int = Field(
        1, description="Seed of torch, the action sampler and the environments (env i gets seed+i)."
    )
    total_steps: int = Field(
        100_000, ge=1, description="Environment steps to train for (summed over the vector envs)."
    )
    num_envs: int = Field(4, ge=1, description="Parallel environments (synchronous vector env).")
    num_steps: int = Field(
        128, ge=1, description="Steps per env per rollout; one update uses num_envs*num_steps steps."
    )
    gamma: float = Field(0.99, ge=0, le=1, description="Discount factor.")
    gae_lambda: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    lr: float = Field(2.5e-4, gt=0, description="Adam learning rate (Adam eps is 1e-5).")
    anneal_lr: bool = Field(True, description="Decay the learning rate linearly to 0 over the run.")
    update_epochs: int = Field(4, ge=1, description="Passes over each rollout per update.")
    num_minibatches: int = Field(
        4, ge=1, description="Minibatches per pass (minibatch = rollout size / this)."
    )
    norm_adv: bool = Field(True, description="Whiten advantages within each minibatch.")
    clip_eps: float = Field(0.2, gt=0, description="PPO clip range of the probability ratio.")
    clip_vloss: bool = Field(
        True, description="Clip the value loss around the rollout's values (clip_eps wide)."
    )
    ent_coef: float = Field(0.01, ge=0, description="Entropy bonus coefficient.")
    vf_coef: float = Field(0.5, ge=0, description="Value loss coefficient.")
    max_grad_norm: float = Field(
        0.5, gt=0, description="Clip the global gradient norm of each update to this."
    )
    target_kl: float | None = Field(
        None, description="Stop an update's epochs early when approx_kl (k3) exceeds this."
    )
    hidden_sizes: tuple[int, ...] = Field(
        (64, 64), description="Hidden layer widths of both the actor and the critic."
    )
    activation: Literal["tanh", "relu"] = Field("tanh", description="Hidden activation of the MLPs.")
    log_std_init: float = Field(
        0.0, description="Initial log standard deviation of the Gaussian policy (Box actions)."
    )
    normalize_obs: bool = Field(
        False, description="Normalise observations by running mean/std (saved with the policy)."
    )
    normalize_reward: bool = Field(
        False, description="Scale rewards by the running std of the discounted return."
    )
    clip_obs: float = Field(10.0, gt=0, description="Clip normalised observations to +-this.")
    clip_reward: float = Field(10.0, gt=0, description="Clip normalised rewards to +-this.")
    eval_episodes: int = Field(
        10, ge=0, description="Deterministic evaluation episodes at the end of training."
    )
    log_every: int = Field(1, ge=1, description="Write metrics every N updates.")
    save_every: int = Field(
        0, ge=0, description="Checkpoint every N updates into checkpoints/; 0 only at the end."
    )
    progress: bool = Field(True, description="Show a progress bar with ETA.")
    threads: int = Field(1, ge=1, description="torch threads (small MLPs run fastest on one).")

    @model_validator(mode="after")
    def _check_minibatches(self) -> ControlConfig:
        if self.batch_size % self.num_minibatches:
            raise ValueError(
                f"num_envs*num_steps = {self.batch_size} must be divisible by num_minibatches = {self.num_minibatches}"
            )
        return self

    @property
    def batch_size(self) -> int:
        """Transitions per rollout (num_envs * num_steps)."""
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        """Transitions per minibatch."""
        return self.batch_size // self.num_minibatches

    @property
    def num_updates(self) -> int:
        """PPO updates in the run: total_steps / batch_size, rounded up."""
        return -(-self.total_steps // self.batch_size)


class BanditConfig(HeedConfig):
    """A text classifier tuned by PPO as a contextual bandit from simulated feedback (``heed control bandit``)."""

    out: str = Field("runs/bandit", description="Run folder.")
    seed: int = Field(0, description="Seed of the corpus split, the model init and the annotator.")
    num_texts: int = Field(1200, ge=30, description="Corpus answers drawn: train share + held-out share.")
    eval_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share drawn from held-out prompts for accuracy."
    )
    vocab_size: int = Field(
        512, ge=300, description="Vocabulary of the tiny BPE tokenizer trained on the train texts."
    )
    max_length: int = Field(48, ge=4, description="Truncate texts to this many tokens.")
    model_size: Literal["micro", "tiny", "small"] = Field(
        "micro", description="Size of the BERT-style classifier."
    )
    warm_start_examples: int = Field(
        24, ge=0, description="Labelled texts used to build the weak starting classifier."
    )
    warm_start_steps: int = Field(
        30, ge=0, description="Supervised steps on those texts (a weak start, not a good one)."
    )
    warm_start_lr: float = Field(1e-3, gt=0, description="Learning rate of the warm start.")
    steps: int = Field(60, ge=1, description="PPO bandit rounds (one batch of predictions + feedback each).")
    batch_size: int = Field(64, ge=2, description="Texts the classifier labels per round.")
    update_epochs: int = Field(2, ge=1, description="PPO passes over each round's batch.")
    num_minibatches: int = Field(2, ge=1, description="Minibatches per pass.")
    lr: float = Field(5e-4, gt=0, description="Adam learning rate of the PPO phase.")
    clip_eps: float = Field(0.2, gt=0, description="PPO clip range.")
    kl_coef: float = Field(
        0.02, ge=0, description="beta of the KL penalty to the starting classifier (k1, in the reward)."
    )
    ent_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient norm clip.")
    annotator_noise: float = Field(
        0.1, ge=0, le=0.5, description="Probability the annotator flips approve/reject."
    )
    eval_every: int = Field(10, ge=1, description="Held-out accuracy every N rounds.")
    progress: bool = Field(True, description="Show a progress bar with ETA.")
    threads: int = Field(2, ge=1, description="torch threads.")

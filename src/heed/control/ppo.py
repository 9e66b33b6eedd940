"""PPO on Gymnasium vector environments, on the same math as the language-model trainers.

Read top to bottom like CleanRL's ``ppo_continuous_action.py``; the math (GAE, the clipped
surrogate, the clipped value loss, whitening, explained variance) is :mod:`heed.algos`.
Schulman et al. 2017, https://arxiv.org/abs/1707.06347.

Differences from CleanRL, on purpose:

- Termination and truncation stay separate: a time-limit truncation bootstraps from the value of
  the episode's final observation (Pendulum always truncates at 200 steps and never terminates).
- Next-step autoreset (Gymnasium 1.x): the step after an episode end is a reset step whose
  action is ignored by the env; it is masked out of the loss and GAE does not link across it.
- Box actions are clipped for the env only; the unclipped sample is stored and scored.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from heed.algos import aggregate, explained_variance, gae, policy_loss, value_loss, whiten
from heed.config import save_config
from heed.control.config import ControlConfig
from heed.control.envs import EnvFactory, ObsNormalizer, RewardScaler, make_vec_env
from heed.control.policy import ActorCritic, PolicySpec
from heed.errors import HeedError
from heed.report.metrics import MetricsLogger
from heed.report.progress import StepProgress

POLICY_FILE = "policy.pt"


@dataclass
class Rollout:
    """One rollout of ``N`` envs for ``T`` steps; every tensor is ``(N, T, ...)`` (time after envs).

    ``valid_mask`` is False at reset steps (the step after an episode end, whose action the env
    ignores). ``next_values[:, t]`` is V of the observation returned by step t, which is the
    final observation of the episode when step t ended it.
    """

    obs: torch.Tensor  # (N, T, obs_dim), normalised as the policy saw them
    actions: torch.Tensor  # (N, T) discrete or (N, T, action_dim) unclipped Box samples
    logprobs: torch.Tensor  # (N, T)
    values: torch.Tensor  # (N, T)
    next_values: torch.Tensor  # (N, T)
    rewards: torch.Tensor  # (N, T), scaled when reward normalisation is on; 0 at reset steps
    terminated: torch.Tensor  # (N, T) bool
    truncated: torch.Tensor  # (N, T) bool
    valid_mask: torch.Tensor  # (N, T) bool, True where the step is learned from


class RolloutCollector:
    """Steps the vector env with the policy and keeps the state that carries across rollouts
    (the current observation, whether the next step is a reset step, running episode stats)."""

    def __init__(
        self,
        envs: Any,
        policy: ActorCritic,
        obs_norm: ObsNormalizer,
        reward_scaler: RewardScaler,
        seed: int,
    ) -> None:
        self.envs = envs
        self.policy = policy
        self.obs_norm = obs_norm
        self.reward_scaler = reward_scaler
        self.num_envs = envs.num_envs
        self.obs, _ = envs.reset(seed=seed)
        self.reset_next = np.zeros(self.num_envs, dtype=bool)
        self.ep_return = np.zeros(self.num_envs)
        self.ep_length = np.zeros(self.num_envs, dtype=np.int64)
        self.finished: list[tuple[float, int]] = []  # (return, length) of episodes ended since last drain

    def collect(self, num_steps: int) -> Rollout:
        """Step every env ``num_steps`` times with actions sampled from the policy."""
        n = self.num_envs
        obs_dim = self.obs.shape[-1]
        spec = self.policy.spec
        obs_buf = torch.zeros(n, num_steps, obs_dim)
        act_buf = torch.zeros((n, num_steps) if spec.discrete else (n, num_steps, spec.action_dim))
        logp_buf = torch.zeros(n, num_steps)
        val_buf = torch.zeros(n, num_steps + 1)
        rew_buf = torch.zeros(n, num_steps)
        term_buf = torch.zeros(n, num_steps, dtype=torch.bool)
        trunc_buf = torch.zeros(n, num_steps, dtype=torch.bool)
        valid_buf = torch.zeros(n, num_steps, dtype=torch.bool)

        for t in range(num_steps):
            obs = torch.as_tensor(self.obs_norm(self.obs, update=True))
            with torch.no_grad():
                actions, logprobs = self.policy.act(obs)
                values = self.policy.value(obs)
            valid = ~self.reset_next
            obs_buf[:, t], act_buf[:, t], logp_buf[:, t], val_buf[:, t] = obs, actions, logprobs, values
            valid_buf[:, t] = torch.as_tensor(valid)

            self.obs, reward, terminated, truncated, _ = self.envs.step(self.policy.env_action(actions))
            reward = np.asarray(reward, dtype=np.float64)
            ended = np.logical_or(terminated, truncated)
            # At a reset step the env returns reward 0 and no end flags; mask them anyway.
            reward, terminated, truncated = reward * valid, terminated & valid, truncated & valid
            ended &= valid

            self.ep_return += reward
            self.ep_length += valid
            for i in np.flatnonzero(ended):
                self.finished.append((float(self.ep_return[i]), int(self.ep_length[i])))
            self.ep_return[ended], self.ep_length[ended] = 0.0, 0

            rew_buf[:, t] = torch.as_tensor(self.reward_scaler(reward, ended, valid))
            term_buf[:, t] = torch.as_tensor(terminated)
            trunc_buf[:, t] = torch.as_tensor(truncated)
            self.reset_next = ended

        # V of the observation after the last step (the final observation if that step ended an episode).
        with torch.no_grad():
            val_buf[:, num_steps] = self.policy.value(torch.as_tensor(self.obs_norm(self.obs)))
        return Rollout(
            obs=obs_buf,
            actions=act_buf,
            logprobs=logp_buf,
            values=val_buf[:, :-1],
            # In next-step mode the obs returned by step t is the obs fed at t+1, so V(s_{t+1}) is
            # the next column; at an episode end it is the final observation, as a truncation needs.
            next_values=val_buf[:, 1:],
            rewards=rew_buf,
            terminated=term_buf,
            truncated=trunc_buf,
            valid_mask=valid_buf,
        )

    def drain_episodes(self) -> list[tuple[float, int]]:
        """``(return, length)`` of the episodes finished since the last call (raw rewards)."""
        done, self.finished = self.finished, []
        return done


def rollout_advantages(rollout: Rollout, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over a :class:`Rollout`: ``(advantages, returns)``, both ``(N, T)``.

    ``discounts_t = gamma * (1 - terminated_t)``: a terminal step does not bootstrap, a truncated
    one does (from ``next_values_t``, the final observation's value). ``continues_t = 0`` at every
    episode end, so the recursion never reaches into the next episode; reset steps get
    discount 0 too and are masked out of the loss by ``valid_mask``.
    """
    ended = rollout.terminated | rollout.truncated
    discounts = gamma * (~rollout.terminated & rollout.valid_mask).float()
    continues = (~ended & rollout.valid_mask).float()
    return gae(rollout.rewards, rollout.values, rollout.next_values, discounts, lam, continues=continues)


def _mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a flat ``(n,)`` per-transition tensor, through the one reduction of :mod:`heed.algos`."""
    return aggregate(x, None, mode="token_mean")


def make_policy(envs: Any, cfg: ControlConfig) -> ActorCritic:
    """Build the actor-critic for the vector env's single-env spaces."""
    from gymnasium import spaces

    obs_space, act_space = envs.single_observation_space, envs.single_action_space
    discrete = isinstance(act_space, spaces.Discrete)
    spec = PolicySpec(
        obs_dim=int(obs_space.shape[0]),
        action_dim=int(act_space.n) if discrete else int(act_space.shape[0]),
        discrete=discrete,
        hidden_sizes=tuple(cfg.hidden_sizes),
        activation=cfg.activation,
        log_std_init=cfg.log_std_init,
        action_low=None if discrete else tuple(float(x) for x in act_space.low),
        action_high=None if discrete else tuple(float(x) for x in act_space.high),
    )
    return ActorCritic(spec)


def save_policy(path: Path, policy: ActorCritic, obs_norm: ObsNormalizer, env_id: str) -> None:
    """Save weights, the spec to rebuild the nets and the observation statistics."""
    torch.save(
        {
            "env_id": env_id,
            "spec": asdict(policy.spec),
            "state_dict": policy.state_dict(),
            "obs_norm": {"enabled": obs_norm.enabled, "clip": obs_norm.clip, **obs_norm.rms.state_dict()},
        },
        path,
    )


def load_policy(path: str | Path) -> tuple[ActorCritic, ObsNormalizer, str]:
    """Load ``policy.pt`` (or a run folder holding one): ``(policy, obs normaliser, env id)``."""
    p = Path(path)
    if p.is_dir():
        p = p / POLICY_FILE
    if not p.is_file():
        raise HeedError(
            f"{p}: no saved policy here; expected a run folder of `heed control` holding {POLICY_FILE}"
        )
    blob = torch.load(p, map_location="cpu", weights_only=False)
    spec_d = blob["spec"]
    for key in ("hidden_sizes", "action_low", "action_high"):
        if spec_d.get(key) is not None:
            spec_d[key] = tuple(spec_d[key])
    policy = ActorCritic(PolicySpec(**spec_d))
    policy.load_state_dict(blob["state_dict"])
    policy.eval()
    norm = ObsNormalizer(
        (spec_d["obs_dim"],), enabled=blob["obs_norm"]["enabled"], clip=blob["obs_norm"]["clip"]
    )
    norm.rms.load_state_dict(blob["obs_norm"])
    return policy, norm, blob["env_id"]


def evaluate(
    policy: ActorCritic,
    obs_norm: ObsNormalizer,
    env: str | EnvFactory,
    episodes: int = 10,
    seed: int = 10_000,
) -> dict[str, Any]:
    """Run ``episodes`` deterministic episodes (mean action / argmax) on fresh envs seeded
    ``seed, seed+1, ...``; returns ``{"mean": ..., "std": ..., "returns": [...], "lengths": [...]}``."""
    from heed.control.envs import env_factory

    factory = env_factory(env) if isinstance(env, str) else env
    returns, lengths = [], []
    for i in range(episodes):
        e = factory()
        obs, _ = e.reset(seed=seed + i)
        total, length, done = 0.0, 0, False
        while not done:
            with torch.no_grad():
                action, _ = policy.act(torch.as_tensor(obs_norm(np.asarray(obs)[None])), deterministic=True)
            obs, reward, terminated, truncated, _ = e.step(policy.env_action(action)[0])
            total += float(reward)
            length += 1
            done = bool(terminated or truncated)
        e.close()
        returns.append(total)
        lengths.append(length)
    arr = np.asarray(returns)
    return {
        "mean": float(arr.mean()) if episodes else float("nan"),
        "std": float(arr.std()) if episodes else float("nan"),
        "returns": returns,
        "lengths": lengths,
    }


def evaluate_run(run_dir: str | Path, episodes: int = 10, seed: int = 10_000) -> dict[str, Any]:
    """``heed control --eval RUN_DIR``: deterministic episodes with a saved policy."""
    policy, obs_norm, env_id = load_policy(run_dir)
    return {"env_id": env_id, **evaluate(policy, obs_norm, env_id, episodes, seed)}


def _latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted(
        (run_dir / "checkpoints").glob("update-*/state.pt"), key=lambda p: int(p.parent.name.split("-")[1])
    )
    return ckpts[-1] if ckpts else None


def train(cfg: ControlConfig, env: str | EnvFactory | None = None, resume: bool = False) -> dict[str, Any]:
    """Train PPO as ``cfg`` says; returns the summary (also written to ``summary.json``).

    ``env`` overrides ``cfg.env_id`` with a factory (tests use hand-made envs). Runs with
    ``cfg.threads`` torch threads and restores the caller's setting afterwards.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, env, resume)
    finally:
        torch.set_num_threads(previous_threads)


def _train(cfg: ControlConfig, env: str | EnvFactory | None, resume: bool) -> dict[str, Any]:
    # step 1. seeds, run folder, config
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    env_name = cfg.env_id if env is None or isinstance(env, str) else getattr(env, "__name__", "env")

    # step 2. environments, policy, optimiser, normalisers
    envs = make_vec_env(env if env is not None else cfg.env_id, cfg.num_envs, name=env_name)
    policy = make_policy(envs, cfg)
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5)
    obs_norm = ObsNormalizer((policy.spec.obs_dim,), cfg.normalize_obs, clip=cfg.clip_obs)
    reward_scaler = RewardScaler(cfg.num_envs, cfg.gamma, cfg.normalize_reward, clip=cfg.clip_reward)

    start_update, global_step = 0, 0
    logger = MetricsLogger(run_dir)
    if resume:
        ckpt = _latest_checkpoint(run_dir)
        if ckpt is None:
            raise HeedError(f"{run_dir}: --resume given but no checkpoints/update-N/state.pt to resume from")
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        policy.load_state_dict(state["policy"])
        optimizer.load_state_dict(state["optimizer"])
        obs_norm.rms.load_state_dict(state["obs_rms"])
        reward_scaler.rms.load_state_dict(state["ret_rms"])
        torch.set_rng_state(state["torch_rng"])
        start_update, global_step = state["update"], state["global_step"]
        logger.truncate_after(global_step)
    # Envs cannot be checkpointed: a resumed run starts fresh episodes from a seed of its own.
    collector = RolloutCollector(envs, policy, obs_norm, reward_scaler, seed=cfg.seed + 1000 * start_update)

    recent: list[tuple[float, int]] = []
    t0 = time.time()
    steps_at_start = global_step
    last: dict[str, Any] = {}
    with StepProgress(
        f"ppo {env_name}", total=cfg.num_updates, enabled=cfg.progress, start=start_update
    ) as bar:
        for update in range(start_update, cfg.num_updates):
            # step 3. learning rate (linear decay to 0 over the run)
            lr = cfg.lr * (1.0 - update / cfg.num_updates) if cfg.anneal_lr else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr

            # step 4. rollout, then GAE with termination and truncation kept apart
            policy.eval()
            rollout = collector.collect(cfg.num_steps)
            global_step += cfg.batch_size
            advantages, returns = rollout_advantages(rollout, cfg.gamma, cfg.gae_lambda)

            # step 5. flatten to the transitions that count (reset steps dropped)
            keep = rollout.valid_mask.reshape(-1)  # (N*T,)
            b_obs = rollout.obs.reshape(-1, rollout.obs.shape[-1])[keep]
            b_actions = rollout.actions.reshape(-1, *rollout.actions.shape[2:])[keep]
            b_logprobs = rollout.logprobs.reshape(-1)[keep]
            b_values = rollout.values.reshape(-1)[keep]
            b_advantages = advantages.reshape(-1)[keep]
            b_returns = returns.reshape(-1)[keep]
            n = b_obs.shape[0]

            # step 6. PPO epochs over shuffled minibatches
            policy.train()
            stats: dict[str, list[float]] = {
                k: [] for k in ("pg_loss", "v_loss", "entropy", "kl_k1", "kl_k3", "clipfrac", "vclipfrac")
            }
            stop = False
            for _epoch in range(cfg.update_epochs):
                for mb in torch.randperm(n).chunk(cfg.num_minibatches):
                    dist = policy.distribution(b_obs[mb])
                    new_logprobs, entropy = policy.log_prob_entropy(dist, b_actions[mb])
                    new_values = policy.value(b_obs[mb])
                    mb_adv = whiten(b_advantages[mb]) if cfg.norm_adv and mb.numel() > 1 else b_advantages[mb]

                    pg, pstats = policy_loss(new_logprobs, b_logprobs[mb], mb_adv, clip_eps=cfg.clip_eps)
                    vl, vstats = value_loss(
                        new_values,
                        b_values[mb],
                        b_returns[mb],
                        clip_eps=cfg.clip_eps if cfg.clip_vloss else None,
                    )
                    pg_l, v_l, ent = _mean(pg), _mean(vl), _mean(entropy)
                    loss = pg_l + cfg.vf_coef * v_l - cfg.ent_coef * ent

                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                    optimizer.step()

                    stats["pg_loss"].append(pg_l.item())
                    stats["v_loss"].append(v_l.item())
                    stats["entropy"].append(ent.item())
                    stats["kl_k1"].append(float(pstats.approx_kl_k1))
                    stats["kl_k3"].append(float(pstats.approx_kl_k3))
                    stats["clipfrac"].append(float(pstats.clipfrac))
                    stats["vclipfrac"].append(float(vstats.clipfrac))
                if cfg.target_kl is not None and stats["kl_k3"][-1] > cfg.target_kl:
                    stop = True
                    break

            # step 7. log, checkpoint
            recent.extend(collector.drain_episodes())
            recent = recent[-20:]
            if (update + 1) % cfg.log_every == 0 or update + 1 == cfg.num_updates:
                metrics: dict[str, Any] = {
                    "episode_return": float(np.mean([r for r, _ in recent])) if recent else None,
                    "episode_length": float(np.mean([ln for _, ln in recent])) if recent else None,
                    "policy_loss": float(np.mean(stats["pg_loss"])),
                    "value_loss": float(np.mean(stats["v_loss"])),
                    "entropy": float(np.mean(stats["entropy"])),
                    "approx_kl": float(np.mean(stats["kl_k3"])),
                    "approx_kl_k1": float(np.mean(stats["kl_k1"])),
                    "clipfrac": float(np.mean(stats["clipfrac"])),
                    "value_clipfrac": float(np.mean(stats["vclipfrac"])),
                    "explained_variance": float(explained_variance(b_values, b_returns)),
                    "lr": lr,
                    "early_stop": stop,
                    "steps_per_s": (global_step - steps_at_start) / max(time.time() - t0, 1e-9),
                }
                if not policy.spec.discrete:
                    metrics["action_std"] = policy.log_std.detach().exp().mean().item()
                last = logger.log(global_step, metrics)
            if cfg.save_every and (update + 1) % cfg.save_every == 0:
                ckpt_dir = run_dir / "checkpoints" / f"update-{update + 1}"
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                torch.save(
                    {
                        "policy": policy.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "obs_rms": obs_norm.rms.state_dict(),
                        "ret_rms": reward_scaler.rms.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                        "update": update + 1,
                        "global_step": global_step,
                    },
                    ckpt_dir / "state.pt",
                )
            ret = last.get("episode_return")
            bar.advance(1, {"return": ret} if ret is not None else None)
    envs.close()
    train_time = time.time() - t0

    # step 8. save the policy, evaluate deterministically, write the summary
    policy.eval()
    save_policy(run_dir / POLICY_FILE, policy, obs_norm, env_name)
    summary: dict[str, Any] = {
        "env_id": env_name,
        "seed": cfg.seed,
        "env_steps": global_step,
        "train_time_s": round(train_time, 2),
        "steps_per_s": round((global_step - steps_at_start) / max(train_time, 1e-9), 1),
        "train_episode_return": last.get("episode_return"),
        "approx_kl": last.get("approx_kl"),
        "clipfrac": last.get("clipfrac"),
        "explained_variance": last.get("explained_variance"),
        "entropy": last.get("entropy"),
    }
    if cfg.eval_episodes:
        result = evaluate(policy, obs_norm, env if env is not None else cfg.env_id, cfg.eval_episodes)
        summary["eval_return_mean"] = result["mean"]
        summary["eval_return_std"] = result["std"]
        summary["eval_episode_length_mean"] = float(np.mean(result["lengths"]))
        logger.log(global_step, {"return_mean": result["mean"], "return_std": result["std"]}, split="eval")
    logger.close()
    summary = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary

"""Config of ``heed rl`` and ``heed eval``: one on-policy loop, the algorithm chosen by ``algorithm``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from heed.config.base import HeedConfig, LogConfig, ModelConfig, OptimConfig
from heed.config.monitor import MonitorConfig

ALGORITHMS = ("ppo", "rloo", "grpo", "reinforce")
OVERLONG_SOURCE = "overlong"  # the soft overlong punishment's name among the reward sources (reward/overlong)


class RewardSpec(HeedConfig):
    """One reward source. Set exactly one of ``function``, ``model``, ``pipeline``."""

    name: str | None = Field(
        None, description="Name in logs (reward/<name>); defaults to the function or folder name."
    )
    weight: float = Field(1.0, description="Weight of this source in the total reward.")
    function: str | None = Field(
        None,
        description="A built-in (banana_format, banana_success, length_penalty), "
        "'package.module:function', 'path/to/file.py:function', or builtin:gold_positivity (the "
        "built-in world's hidden gold tone).",
    )
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments passed to `function`.")
    model: str | None = Field(None, description="Reward-model folder written by `heed rm train`.")
    normalize: bool = Field(
        False, description="Reward model: subtract its saved mean and divide by its saved std."
    )
    pipeline: str | None = Field(
        None,
        description="Text-classification model folder, run as a transformers pipeline on the completion.",
    )
    labels: dict[str, float] = Field(
        default_factory=lambda: {"POSITIVE": 1.0, "NEGATIVE": -1.0},
        description="Pipeline: label -> multiplier of the top label (POSITIVE -> +score, NEGATIVE -> -score).",
    )
    use_score: bool = Field(
        True, description="Pipeline: multiply by the label's probability (false: the multiplier alone)."
    )
    batch_size: int = Field(64, ge=1, description="Completions per reward-model / pipeline call.")
    step_delimiter: str | None = Field(
        None,
        min_length=1,
        description="Process rewards: `function` returns a list of scores per answer, one per step, the steps "
        "being the answer split on this delimiter (e.g. '\\n'; a trailing one ends the last step). PPO puts "
        "each step's score on the token that ends the step; the other algorithms use their sum.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> RewardSpec:
        set_ = [k for k in ("function", "model", "pipeline") if getattr(self, k)]
        if len(set_) != 1:
            raise ValueError(
                "a reward source needs exactly one of function, model, pipeline"
                + (f" (got {', '.join(set_)})" if set_ else "")
            )
        if self.step_delimiter is not None and not self.function:
            raise ValueError("step_delimiter: process (per-step) rewards come from a `function` source only")
        return self

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        ref = self.function or self.model or self.pipeline or "reward"
        if self.function:
            return ref.rsplit(":", 1)[-1]
        return ref.rstrip("/").replace("\\", "/").split("/")[-1] or "reward"


class RLDataConfig(HeedConfig):
    """Prompts to train and evaluate on."""

    prompts: str = Field(
        ...,
        description="Training prompts ({\"prompt\": ...} JSONL); 'builtin:prompts_train' for the built-in ones.",
        examples=["prompts.jsonl"],
    )
    eval_prompts: str | None = Field(
        None, description="Held-out prompts for evaluation; 'builtin:prompts_eval' for the built-in ones."
    )
    chat: Literal["auto", "true", "false"] = Field(
        "auto", description="Use the tokenizer's chat template (auto: if it has one)."
    )
    max_prompt_length: int = Field(
        128, ge=1, description="Longest prompt in tokens; a longer one is an error."
    )


class RolloutConfig(HeedConfig):
    """Sampling of the K completions per prompt."""

    prompts_per_step: int = Field(
        16, ge=1, description="Prompts per update (the batch is prompts_per_step x k answers)."
    )
    k: int = Field(4, ge=1, description="Completions sampled per prompt (a group for RLOO/GRPO).")
    max_new_tokens: int = Field(48, ge=1, description="Longest completion in tokens (answers are cut there).")
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature (log-probs use the same temperature)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0 = off).")
    batch_size: int = Field(128, ge=1, description="Rows per generate call.")
    share_prompt: bool = Field(
        True,
        description="In the log-prob and training passes run each prompt once for its k answers (one packed "
        "sequence per group; needs sdpa or eager attention, else off).",
    )
    reuse_logprobs: bool = Field(
        True,
        description="Use the log-probs the engine computed while sampling as the behaviour policy's (one forward "
        "pass less per update; PPO's values then come from the policy's body alone); false recomputes them.",
    )
    engine: Literal["heed", "hf", "vllm"] = Field(
        "heed",
        description="Generation engine: heed (lean KV-cache loop), hf (transformers generate), vllm (in-process "
        "vLLM; GPU and the heed[vllm] extra).",
    )
    compile: bool = Field(
        False,
        description="heed engine: torch.compile the decoding step (a fixed-shape step over a preallocated KV "
        "cache; compiled once per policy, compile time logged; llama, qwen2, qwen3 and mistral without a "
        "window). Where it cannot compile: one warning and the eager loop.",
    )
    vllm_gpu_memory: float = Field(
        0.3,
        gt=0,
        le=1,
        description="vllm engine: share of the GPU memory vLLM may take (weights + KV cache).",
    )
    vllm_sleep: bool = Field(
        True, description="vllm engine: free vLLM's weights and KV cache between rollouts."
    )
    dynamic_sampling: bool = Field(
        False,
        description="DAPO's dynamic sampling (rloo, grpo): drop groups whose k rewards are all equal and sample "
        "more prompts until prompts_per_step informative groups are collected.",
    )
    dynamic_sampling_rounds: int = Field(
        3,
        ge=1,
        description="Dynamic sampling: extra sampling rounds per update at most; a batch still short after "
        "them trains on the groups it has (with a warning).",
    )
    correction: Literal["none", "tis", "mis"] = Field(
        "none",
        description="Off-policy correction when the engine's log-probs differ from the trainer's: weight each "
        "token's policy loss by π_old/π_engine, truncated at correction_cap (tis) or dropped past it (mis). "
        "Needs both log-probs: reuse_logprobs false, the vllm engine, or PPO (which then recomputes them).",
    )
    correction_cap: float = Field(
        2.0, gt=0, description="Off-policy correction: the cap C of the importance weight π_old/π_engine."
    )


class OverlongConfig(HeedConfig):
    """Answers cut at ``rollout.max_new_tokens`` (DAPO, https://arxiv.org/abs/2503.14476)."""

    filter: bool = Field(
        False,
        description="Leave answers that were cut at max_new_tokens (no EOS) out of the loss; they still count "
        "in the baselines of their group.",
    )
    penalty_cache: int | None = Field(
        None,
        ge=1,
        description="Soft overlong punishment: a reward ramping from 0 to -penalty_weight over the last N "
        "tokens before max_new_tokens, added to the score (null: off).",
    )
    penalty_weight: float = Field(
        1.0,
        ge=0,
        description="Soft overlong punishment: the penalty at max_new_tokens (logged as reward/overlong).",
    )


class KLConfig(HeedConfig):
    """The KL penalty keeping the policy near the reference."""

    beta: float = Field(
        0.05, ge=0, description="KL coefficient (the initial one with the adaptive controller)."
    )
    estimator: Literal["k1", "k2", "k3"] | None = Field(
        None, description="Per-token KL estimator: default k1 in the reward, k3 in the loss."
    )
    adaptive: bool = Field(False, description="Adapt beta toward `target` (Ziegler et al. 2019).")
    target: float = Field(6.0, gt=0, description="Adaptive controller: target KL per answer (nats).")
    horizon: int = Field(10000, ge=1, description="Adaptive controller: horizon in samples.")
    in_reward: bool | None = Field(
        None,
        description="Penalise KL in the reward (true) or add beta*KL to the loss (false); "
        "default: in the reward, except GRPO (in the loss, k3).",
    )


class UpdateConfig(HeedConfig):
    """The policy update of every algorithm: clipped surrogate over shuffled minibatches."""

    epochs: int = Field(1, ge=1, description="Passes over each rollout batch.")
    minibatch_size: int | None = Field(
        None, ge=1, description="Answers per optimizer step (default: the whole batch)."
    )
    micro_batch_size: int = Field(
        16,
        ge=1,
        description="Answers per forward pass, grouped by length so padding is cut (gradient accumulation).",
    )
    clip_eps: float = Field(0.2, gt=0, description="Clip range of the policy ratio.")
    clip_eps_high: float | None = Field(
        None, gt=0, description="Upper clip range (clip-higher); default clip_eps."
    )
    dual_clip: float | None = Field(
        None,
        gt=1,
        description="Dual-clip PPO: bound the loss of a negative advantage by -c·A (c > 1, e.g. 3); null disables.",
    )
    loss_aggregation: Literal[
        "token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"
    ] = Field("token_mean", description="How per-token losses are reduced (heed.algos.aggregate).")
    entropy_coef: float = Field(
        0.0, ge=0, description="Entropy bonus coefficient (the initial one with entropy_target)."
    )
    entropy_target: float | None = Field(
        None,
        ge=0,
        description="Adaptive entropy bonus: move the coefficient to keep the mean token entropy (nats) near "
        "this target, coef <- clip(coef + entropy_coef_lr*(target - entropy), 0, entropy_coef_max); null: fixed.",
    )
    entropy_coef_lr: float = Field(
        0.01,
        ge=0,
        description="Adaptive entropy bonus: coefficient change per nat of entropy gap per update.",
    )
    entropy_coef_max: float = Field(0.1, ge=0, description="Adaptive entropy bonus: largest coefficient.")
    ratio_level: Literal["token", "sequence"] = Field(
        "token",
        description="Importance ratio per token (PPO) or per answer, the geometric mean of its token ratios "
        "(GSPO, https://arxiv.org/abs/2507.18071; rloo, grpo, reinforce).",
    )


class AdvantageConfig(HeedConfig):
    """How rewards become advantages: GAE for PPO, group baselines for RLOO / GRPO, REINFORCE's average."""

    gamma: float = Field(1.0, ge=0, le=1, description="PPO: discount over response tokens.")
    lam: float = Field(0.95, ge=0, le=1, description="PPO: GAE lambda.")
    whiten: bool = Field(True, description="PPO: whiten the advantages over the batch.")
    whiten_rewards: bool = Field(False, description="PPO: whiten the token rewards before GAE (scale only).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="GRPO: divide by the group's std (group), the batch's std (batch) or not at all (none: Dr. GRPO).",
    )
    reinforce_decay: float = Field(
        0.9, ge=0, lt=1, description="REINFORCE: moving-average decay of the baseline."
    )


class PPOConfig(HeedConfig):
    """PPO's critic: a value head on the policy's trunk or a separate model, and its loss."""

    critic: Literal["shared", "separate"] = Field(
        "shared", description="Value head on the policy's trunk (shared) or on a separate critic model."
    )
    critic_path: str | None = Field(
        None, description="Separate critic's initial model folder (default: model.path)."
    )
    critic_lr: float | None = Field(
        None, gt=0, description="Learning rate of the value head / critic (default: optim.lr)."
    )
    vf_coef: float = Field(0.1, ge=0, description="Value-loss coefficient.")
    value_clip: float | None = Field(0.2, gt=0, description="Clip range of the value loss; null disables.")


# Keys that moved (old dotted name -> new dotted name); the old names work for one release and warn once.
RENAMED_KEYS: dict[str, str] = {
    **{
        f"ppo.{k}": f"update.{k}"
        for k in (
            "epochs",
            "minibatch_size",
            "micro_batch_size",
            "clip_eps",
            "clip_eps_high",
            "dual_clip",
            "loss_aggregation",
            "entropy_coef",
        )
    },
    "ppo.gamma": "advantages.gamma",
    "ppo.lam": "advantages.lam",
    "ppo.whiten_advantages": "advantages.whiten",
    "ppo.whiten_rewards": "advantages.whiten_rewards",
    "ppo.reinforce_decay": "advantages.reinforce_decay",
    "ppo.grpo_scale": "advantages.scale_rewards",
    "critic_lr": "ppo.critic_lr",
}
_warned: set[str] = set()


def _migrate(old: str, new: str, value: Any) -> Any:
    if old == "ppo.grpo_scale" and isinstance(value, bool):
        return "group" if value else "none"
    return value


def rename_old_keys(data: Any) -> Any:
    """Move renamed keys of a raw RL config to their new place, warning once per key; a key given under
    both names is an error."""
    import warnings

    if not isinstance(data, dict):
        return data
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for old, new in RENAMED_KEYS.items():
        *old_path, old_leaf = old.split(".")
        section = data
        for part in old_path:
            section = section.get(part) if isinstance(section, dict) else None
        if not isinstance(section, dict) or old_leaf not in section:
            continue
        value = _migrate(old, new, section.pop(old_leaf))
        new_section, new_leaf = new.split(".")
        target = data.setdefault(new_section, {})
        if not isinstance(target, dict):
            continue  # the type error is reported by validation
        if new_leaf in target:
            from heed.errors import ConfigError

            raise ConfigError(f"config key '{old}' and its new name '{new}' are both set; keep '{new}' only")
        target[new_leaf] = value
        if old not in _warned:
            _warned.add(old)
            warnings.warn(
                f"config key '{old}' is now '{new}'; the old name still works in this release",
                FutureWarning,
                stacklevel=2,
            )
    if isinstance(data.get("ppo"), dict) and not data["ppo"]:
        data.pop("ppo")
    return data


class PtxConfig(HeedConfig):
    """PPO-ptx: keep the language-modelling loss on pretraining text (InstructGPT)."""

    data: str | None = Field(
        None, description="Plain-text records ({\"text\": ...}); 'builtin:text' for the corpus."
    )
    coef: float = Field(0.0, ge=0, description="Weight of the LM loss added to each update.")
    batch_size: int = Field(8, ge=1, description="Text sequences per optimizer step.")
    max_length: int = Field(128, ge=8, description="Tokens per text sequence (longer ones are truncated).")


class EvalConfig(HeedConfig):
    """Evaluation on held-out prompts during and after training."""

    at_start: bool = Field(True, description="Evaluate the initial policy before the first update.")
    num_prompts: int = Field(64, ge=1, description="Held-out prompts per evaluation (the first N).")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0 = greedy).")
    max_new_tokens: int | None = Field(None, ge=1, description="Default: rollout.max_new_tokens.")
    metrics: list[RewardSpec] = Field(
        default_factory=list, description="Task metrics, logged as eval/<name> (mean)."
    )
    gold: list[RewardSpec] = Field(
        default_factory=list, description="Gold metrics, logged as gold/<name> (mean)."
    )
    samples: int = Field(8, ge=0, description="Answers written to samples.jsonl per evaluation.")
    initial_policy_name: str = Field(
        "sft", description="`policy` of the samples of the evaluation before training."
    )


class TrainLoopConfig(HeedConfig):
    """Length of the run."""

    updates: int = Field(100, ge=1, description="Rollout + update rounds.")
    seed: int = Field(0, description="Seed for prompt order and sampling.")
    max_none_updates: int = Field(
        3,
        ge=0,
        description="Stop when the reward is None for every answer of this many updates in a row (0 = never).",
    )


class RLOptimConfig(OptimConfig):
    """AdamW for RL: a small constant learning rate by default."""

    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")
    schedule: Literal["cosine", "linear", "constant"] = Field("constant", description="Decay after warmup.")


class RLLogConfig(LogConfig):
    """Logging for RL: every update by default."""

    log_every: int = Field(1, ge=1, description="Write metrics every N updates.")
    eval_every: int = Field(
        0, ge=0, description="Evaluate on held-out prompts every N updates (0: at the start and the end)."
    )
    save_every: int = Field(0, ge=0, description="Checkpoint every N updates; 0 saves only the final model.")


class RLConfig(HeedConfig):
    """``heed rl``: PPO / RLOO / GRPO / REINFORCE with a KL penalty to the reference policy."""

    algorithm: Literal["ppo", "rloo", "grpo", "reinforce"] = Field(
        "rloo", description="ppo | rloo | grpo | reinforce."
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="Policy (initialised from model.path)."
    )
    ref_model: str | None = Field(
        None,
        description="Reference policy folder (default: model.path; with LoRA, the policy with its adapter disabled).",
    )
    offload_ref: bool = Field(
        False, description="Keep a separately loaded reference model on the CPU (saves accelerator memory)."
    )
    data: RLDataConfig = Field(..., description="Prompts.")
    rewards: list[RewardSpec] = Field(
        ..., min_length=1, description="Reward sources; the total is their weighted sum."
    )
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Sampling.")
    kl: KLConfig = Field(default_factory=KLConfig, description="KL penalty.")
    update: UpdateConfig = Field(
        default_factory=UpdateConfig, description="The policy update (all algorithms)."
    )
    advantages: AdvantageConfig = Field(
        default_factory=AdvantageConfig, description="Advantage estimation (GAE, group baselines)."
    )
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO's critic.")
    overlong: OverlongConfig = Field(
        default_factory=OverlongConfig, description="Answers cut at max_new_tokens: filter, soft penalty."
    )
    ptx: PtxConfig = Field(default_factory=PtxConfig, description="PPO-ptx language-modelling loss.")
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig, description="Length and seed.")
    optim: RLOptimConfig = Field(
        default_factory=RLOptimConfig, description="Optimizer of the policy (and value head)."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    log: RLLogConfig = Field(default_factory=RLLogConfig, description="Logging and checkpoints.")
    monitor: MonitorConfig = Field(default_factory=MonitorConfig, description="Reward-hacking monitors.")
    out: str = Field("runs/rl", description="Run folder.")
    overwrite: bool = Field(False, description="Replace an existing run in `out` instead of refusing.")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        return rename_old_keys(data)

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        if self.model.path is None:
            raise ValueError("model.path: the policy's model folder is required (or 'builtin')")
        if self.algorithm in ("rloo", "grpo") and self.rollout.k < 2:
            raise ValueError(
                f"rollout.k: {self.algorithm} needs at least 2 completions per prompt, got {self.rollout.k}"
            )
        if self.ptx.coef > 0 and not self.ptx.data:
            raise ValueError("ptx.data: PPO-ptx (ptx.coef > 0) needs plain-text data")
        mb = self.update.minibatch_size
        if mb is not None and self.batch_size % mb:
            raise ValueError(
                f"update.minibatch_size: {mb} does not divide the batch of {self.batch_size} answers"
            )
        names = [r.display_name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: two sources share a name ({', '.join(names)}); set `name:` on each")
        self._check_stabilizers(names)
        return self

    def _check_stabilizers(self, names: list[str]) -> None:
        r, o = self.rollout, self.overlong
        if o.penalty_cache is not None and o.penalty_cache > r.max_new_tokens:
            raise ValueError(
                f"overlong.penalty_cache: {o.penalty_cache} tokens exceed rollout.max_new_tokens "
                f"({r.max_new_tokens}); the ramp must fit inside the answer"
            )
        if o.penalty_cache is not None and OVERLONG_SOURCE in names:
            raise ValueError(f"rewards: the name '{OVERLONG_SOURCE}' is taken by overlong.penalty_cache")
        if r.dynamic_sampling and self.algorithm not in ("rloo", "grpo"):
            raise ValueError(
                f"rollout.dynamic_sampling: drops groups without reward variance, which only group "
                f"baselines ignore (rloo, grpo); got algorithm {self.algorithm}"
            )
        if self.update.ratio_level == "sequence" and self.algorithm == "ppo":
            raise ValueError(
                "update.ratio_level: sequence (GSPO) needs one advantage per answer (rloo, grpo, reinforce); "
                "PPO's GAE gives one per token"
            )
        if r.correction != "none" and r.reuse_logprobs and r.engine != "vllm" and self.algorithm != "ppo":
            raise ValueError(
                f"rollout.correction: {r.correction} weighs the engine's log-probs against the trainer's, so "
                "both are needed; set rollout.reuse_logprobs: false (the vllm engine and PPO always recompute)"
            )

    # derived values
    @property
    def batch_size(self) -> int:
        """Answers per rollout: prompts_per_step x k."""
        return self.rollout.prompts_per_step * self.rollout.k

    @property
    def kl_in_reward(self) -> bool:
        if self.kl.in_reward is not None:
            return self.kl.in_reward
        return self.algorithm != "grpo"

    @property
    def kl_estimator(self) -> str:
        """k1 in the reward (unbiased for the sequence KL); k3 in the loss (its gradient is useful, k1's is not)."""
        if self.kl.estimator is not None:
            return self.kl.estimator
        return "k1" if self.kl_in_reward else "k3"

"""On-policy RL for language models: PPO, RLOO, GRPO and REINFORCE in one loop.

Every update reads as the numbered steps of the issue, each calling the library:
(1) sample K completions per prompt (:mod:`heed.rollout.engine`), (2) score them with the reward
sources (:mod:`heed.rewards`), (3) log-probs of policy and reference, and values for PPO
(:func:`heed.models.forward.policy_forward`), (4) KL-penalised token rewards
(:func:`heed.algos.kl_penalized_rewards`), (5) advantages (GAE / leave-one-out / group-normalised /
moving-average baseline, :mod:`heed.algos.advantages`), (6) epochs of clipped-surrogate updates
over minibatches (:func:`heed.algos.policy_loss`, :func:`heed.algos.value_loss`), (7) log, watch,
evaluate and checkpoint.

On N processes (torchrun / accelerate launch) each generates and scores its share of whole prompts;
statistics over the whole rollout batch (whitening, the REINFORCE baseline, logged figures) are
taken over every process's answers in step 5 and :func:`batch_statistics` (:mod:`heed.train.collective`),
and the update's micro-batch losses are weighted so that DDP's averaged gradient is the one-process
gradient of the same global minibatch (:func:`_update`).
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from heed import algos
from heed.config.rl import OVERLONG_SOURCE, RLConfig
from heed.data.records import PromptExample, load_records, prompt_text
from heed.errors import ConfigError
from heed.models.forward import (
    TokenOutputs,
    can_share_prompt,
    policy_forward,
    shared_prompt_forward,
    shared_prompt_values,
)
from heed.models.value import Critic, ValueHead
from heed.report.diversity import diversity_metrics
from heed.report.metrics import MetricsLogger, read_metrics, truncate_jsonl
from heed.report.monitors import Monitor, append_alarms, resume_monitor
from heed.report.progress import StepProgress
from heed.rewards.combine import NoneRewardWatch, RewardBatch, RewardSet, build_rewards
from heed.rollout.batch import (
    Rollout,
    group_chunks,
    length_sorted_chunks,
    rollout_from_generation,
    scatter_response,
)
from heed.rollout.engine import Engine, make_engine
from heed.rollout.generate import Generation, SamplingParams, encode_prompts
from heed.rollout.sampler import row_keys
from heed.rollout.vllm_engine import check_vllm
from heed.train.collective import Collective, global_mean, global_whiten
from heed.train.common import (
    guard_run,
    make_accelerator,
    peak_memory_mb,
    prepare_optimization,
    set_seed,
    start_run,
    write_json,
)
from heed.train.loop import Cadence, checkpoint, optimizer_step, save_final, sync_context

VALUE_HEAD_FILE = "value_head.pt"


# --------------------------------------------------------------------------------------------
# paths only: 'builtin' names are resolved by heed.cli / heed.demo before a config gets here


def check_paths(cfg: RLConfig) -> None:
    """Refuse a config that still holds ``builtin`` names, with the call that resolves them."""
    found: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")
        elif isinstance(node, str) and (node == "builtin" or node.startswith("builtin:")):
            found.append(f"{where}={node}")

    walk(cfg.model_dump(), "")
    if found:
        raise ConfigError(
            f"{', '.join(found)}: built-in names are resolved by the heed command; from Python, "
            "pass the config through heed.demo.builtin.resolve_config(cfg) first"
        )


# --------------------------------------------------------------------------------------------
# loading


@dataclass
class Prompts:
    examples: list[PromptExample]
    ids: list[list[int]]

    def columns(self, idx: list[int], k: int) -> dict[str, list[Any]]:
        """Extra record columns for the reward functions, repeated for the k answers of each prompt."""
        keys = sorted({key for i in idx for key in self.examples[i].extra})
        return {key: [self.examples[i].extra.get(key) for i in idx for _ in range(k)] for key in keys}


def load_prompts(path: str, tokenizer: Any, cfg: RLConfig) -> Prompts:
    from heed.data.templating import use_chat

    examples = load_records(path, "prompts")
    chat = use_chat(tokenizer, cfg.data.chat)
    ids = encode_prompts(
        tokenizer,
        [e.prompt for e in examples],
        chat,
        cfg.data.max_prompt_length,
        wheres=[e.where for e in examples],
    )
    return Prompts(examples, ids)


def prompt_order(n_prompts: int, step: int, per_step: int, seed: int) -> list[int]:
    """Prompt indices of update ``step``: consecutive slices of per-epoch shuffles (deterministic,
    so a resumed run sees the same prompts)."""
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(pos, n_prompts)
        order = list(range(n_prompts))
        random.Random(seed * 100003 + epoch).shuffle(order)
        out.append(order[i])
    return out


def check_processes(cfg: RLConfig, world: int) -> None:
    """On ``world`` processes each takes whole prompts (an RLOO/GRPO group never straddles two) and an
    equal share of every minibatch; say which setting does not divide when one does not."""
    if world == 1:
        return
    if cfg.rollout.prompts_per_step % world:
        raise ConfigError(
            f"rollout.prompts_per_step: {cfg.rollout.prompts_per_step} prompts per update do not "
            f"split evenly over {world} processes; use a multiple of {world}"
        )
    mb = cfg.update.minibatch_size
    if mb is not None and mb % world:
        raise ConfigError(
            f"update.minibatch_size: {mb} answers per minibatch do not split evenly over {world} "
            f"processes; use a multiple of {world}"
        )


def process_share(idx: list[int], coll: Collective) -> list[int]:
    """This process's consecutive slice of an update's prompts (all of them on one process), so the
    processes' answers, concatenated in rank order, are the one-process batch in its order."""
    share = len(idx) // coll.world
    return idx[coll.rank * share : (coll.rank + 1) * share]


def _mean_over_processes(stats: dict[str, float], coll: Collective) -> dict[str, float]:
    """The mean over processes of per-process figures (every process has the same keys)."""
    if coll.world == 1 or not stats:
        return stats
    keys = sorted(stats)
    total = coll.sum(torch.tensor([stats[k] for k in keys], dtype=torch.float64))
    return {k: float(v) / coll.world for k, v in zip(keys, total, strict=True)}


def _sampling(cfg: RLConfig, eval_mode: bool = False) -> SamplingParams:
    if eval_mode:
        t = cfg.eval.temperature
        return SamplingParams(
            max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
            temperature=max(t, 1e-5),
            top_p=cfg.rollout.top_p,
            top_k=cfg.rollout.top_k,
            do_sample=t > 0,
            compile=cfg.rollout.compile,
        )
    r = cfg.rollout
    return SamplingParams(
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        compile=r.compile,
    )


# --------------------------------------------------------------------------------------------
# what travels through the loop


@dataclass
class Learner:
    """The models and optimisation state an RL run carries from update to update."""

    policy: Any  # the plain policy: generation, rollout passes, evaluation, saving
    model: Any  # the same weights as the update sees them (DDP-wrapped on several processes)
    ref: Any  # the frozen reference (under LoRA the policy itself, its adapter disabled)
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    kl_ctl: Any  # algos.FixedKLController | algos.AdaptiveKLController
    accelerator: Any
    coll: Collective
    value_head: ValueHead | None = None  # PPO, critic: shared
    critic: Critic | None = None  # PPO, critic: separate
    train_mode: bool = True  # False: a model still random in training mode is updated in eval mode
    entropy_ctl: algos.EntropyController | None = None  # None: the fixed update.entropy_coef

    @property
    def value_params(self) -> list[torch.nn.Parameter]:
        """The value head's or critic's parameters (outside DDP: averaged by hand)."""
        return [
            p for module in (self.value_head, self.critic) if module is not None for p in module.parameters()
        ]

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad] + self.value_params


@dataclass(frozen=True)
class MinibatchPlan:
    """How one process splits its share of a rollout for the update."""

    epochs: int
    size: int  # answers per minibatch on this process
    micro: int  # answers per forward pass
    group: int | None  # K: micro-batches of whole groups, each prompt run once for its K answers

    def chunks(self, ro: Rollout, rows: torch.Tensor) -> list[torch.Tensor]:
        """Row indices of the micro-batches over ``rows``: whole groups for the shared-prompt forward
        (``rows`` then holds whole groups), else rows of similar length."""
        if self.group:
            return group_chunks(ro, rows[:: self.group] // self.group, self.group, self.micro)
        return length_sorted_chunks(ro, rows, self.micro)

    def forward(self, model: Any, part: Rollout, temperature: float, **kw: Any) -> TokenOutputs:
        """The policy forward over a micro-batch: each prompt once per group
        (:func:`shared_prompt_forward`), else row by row."""
        if self.group:
            return shared_prompt_forward(
                model,
                part.input_ids,
                part.attention_mask,
                part.target_mask,
                part.prompt_width,
                self.group,
                temperature,
                **kw,
            )
        return policy_forward(model, part.input_ids, part.attention_mask, part.target_mask, temperature, **kw)

    def values(self, model: Any, part: Rollout, value_head: ValueHead) -> torch.Tensor:
        """The shared value head's V(prefix) over a micro-batch (N, P + C), from the body alone."""
        return shared_prompt_values(
            model,
            part.input_ids,
            part.attention_mask,
            part.target_mask,
            value_head,
            part.prompt_width if self.group else None,
            self.group,
        )


ROW_BY_ROW = MinibatchPlan(epochs=1, size=1, micro=1, group=None)  # forwards of evaluation passes


def minibatch_plan(cfg: RLConfig, world: int, model: Any, ref: Any) -> MinibatchPlan:
    """Each of ``world`` processes holds ``prompts_per_step / world`` prompts and
    ``minibatch_size / world`` answers of every minibatch; groups are shared when the prompt can
    run once for its K answers (both models take the block mask, minibatches hold whole groups)."""
    size = (cfg.update.minibatch_size or cfg.batch_size) // world
    k = cfg.rollout.k
    share = cfg.rollout.share_prompt and k > 1 and size % k == 0 and can_share_prompt(model)
    share = share and can_share_prompt(ref)
    return MinibatchPlan(
        cfg.update.epochs, size, min(cfg.update.micro_batch_size, size), k if share else None
    )


@dataclass
class RolloutPasses:
    """Step 3's results, aligned with the rollout's answer tokens (N, C)."""

    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor | None
    stats: dict[str, float]
    engine_logprobs: torch.Tensor | None = None  # the engine's, when the trainer's were recomputed


@dataclass
class Advantages:
    """Steps 4-5's results: one advantage per token (PPO, (N, C)) or per answer ((N, 1))."""

    advantages: torch.Tensor
    returns: torch.Tensor | None  # PPO's value targets (N, C)
    baseline: float | None  # REINFORCE's moving average after this update
    stats: dict[str, float]


@dataclass
class RewardSets:
    """The reward sources a run trains on, and the metrics and gold figures its evaluations report."""

    train: RewardSet
    metrics: RewardSet | None = None
    gold: RewardSet | None = None

    @classmethod
    def build(cls, cfg: RLConfig, config_dir: str | Path | None) -> RewardSets:
        return cls(
            build_rewards(cfg.rewards, config_dir),
            build_rewards(cfg.eval.metrics, config_dir) if cfg.eval.metrics else None,
            build_rewards(cfg.eval.gold, config_dir) if cfg.eval.gold else None,
        )


@dataclass
class Totals:
    """Counters that cover the whole run, carried over a resume so ``summary.json`` does too."""

    samples: int = 0
    train_seconds: float = 0.0
    generation_seconds: float = 0.0
    total_seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# the steps of one update


REFILL_KEY_SALT = 0x0D15_CA7D  # dynamic sampling's extra rounds draw from their own streams


def sample(
    cfg: RLConfig,
    learner: Learner,
    engine: Engine,
    prompts: Prompts,
    update: int,
    idx: list[int] | None = None,
    round_: int = 0,
) -> tuple[list[int], Any]:
    """Step 1: K completions for this process's consecutive share of the update's prompts (or for the
    prompts ``idx`` of dynamic sampling's extra round ``round_``). Each answer's random draws depend
    on (seed, round, update, prompt, sample) only, not on batching nor on the process."""
    k = cfg.rollout.k
    if idx is None:
        order = prompt_order(len(prompts.ids), update, cfg.rollout.prompts_per_step, cfg.train.seed)
        idx = process_share(order, learner.coll)
    seed = cfg.train.seed + round_ * REFILL_KEY_SALT
    keys = row_keys(seed, [(update << 32) + i * k + j for i in idx for j in range(k)])
    gen = engine(
        learner.policy, learner.tokenizer, [prompts.ids[i] for i in idx], _sampling(cfg), k, keys=keys
    )
    return idx, gen


def score_batch(
    rewards: RewardSet, prompts: Prompts, idx: list[int], texts: list[str], k: int, step: int
) -> tuple[torch.Tensor, Any]:
    """Step 2: total reward per answer (N,), NaN where a source returned None, plus per-source values."""
    batch_prompts = [prompts.examples[i].prompt for i in idx for _ in range(k)]
    scored = rewards(batch_prompts, texts, prompts.columns(idx, k), step=step)
    total = torch.tensor([math.nan if v is None else v for v in scored.total], dtype=torch.float32)
    return total, scored


def add_overlong_penalty(
    cfg: RLConfig, scores: torch.Tensor, scored: RewardBatch, lengths: torch.Tensor
) -> tuple[torch.Tensor, RewardBatch]:
    """Step 2b: DAPO's soft overlong punishment (:func:`heed.algos.overlong_penalty`, times
    ``overlong.penalty_weight``) added to every score, logged as the source ``overlong``."""
    o = cfg.overlong
    if o.penalty_cache is None:
        return scores, scored
    penalty = o.penalty_weight * algos.overlong_penalty(lengths, cfg.rollout.max_new_tokens, o.penalty_cache)
    total = [None if t is None else t + float(p) for t, p in zip(scored.total, penalty, strict=True)]
    per_source = {**scored.per_source, OVERLONG_SOURCE: penalty.tolist()}
    return scores + penalty.to(scores.dtype), RewardBatch(total, per_source, scored.steps)


@dataclass
class Sampled:
    """Steps 1-2's results on this process: whole groups of K answers, their scores and figures."""

    idx: list[int]  # the prompt of each group
    gen: Generation
    scores: torch.Tensor  # (N,) NaN where a source gave None
    scored: RewardBatch
    stats: dict[str, float]  # dynamic sampling's counts (empty without it)
    seconds: dict[str, float] = field(default_factory=dict)  # time/generate and time/reward of every round

    def select(self, groups: list[int], k: int) -> Sampled:
        """Groups ``groups`` (indices into ``idx``), in that order."""
        rows = [g * k + j for g in groups for j in range(k)]
        return Sampled(
            [self.idx[g] for g in groups],
            select_generation(self.gen, rows),
            self.scores[rows],
            RewardBatch(
                [self.scored.total[r] for r in rows],
                {n: [v[r] for r in rows] for n, v in self.scored.per_source.items()},
                {n: [v[r] for r in rows] for n, v in self.scored.steps.items()},
            ),
            self.stats,
        )


def select_generation(gen: Generation, rows: list[int]) -> Generation:
    """Rows ``rows`` of a generation (its padding kept)."""
    r = torch.tensor(rows, dtype=torch.long)
    return Generation(
        gen.prompt_ids[r],
        gen.prompt_mask[r],
        gen.completion_ids[r],
        gen.completion_mask[r],
        [gen.texts[i] for i in rows],
        gen.finished[r],
        None if gen.logprobs is None else gen.logprobs[r],
    )


def concat_sampled(parts: list[Sampled], pad_id: int) -> Sampled:
    """One batch from several rounds' groups: prompts re-padded on the left, answers on the right."""
    if len(parts) == 1:
        return parts[0]
    gens = [p.gen for p in parts]
    p_width = max(g.prompt_ids.shape[1] for g in gens)
    c_width = max(g.completion_ids.shape[1] for g in gens)

    def pad(t: torch.Tensor, width: int, value: Any, left: bool) -> torch.Tensor:
        extra = width - t.shape[1]
        fill = torch.full((t.shape[0], extra), value, dtype=t.dtype)
        return torch.cat([fill, t] if left else [t, fill], dim=1)

    with_lp = all(g.logprobs is not None for g in gens)
    gen = Generation(
        torch.cat([pad(g.prompt_ids, p_width, pad_id, True) for g in gens]),
        torch.cat([pad(g.prompt_mask, p_width, False, True) for g in gens]),
        torch.cat([pad(g.completion_ids, c_width, pad_id, False) for g in gens]),
        torch.cat([pad(g.completion_mask, c_width, False, False) for g in gens]),
        [t for g in gens for t in g.texts],
        torch.cat([g.finished for g in gens]),
        torch.cat([pad(g.logprobs, c_width, 0.0, False) for g in gens]) if with_lp else None,  # type: ignore[arg-type]
    )
    scored = RewardBatch(
        [v for p in parts for v in p.scored.total],
        {n: [v for p in parts for v in p.scored.per_source[n]] for n in parts[0].scored.per_source},
        {n: [v for p in parts for v in p.scored.steps[n]] for n in parts[0].scored.steps},
    )
    return Sampled(
        [i for p in parts for i in p.idx], gen, torch.cat([p.scores for p in parts]), scored, parts[0].stats
    )


def refill_prompts(
    n_prompts: int, update: int, round_: int, rank: int, count: int, seed: int, used: set[int]
) -> list[int]:
    """Dynamic sampling's extra prompts: ``count`` prompts of a shuffle keyed by (seed, update, round,
    process), those already sampled in this update first left out (deterministic: a resumed run draws
    the same ones)."""
    order = list(range(n_prompts))
    random.Random(f"heed-refill/{seed}/{update}/{round_}/{rank}").shuffle(order)
    fresh = [i for i in order if i not in used]
    return (fresh + [i for i in order if i in used])[:count]


def sample_and_score(
    cfg: RLConfig,
    learner: Learner,
    engine: Engine,
    prompts: Prompts,
    rewards: RewardSet,
    update: int,
) -> Sampled:
    """Steps 1-2: sample and score this process's share of the update's prompts.

    With ``rollout.dynamic_sampling`` (DAPO, https://arxiv.org/abs/2503.14476 §3.2) groups whose K
    scores are all equal (:func:`heed.algos.informative_groups`: no group-relative advantage) are
    dropped and up to ``rollout.dynamic_sampling_rounds`` extra rounds sample more prompts (own keys,
    so draws stay deterministic), each as many as the rounds so far suggest are needed, until the
    process holds its share of informative groups. Every process fills its own share; the processes
    then keep the smallest count among them (the update splits equally), and when not one is found
    the first round's groups are kept (their advantages are 0: only the KL moves the policy)."""
    k, step, coll = cfg.rollout.k, update + 1, learner.coll
    share = cfg.rollout.prompts_per_step // coll.world

    seconds = {"time/generate": 0.0, "time/reward": 0.0}

    def round_of(idx: list[int] | None, round_: int) -> Sampled:
        t = time.perf_counter()
        idx, gen = sample(cfg, learner, engine, prompts, update, idx, round_)
        seconds["time/generate"] += time.perf_counter() - t
        t = time.perf_counter()
        scores, scored = score_batch(rewards, prompts, idx, gen.texts, k, step)
        scores, scored = add_overlong_penalty(cfg, scores, scored, gen.lengths)
        seconds["time/reward"] += time.perf_counter() - t
        return Sampled(idx, gen, scores, scored, {}, seconds)

    first = round_of(None, 0)
    if not cfg.rollout.dynamic_sampling:
        return first
    parts, used, drawn, dropped = [], set(first.idx), len(first.idx), 0
    current = first
    kept = 0
    for round_ in range(cfg.rollout.dynamic_sampling_rounds + 1):
        if round_ > 0:
            rate = kept / drawn  # informative groups per prompt so far
            count = share if kept == 0 else min(share, math.ceil((share - kept) / rate))
            idx = refill_prompts(len(prompts.ids), update, round_, coll.rank, count, cfg.train.seed, used)
            used.update(idx)
            drawn += len(idx)
            current = round_of(idx, round_)
        good = algos.informative_groups(current.scores, k).tolist()
        dropped += good.count(False)
        take = [g for g, ok in enumerate(good) if ok][: share - kept]
        parts.append(current.select(take, k))
        kept += len(take)
        if kept >= share:
            break
    counts = [int(c) for c in coll.gather(kept)]
    keep = min(counts)
    extra = drawn - len(first.idx)
    if keep == 0:
        out = first
    else:
        out = concat_sampled(parts, learner.tokenizer.pad_token_id)
        out = out.select(list(range(keep)), k) if keep < kept else out
    total_kept = keep * coll.world
    if total_kept < cfg.rollout.prompts_per_step and coll.main:
        warnings.warn(
            f"update {step}: dynamic sampling found {sum(counts)} of {cfg.rollout.prompts_per_step} informative "
            f"groups after {cfg.rollout.dynamic_sampling_rounds} extra rounds; training on "
            + (
                f"{total_kept}"
                if keep
                else f"the first round's {cfg.rollout.prompts_per_step} (advantages 0)"
            ),
            stacklevel=2,
        )
    valid = first.scores[~torch.isnan(first.scores)]
    sums = coll.sum(
        torch.tensor([len(out.idx), dropped, extra, float(valid.sum()), len(valid)], dtype=torch.float64)
    )
    out.seconds = seconds
    out.stats = {
        "dynamic/kept_groups": float(sums[0]),  # of the whole update (every process)
        "dynamic/dropped_groups": float(sums[1]),
        "dynamic/extra_prompts": float(sums[2]),
        "dynamic/unfiltered_reward": float(sums[3] / sums[4]) if sums[4] > 0 else math.nan,  # first round's
    }
    return out


def correction_weights(
    cfg: RLConfig, ro: Rollout, engine_logprobs: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Step 3b: off-policy correction (:func:`heed.algos.engine_importance_weights`): the weight
    π_old/π_engine of each answer token, truncated (tis) or masked (mis) at ``rollout.correction_cap``,
    by which step 6 multiplies the token's policy loss. Returns the weights (N, C) and their figures."""
    if engine_logprobs is None:
        raise ConfigError(
            f"rollout.correction: {cfg.rollout.correction} needs the engine's log-probs of the sampled tokens, "
            f"which the {cfg.rollout.engine} engine did not report; use rollout.correction: none"
        )
    assert ro.old_logprobs is not None
    w, stats = algos.engine_importance_weights(
        ro.old_logprobs, engine_logprobs, ro.response_mask, cfg.rollout.correction_cap, cfg.rollout.correction
    )
    return w, {f"correction/{k}": float(v) for k, v in stats.items()}


def process_token_rewards(
    rewards: RewardSet, scored: RewardBatch, gen: Generation, tokenizer: Any, valid: torch.Tensor
) -> torch.Tensor | None:
    """Step 4a: the process-reward sources' step scores (times their weights) on the token that ends
    each step (:func:`heed.rewards.steps.step_end_tokens`, :func:`heed.algos.step_token_rewards`),
    (N, C); None without such a source. Answers whose total is None (``valid`` False) get none."""
    from heed.rewards.steps import step_end_tokens

    sources = [s for s in rewards.sources if s.step_delimiter is not None]
    if not sources:
        return None
    n, width = gen.completion_mask.shape
    out = torch.zeros((n, width), dtype=torch.float32)
    for src in sources:
        delim = src.step_delimiter or ""
        for i in range(n):
            steps = scored.steps[src.name][i]
            if steps is None or not bool(valid[i]):
                continue
            ids = gen.completion_ids[i, : int(gen.completion_mask[i].sum())].tolist()
            decoded = ids[:-1] if bool(gen.finished[i]) else ids  # the text was decoded without the EOS
            ends = step_end_tokens(tokenizer, decoded, gen.texts[i], delim)
            if bool(gen.finished[i]):  # the last step ends on the EOS
                ends[-1] = len(ids) - 1
            out[i] += (
                src.weight
                * algos.step_token_rewards(
                    torch.tensor([ends]), torch.tensor([steps], dtype=torch.float32), width
                )[0]
            )
    return out


def without_truncated(ro: Rollout, finished: torch.Tensor) -> Rollout:
    """Step 5b: DAPO's overlong filtering: answers cut at max_new_tokens (no EOS) leave the loss (their
    response mask is cleared); their scores already served the group baselines."""
    return replace(ro, response_mask=ro.response_mask & finished.to(ro.response_mask.device).unsqueeze(-1))


@torch.no_grad()
def rollout_logprobs(
    learner: Learner, ro: Rollout, plan: MinibatchPlan, temperature: float, recompute: bool
) -> RolloutPasses:
    """Step 3: reference log-probs on every answer token; the policy's too when ``recompute`` or when
    the engine reported none (otherwise the engine's log-probs of the sampled tokens are the behaviour
    policy's); PPO's values (a shared value head reads the policy's body: without recomputed log-probs
    the LM head does not run). Micro-batches of whole groups with the prompt shared, or of rows of
    similar length, their common padding cut off. Logs the mean |engine − recomputed| log-prob when
    both exist."""
    value_head, critic = learner.value_head, learner.critic
    sampled = ro.old_logprobs
    recompute = recompute or sampled is None
    old, ref, vals = [], [], []
    for rows in plan.chunks(ro, torch.arange(len(ro), device=ro.input_ids.device)):
        part = ro.select(rows).trimmed()
        if recompute:
            out = plan.forward(learner.policy, part, temperature, value_head=value_head)
            old.append((rows, part.response(out.logprobs)))
            if out.values is not None:
                vals.append((rows, part.response(out.values)))
        elif value_head is not None:
            vals.append((rows, part.response(plan.values(learner.policy, part, value_head))))
        if critic is not None:
            vals.append((rows, part.response(critic(part.input_ids, part.attention_mask, part.target_mask))))
        with torch.inference_mode():
            ref_lp = part.response(reference_logprobs(learner.ref, part, plan, temperature))
        ref.append((rows, ref_lp.clone()))  # leave inference mode
    n, width = ro.response_mask.shape
    stats: dict[str, float] = {}
    if recompute:
        old_logprobs = scatter_response(old, n, width)
        if sampled is not None:
            diff = (sampled.to(old_logprobs.device) - old_logprobs).abs()
            stats["rollout/logprob_diff"] = float(algos.masked_mean(diff, ro.response_mask))
    else:
        assert sampled is not None
        old_logprobs = sampled.to(ro.response_mask.device) * ro.response_mask
    values = scatter_response(vals, n, width) if vals else None
    engine = sampled.to(old_logprobs.device) * ro.response_mask if recompute and sampled is not None else None
    return RolloutPasses(old_logprobs, scatter_response(ref, n, width), values, stats, engine)


def reference_logprobs(
    ref_model: Any, part: Rollout, plan: MinibatchPlan, temperature: float = 1.0
) -> torch.Tensor:
    """Reference log-probs (B, T) on the rows' device: a LoRA policy with its adapter disabled (the base
    weights, no second copy), or a separate reference model wherever it lives (the CPU with offload_ref)."""
    from heed.models.lora import adapter_disabled

    ref_dev = next(ref_model.parameters()).device
    with adapter_disabled(ref_model):
        out = plan.forward(ref_model, part.to(ref_dev), temperature)
    return out.logprobs.to(part.input_ids.device)


def compute_advantages(
    cfg: RLConfig,
    ro: Rollout,
    beta_reward: float,
    baseline: float | None,
    coll: Collective | None = None,
    step_rewards: torch.Tensor | None = None,
) -> Advantages:
    """Steps 4-5: KL-penalised token rewards, then the algorithm's advantages (and PPO's returns).

    ``ro`` carries the rollout's scores and step 3's log-probs (and values for PPO); ``baseline`` is
    REINFORCE's moving average before this update (None at the start). ``step_rewards`` (N, C) is the
    part of each score that process rewards give at step ends (:func:`process_token_rewards`): PPO
    keeps it there and puts only the rest of the score on the last token; the other algorithms use
    the whole score (the steps' sum included) per answer. On several processes ``ro`` is
    this process's share (whole RLOO/GRPO groups, so their advantages are exact locally); whitening,
    the REINFORCE baseline and the logged means use the statistics of the global batch
    (:mod:`heed.train.collective`)."""
    coll = coll or Collective()
    mask = ro.response_mask
    valid = ~torch.isnan(ro.scores)
    scores = torch.nan_to_num(ro.scores, nan=0.0)
    assert ro.old_logprobs is not None and ro.ref_logprobs is not None
    # step 4. r_t = −β·kl_t on every answer token, + score on the last one
    per_step = (
        None if step_rewards is None or cfg.algorithm != "ppo" else step_rewards.to(scores.device) * mask
    )
    outcome = scores if per_step is None else scores - per_step.sum(-1)
    token_rewards, _ = algos.kl_penalized_rewards(
        outcome, ro.old_logprobs, ro.ref_logprobs, mask, beta_reward, kind=cfg.kl_estimator
    )
    if per_step is not None:
        token_rewards = token_rewards + per_step  # each step's score on the token that ends it
    # step 5. advantages
    a = cfg.advantages
    if cfg.algorithm == "ppo":
        assert ro.old_values is not None
        if a.whiten_rewards:
            token_rewards = global_whiten(token_rewards, mask, coll, shift_mean=False)
        adv, returns = algos.token_gae(token_rewards, ro.old_values, mask, a.gamma, a.lam)
        if a.whiten:
            adv = global_whiten(adv, mask, coll)
        stats = {
            "returns/mean": global_mean(returns, mask, coll),
            "values/mean": global_mean(ro.old_values, mask, coll),
        }
        return Advantages(adv, returns, baseline, stats)
    seq_return = token_rewards.sum(-1)  # (N,) score − β·Σ_t kl_t
    seq_return = torch.where(valid, seq_return, torch.full_like(seq_return, math.nan))
    k = cfg.rollout.k
    if cfg.algorithm == "rloo":
        return Advantages(algos.rloo_advantages(seq_return, k).unsqueeze(-1), None, baseline, {})
    if cfg.algorithm == "grpo":
        adv = algos.grpo_advantages(seq_return, k, scale=a.scale_rewards)
        return Advantages(adv.unsqueeze(-1), None, baseline, {})
    # reinforce: moving-average baseline (of the global mean return), updated after use
    n_valid = coll.sum(valid.sum().to(seq_return.dtype))
    batch_mean = coll.sum(torch.nansum(seq_return)) / n_valid.clamp(min=1)  # NaN answers left out
    if baseline is None:
        baseline = float(batch_mean) if n_valid > 0 else 0.0
    adv = algos.reinforce_advantages(seq_return, baseline)
    mean_or_nan = torch.where(n_valid > 0, batch_mean, torch.full_like(batch_mean, math.nan)).reshape(1)
    new_baseline = float(algos.ema_update(baseline, mean_or_nan, a.reinforce_decay))
    return Advantages(adv.unsqueeze(-1), None, new_baseline, {"baseline": new_baseline})


def _count(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """What a micro-batch's aggregated loss is weighted by inside its minibatch: its answer tokens
    (token_mean) or its answers with at least one token (sequence means). A float64 scalar."""
    if mode == "token_mean":
        return mask.sum().to(torch.float64)
    return (mask.sum(-1) > 0).sum().to(torch.float64)


def ptx_loss(model: Any, texts: list[Any], pad_id: int, device: Any) -> torch.Tensor:
    """PPO-ptx: token-mean language-modelling loss on a batch of pretraining text."""
    from heed.data.collate import pad_batch
    from heed.models.lm import lm_token_losses

    ids, att, mask = (t.to(device) for t in pad_batch(texts, pad_id))
    mask[:, 0] = False
    return algos.masked_mean(lm_token_losses(model, ids, att, mask), mask)


def micro_batch_loss(
    cfg: RLConfig, learner: Learner, part: Rollout, plan: MinibatchPlan, beta_loss: float, add: Any
) -> torch.Tensor:
    """The loss of one micro-batch, reduced by ``update.loss_aggregation``: clipped surrogate, entropy
    bonus, β·KL when the KL is in the loss, and PPO's clipped value loss. ``add(key, value)`` collects
    the figures to log."""
    u, mode, mask = cfg.update, cfg.update.loss_aggregation, part.response_mask
    entropy_coef = learner.entropy_ctl.value if learner.entropy_ctl is not None else u.entropy_coef
    out = plan.forward(
        learner.model,
        part,
        cfg.rollout.temperature,
        value_head=learner.value_head,
        with_entropy=True,
        entropy_grad=entropy_coef > 0,
    )
    logprobs = part.response(out.logprobs)
    pg_tok, pstats = algos.policy_loss(
        logprobs,
        part.old_logprobs,
        part.advantages,
        mask,
        u.clip_eps,
        u.clip_eps_high,
        dual_clip=u.dual_clip,
        ratio_level=u.ratio_level,
    )
    if part.loss_weights is not None:  # off-policy correction: π_old/π_engine per token (step 3b)
        pg_tok = pg_tok * part.loss_weights
    pg = algos.aggregate(pg_tok, mask, mode)
    loss = pg
    assert out.entropy is not None
    entropy = part.response(out.entropy)
    if entropy_coef > 0:
        loss = loss - entropy_coef * algos.aggregate(entropy, mask, mode)
    if beta_loss > 0:
        kl_tok = algos.kl_estimate(logprobs, part.ref_logprobs, cfg.kl_estimator)
        loss = loss + beta_loss * algos.aggregate(kl_tok, mask, mode)
    if cfg.algorithm == "ppo":
        critic = learner.critic
        values = part.response(
            out.values
            if out.values is not None
            else critic(part.input_ids, part.attention_mask, part.target_mask)  # type: ignore[misc]
        )
        vl_tok, vstats = algos.value_loss(values, part.old_values, part.returns, mask, cfg.ppo.value_clip)
        vl = algos.aggregate(vl_tok, mask, mode)
        loss = loss + cfg.ppo.vf_coef * vl
        add("value_loss", vl.detach())
        add("value_clipfrac", vstats.clipfrac)
        add("explained_variance", algos.explained_variance(part.old_values, part.returns, mask))
    add("policy_loss", pg.detach())
    add("clipfrac", pstats.clipfrac)
    add("approx_kl/k1", pstats.approx_kl_k1)
    add("approx_kl/k3", pstats.approx_kl_k3)
    add("ratio", pstats.ratio_mean)
    add("entropy", algos.masked_mean(entropy.detach(), mask))
    return loss


def update_policy(
    cfg: RLConfig,
    ro: Rollout,
    learner: Learner,
    plan: MinibatchPlan,
    beta_loss: float,
    ptx_texts: list[Any],
    step: int,
) -> dict[str, float]:
    """Step 6: ``update.epochs`` passes over the rollout in shuffled minibatches (of whole groups when
    the prompt is shared); one optimizer step each.

    On several processes ``ro`` and ``plan.size`` are this process's share. Each micro-batch's loss is
    weighted by its share of the *global* minibatch's tokens (token_mean) or answers (sequence means),
    times the process count, so the gradient DDP averages is the one-process gradient of the same
    minibatch; gradients are synchronised on the minibatch's last backward only."""
    coll, accelerator = learner.coll, learner.accelerator
    use_ptx = cfg.ptx.coef > 0 and bool(ptx_texts)
    mode, n, dev = cfg.update.loss_aggregation, len(ro), ro.input_ids.device
    gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + step)
    ptx_rng = random.Random(cfg.train.seed * 31 + step)
    sums: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        sums.setdefault(key, []).append(float(value))

    g = plan.group or 1  # minibatches of whole groups when the prompt is shared
    for _epoch in range(plan.epochs):
        perm = torch.randperm(n // g, generator=gen).to(dev)
        perm = (perm.unsqueeze(-1) * g + torch.arange(g, device=dev)).flatten()
        for ms in range(0, n, plan.size):
            mb_idx = perm[ms : ms + plan.size]
            full_count = float(coll.sum(_count(ro.response_mask[mb_idx], mode)))  # of the global minibatch
            chunks = plan.chunks(ro, mb_idx)
            loss_total = 0.0
            for ci, rows in enumerate(chunks):
                part = ro.select(rows).trimmed()
                w = float(_count(part.response_mask, mode)) / max(full_count, 1.0)
                if w == 0 and coll.world == 1:  # (every process runs as many backwards as the others)
                    continue
                last = ci == len(chunks) - 1 and not use_ptx  # PPO-ptx's backward is the last one then
                with sync_context(accelerator, learner.model, last):
                    loss = micro_batch_loss(cfg, learner, part, plan, beta_loss, add)
                    (
                        loss * (w * coll.world)
                    ).backward()  # DDP divides the summed gradients by the process count
                loss_total += float(loss.detach()) * w
            loss_total = float(coll.sum(torch.tensor(loss_total, dtype=torch.float64)))
            if use_ptx:  # the same text batch on every process (same seed): its averaged gradient is its own
                batch = ptx_rng.sample(ptx_texts, min(cfg.ptx.batch_size, len(ptx_texts)))
                lm = ptx_loss(learner.model, batch, learner.tokenizer.pad_token_id, dev)
                (cfg.ptx.coef * lm).backward()
                loss_total += cfg.ptx.coef * float(lm.detach())
                add("ptx_loss", lm.detach())
            coll.average_gradients(learner.value_params)  # outside DDP
            figures = optimizer_step(
                accelerator,
                learner.trainable,
                learner.optimizer,
                learner.scheduler,
                cfg.optim.max_grad_norm,
                loss_total,
                step,
                f"{cfg.algorithm} loss",
            )
            if "grad_norm" in figures:
                add("grad_norm", figures["grad_norm"])
            add("loss", loss_total)
    # means over every micro-batch of every process (explained variance is NaN on constant returns: left out)
    keys = sorted(sums)
    finite = [[v for v in sums[key] if not math.isnan(v)] for key in keys]
    totals = coll.sum(torch.tensor([[sum(f), len(f)] for f in finite], dtype=torch.float64).reshape(-1, 2))
    return {key: float(t / c) for key, (t, c) in zip(keys, totals.tolist(), strict=True) if c > 0}


# --------------------------------------------------------------------------------------------
# evaluation


EVAL_KEY_SALT = 0x5EED_E7A1  # evaluation draws never coincide with training draws


@torch.no_grad()
def evaluate_policy(
    model: Any,
    ref_model: Any,
    tokenizer: Any,
    prompts: Prompts,
    rewards: RewardSets,
    cfg: RLConfig,
    engine: Engine,
    step: int,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Answer held-out prompts once each; reward per source, task and gold metrics, KL to the
    reference, entropy, length and distinct-n. Returns (metrics with ``eval/`` / ``gold/`` keys, rows)."""
    idx = list(range(min(cfg.eval.num_prompts, len(prompts.ids))))
    # the same draws at every evaluation (keyed by prompt only): differences between steps come from
    # the policy, not from sampling noise
    keys = row_keys(cfg.train.seed + EVAL_KEY_SALT, idx)
    gen = engine(
        model, tokenizer, [prompts.ids[i] for i in idx], _sampling(cfg, eval_mode=True), 1, keys=keys
    )
    texts = gen.texts
    batch_prompts = [prompts.examples[i].prompt for i in idx]
    columns = prompts.columns(idx, 1)
    scored = rewards.train(batch_prompts, texts, columns, step=step)
    out: dict[str, float] = {}
    totals = [v for v in scored.total if v is not None]
    out["eval/reward"] = sum(totals) / len(totals) if totals else math.nan
    out.update(scored.means(prefix="eval/reward/"))
    for group, prefix in ((rewards.metrics, "eval/"), (rewards.gold, "gold/")):
        if group is not None:
            out.update(group(batch_prompts, texts, columns, step=step).means(prefix=prefix))
    ro = rollout_from_generation(gen, torch.zeros(len(texts)))
    dev = next(model.parameters()).device
    ro = ro.to(dev)
    micro = cfg.update.micro_batch_size
    kl1, kl3, ent = [], [], []
    for rows in length_sorted_chunks(ro, torch.arange(len(ro), device=dev), micro):
        part = ro.select(rows).trimmed()
        pol = policy_forward(model, part.input_ids, part.attention_mask, part.target_mask, with_entropy=True)
        ref = reference_logprobs(ref_model, part, ROW_BY_ROW)
        lp, rlp = part.response(pol.logprobs), part.response(ref)
        m = part.response_mask
        kl1.append(algos.masked_sum(algos.kl_estimate(lp, rlp, "k1"), m, dim=-1))
        kl3.append(algos.masked_sum(algos.kl_estimate(lp, rlp, "k3"), m, dim=-1))
        assert pol.entropy is not None
        ent.append(part.response(pol.entropy)[m])
    out["eval/kl"] = float(torch.cat(kl1).mean())
    out["eval/kl_k3"] = float(torch.cat(kl3).mean())
    out["eval/entropy"] = float(torch.cat(ent).mean()) if ent else math.nan
    out["eval/length"] = float(gen.lengths.float().mean())
    div = diversity_metrics(texts)
    out["eval/distinct_1"] = div["diversity/distinct_1"]
    out["eval/distinct_2"] = div["diversity/distinct_2"]
    out["eval/length_words"] = div["length/words"]
    rows = []
    for j in range(min(cfg.eval.samples, len(texts))):
        row: dict[str, Any] = {
            "step": step,
            "prompt": prompt_text(batch_prompts[j]),
            "completion": texts[j],
            "reward": scored.total[j],
        }
        if rewards.gold is not None:
            g = rewards.gold(
                batch_prompts[j : j + 1], texts[j : j + 1], {k: v[j : j + 1] for k, v in columns.items()}
            )
            row["gold"] = next(iter(g.per_source.values()))[0]
        rows.append(row)
    return out, rows


@torch.no_grad()
def evaluate_best_of_n(
    model: Any, tokenizer: Any, prompts: Prompts, rewards: RewardSets, cfg: RLConfig, engine: Engine, n: int
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The best-of-``n`` baseline: ``n`` answers to each held-out prompt from ``model``, the one the
    training reward scores highest kept (an answer scored None never wins), and the evaluation's
    rewards, metrics, gold figures, length and diversity on the kept answers.

    Its KL to ``model`` has a closed form, KL = log n − (n − 1)/n nats (:func:`heed.algos.best_of_n_kl`;
    Stiennon et al. 2020, https://arxiv.org/abs/2009.01325), reported as ``eval/kl``: with ``model`` the
    reference (the SFT policy) it places best-of-n on the same reward-vs-KL axes as every tuned policy.
    """
    from heed.rewards.select import best_of_n

    idx = list(range(min(cfg.eval.num_prompts, len(prompts.ids))))
    keys = row_keys(cfg.train.seed + EVAL_KEY_SALT, [i * n + j for i in idx for j in range(n)])
    gen = engine(
        model, tokenizer, [prompts.ids[i] for i in idx], _sampling(cfg, eval_mode=True), n, keys=keys
    )
    all_prompts = [prompts.examples[i].prompt for i in idx for _ in range(n)]
    scored = rewards.train(all_prompts, gen.texts, prompts.columns(idx, n), step=0)
    best, counts = best_of_n(scored.total, n)
    kept = [(i, row) for i, row in zip(idx, best, strict=True) if row is not None]
    if not kept:
        raise ConfigError(
            f"heed eval --best-of {n}: the reward scored none of the answers (every source returned None)"
        )
    texts = [gen.texts[row] for _, row in kept]
    batch_prompts = [prompts.examples[i].prompt for i, _ in kept]
    columns = prompts.columns([i for i, _ in kept], 1)
    totals = [scored.total[row] for _, row in kept]
    out: dict[str, float] = {"eval/best_of": float(n), "eval/reward": sum(totals) / len(totals)}  # type: ignore[arg-type]
    for group, prefix in ((rewards.metrics, "eval/"), (rewards.gold, "gold/")):
        if group is not None:
            out.update(group(batch_prompts, texts, columns).means(prefix=prefix))
    out["eval/kl"] = algos.best_of_n_kl(n)
    out["eval/length"] = float(torch.stack([gen.lengths[row] for _, row in kept]).float().mean())
    div = diversity_metrics(texts)
    out |= {"eval/distinct_1": div["diversity/distinct_1"], "eval/distinct_2": div["diversity/distinct_2"]}
    out["eval/unscored_prompts"] = float(counts.unscored)
    rows = [
        {"step": 0, "prompt": prompt_text(p), "completion": t, "reward": r}
        for p, t, r in list(zip(batch_prompts, texts, totals, strict=True))[: cfg.eval.samples]
    ]
    return out, rows


# --------------------------------------------------------------------------------------------
# the loop


def _append_samples(run: Path, rows: list[dict[str, Any]]) -> None:
    with (run / "samples.jsonl").open("a", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def answer_figures(ro: Rollout, texts: list[str], scored: Any, finished: torch.Tensor) -> dict[str, Any]:
    """Per-answer figures that step 7 averages, as plain lists (so they gather cheaply across processes):
    score (NaN where a source gave None), per-sequence KL to the reference (k1, k3), length, whether
    the answer ended (EOS), text."""
    mask = ro.response_mask
    assert ro.old_logprobs is not None and ro.ref_logprobs is not None
    return {
        "score": ro.scores.tolist(),
        "kl1": algos.masked_sum(
            algos.kl_estimate(ro.old_logprobs, ro.ref_logprobs, "k1"), mask, dim=-1
        ).tolist(),
        "kl3": algos.masked_sum(
            algos.kl_estimate(ro.old_logprobs, ro.ref_logprobs, "k3"), mask, dim=-1
        ).tolist(),
        "length": mask.sum(-1).tolist(),
        "finished": [bool(f) for f in finished],
        "text": list(texts),
        "total": list(scored.total),
        "per_source": {name: list(vals) for name, vals in scored.per_source.items()},
    }


def merge_figures(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate :func:`answer_figures` of every process (in rank order) into those of the global batch."""
    out: dict[str, Any] = {key: [v for p in parts for v in p[key]] for key in parts[0] if key != "per_source"}
    out["per_source"] = {
        name: [v for p in parts for v in p["per_source"][name]] for name in parts[0]["per_source"]
    }
    return out


def batch_statistics(fig: dict[str, Any], entropy: float | None) -> dict[str, float]:
    """Figures of one rollout batch logged every step (reward, KL to the reference, length, diversity),
    from :func:`answer_figures` (of the global batch on several processes)."""
    scores_all = torch.tensor(fig["score"], dtype=torch.float32)
    valid = ~torch.isnan(scores_all)
    scores = scores_all[valid]
    out = {
        "reward/mean": float(scores.mean()) if len(scores) else math.nan,
        "reward/std": float(scores.std()) if len(scores) > 1 else 0.0,
        "reward/none_frac": float((~valid).float().mean()),
        **RewardBatch(fig["total"], fig["per_source"]).means(),
        "kl/k1": float(torch.tensor(fig["kl1"])[valid].mean()),
        "kl/k3": float(torch.tensor(fig["kl3"])[valid].mean()),
        "length/mean": float(torch.tensor(fig["length"], dtype=torch.float32).mean()),
        **diversity_metrics(fig["text"]),
    }
    if entropy is not None:
        out["entropy"] = entropy
    return out


# --------------------------------------------------------------------------------------------
# setting up a run


def check_rl_config(cfg: RLConfig, world: int) -> None:
    """What must hold before anything is loaded: paths only, an engine that takes the policy, a precision
    the update loop supports, and shares that divide evenly over the processes."""
    check_paths(cfg)
    if cfg.rollout.engine == "vllm":
        check_vllm()
        if cfg.model.lora is not None and cfg.model.lora.quantize != "none":
            raise ConfigError(
                "rollout.engine: vllm does not take a quantized (QLoRA) policy's weights; use "
                "model.lora.quantize: none or rollout.engine: heed"
            )
    if cfg.model.mixed_precision == "fp16":
        raise ConfigError(
            "model.mixed_precision: heed rl supports no or bf16 (fp16 would need a gradient scaler "
            "in its update loop); use bf16"
        )
    check_processes(cfg, world)


def load_models(cfg: RLConfig, ckpt: Path | None, device: Any) -> tuple[Any, Any, Any, Any, Any]:
    """The policy (from the checkpoint when resuming; under LoRA the base plus a new adapter or the
    checkpoint's), the frozen reference, PPO's value head or critic, and the tokenizer. Returns
    ``(policy, ref, value_head, critic, tokenizer)``."""
    from heed.models.loading import load_causal_lm, load_tokenizer
    from heed.models.lora import apply_lora, enable_gradient_checkpointing, place, quantization_kwargs
    from heed.models.value import hidden_size

    policy_path = cfg.model.path or ""
    lora = cfg.model.lora
    tokenizer = load_tokenizer(policy_path, padding_side="left")
    policy = load_causal_lm(
        policy_path if lora else (ckpt or policy_path), dtype=cfg.model.dtype, **quantization_kwargs(lora)
    )
    if lora is not None:
        policy = apply_lora(policy, lora, adapter=ckpt)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    if lora is not None and cfg.ref_model is None:
        ref = policy  # the base under the adapter (disabled for reference passes): no second copy
    else:
        ref = load_causal_lm(cfg.ref_model or policy_path, dtype=cfg.model.dtype)
        ref.to("cpu" if cfg.offload_ref else device).eval().requires_grad_(False)
    value_head: ValueHead | None = None
    critic: Critic | None = None
    if cfg.algorithm == "ppo" and cfg.ppo.critic == "shared":
        value_head = ValueHead(hidden_size(policy))
        saved_head = Path(policy_path) / VALUE_HEAD_FILE
        if saved_head.is_file():  # a second round from an earlier PPO policy keeps its critic
            value_head.load_state_dict(torch.load(saved_head, map_location="cpu"))
        value_head.to(device)
    elif cfg.algorithm == "ppo":
        critic = Critic(load_causal_lm(cfg.ppo.critic_path or policy_path, dtype=cfg.model.dtype)).to(device)
    return place(policy, device), ref, value_head, critic, tokenizer


def make_learner(
    cfg: RLConfig, accelerator: Any, coll: Collective, ckpt: Path | None
) -> tuple[Learner, MinibatchPlan, dict[str, Any]]:
    """Models, the minibatch plan, the optimizer over the policy (+ value head / critic at
    ``ppo.critic_lr``) with its schedule and restored state, and the KL controller. DDP wraps the
    policy for the update; generation, rollout passes, evaluation and saving use the plain model; the
    value head / critic stay outside DDP (their gradients are averaged by hand). Returns the learner,
    the plan and the checkpoint's extra state (``{}`` when starting fresh)."""
    from heed.models.lm import disable_dropout

    policy, ref, value_head, critic, tokenizer = load_models(cfg, ckpt, accelerator.device)
    # dropout would make the rollout's and the update's log-probs differ (ratio ≠ 1 before any step);
    # a model still random in training mode is updated in eval mode
    train_mode = disable_dropout(policy)
    if critic is not None and not disable_dropout(critic.model):  # its values must not be random either
        critic.eval()
    plan = minibatch_plan(cfg, coll.world, policy, ref)
    steps_per_update = cfg.update.epochs * (cfg.batch_size // (plan.size * coll.world))
    value_params = [p for m in (value_head, critic) if m is not None for p in m.parameters()]
    value_group = [{"params": value_params, "weight_decay": 0.0, "lr": cfg.ppo.critic_lr or cfg.optim.lr}]
    model, optimizer, scheduler, saved = prepare_optimization(
        accelerator,
        policy,
        policy.parameters(),
        cfg.optim,
        cfg.train.updates * steps_per_update,
        ckpt,
        value_group if value_params else [],
    )
    kl_ctl: Any = (
        algos.AdaptiveKLController(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon)
        if cfg.kl.adaptive
        else algos.FixedKLController(cfg.kl.beta)
    )
    u = cfg.update
    entropy_ctl = algos.EntropyController(
        u.entropy_coef, u.entropy_target, u.entropy_coef_lr, u.entropy_coef_max
    )
    extra = saved.get("extra", {}) if ckpt is not None else {}
    kl_ctl.value = extra.get("kl_beta", kl_ctl.value)
    if extra.get("entropy_coef") is not None:  # the adaptive coefficient where the run stopped
        entropy_ctl.value = extra["entropy_coef"]
    for module, key in ((value_head, "value_head"), (critic, "critic")):
        if module is not None and extra.get(key) is not None:
            module.load_state_dict(extra[key])
    coll.broadcast(value_params)  # every process starts from the main process's value head / critic
    learner = Learner(
        policy,
        model,
        ref,
        tokenizer,
        optimizer,
        scheduler,
        kl_ctl,
        accelerator,
        coll,
        value_head,
        critic,
        train_mode,
        entropy_ctl,
    )
    return learner, plan, {"step": saved["step"], **extra}


def load_ptx(cfg: RLConfig, tokenizer: Any) -> list[Any]:
    """PPO-ptx's plain-text sequences, truncated to ``ptx.max_length`` (none without ``ptx.coef``)."""
    if not (cfg.ptx.coef > 0 and cfg.ptx.data):
        return []
    from heed.data.collate import truncate
    from heed.data.templating import encode_text

    texts = [encode_text(tokenizer, r.text) for r in load_records(cfg.ptx.data, "text")]
    return truncate(texts, cfg.ptx.max_length)[0]


def make_rl_engine(cfg: RLConfig, model_path: str | Path) -> Engine:
    return make_engine(
        cfg.rollout.engine,
        cfg.rollout.batch_size,
        model_path=str(model_path),
        seed=cfg.train.seed,
        vllm_options={
            "gpu_memory_utilization": cfg.rollout.vllm_gpu_memory,
            "sleep": cfg.rollout.vllm_sleep,
            "dtype": cfg.model.dtype,
        },
    )


# --------------------------------------------------------------------------------------------
# the loop


@dataclass
class RLRun:
    """Everything one ``heed rl`` run works with, made once by :func:`setup_rl`."""

    cfg: RLConfig
    run: Path
    learner: Learner
    plan: MinibatchPlan
    rewards: RewardSets
    prompts: Prompts
    eval_prompts: Prompts | None
    ptx_texts: list[Any]
    engine: Engine
    log: RunLog
    start_update: int  # updates a resumed run had done
    baseline: float | None  # REINFORCE's moving average, carried from update to update
    totals: Totals

    def evaluate(self, step: int, policy_name: str) -> dict[str, float]:
        """Evaluation on held-out prompts, on the main process only (they are few); the others wait."""
        ev: dict[str, float] = {}
        learner = self.learner
        if self.eval_prompts is not None and learner.coll.main:
            ev, rows = evaluate_policy(
                learner.policy,
                learner.ref,
                learner.tokenizer,
                self.eval_prompts,
                self.rewards,
                self.cfg,
                self.engine,
                step,
            )
            self.log.logger.log(step, ev, split="eval")
            _append_samples(self.run, [{**r, "policy": policy_name} for r in rows])
        learner.accelerator.wait_for_everyone()
        return ev


def setup_rl(cfg: RLConfig, resume: bool, config_dir: str | Path | None) -> RLRun:
    """Step 0: checks, run folder, seed and resume point; models, optimizer and KL controller; reward
    sources, prompts, PPO-ptx text and the rollout engine; the metrics log and monitors."""
    accelerator = make_accelerator(cfg.model.mixed_precision)
    coll = Collective.of(accelerator)
    check_rl_config(cfg, coll.world)
    accelerator, run, ckpt = start_run(
        cfg, cfg.out, cfg.train.seed, cfg.model.mixed_precision, resume, accelerator
    )
    learner, plan, saved = make_learner(cfg, accelerator, coll, ckpt)
    tok = learner.tokenizer
    start = saved["step"]
    return RLRun(
        cfg,
        run,
        learner,
        plan,
        RewardSets.build(cfg, config_dir),
        load_prompts(cfg.data.prompts, tok, cfg),
        load_prompts(cfg.data.eval_prompts, tok, cfg) if cfg.data.eval_prompts else None,
        load_ptx(cfg, tok),
        make_rl_engine(cfg, cfg.model.path or ""),
        RunLog.open(cfg, run, coll.main, resumed_at=start if ckpt is not None else None),
        start,
        saved.get("baseline"),
        Totals(**(saved.get("totals") or {})),  # what a resumed run had done before it stopped
    )


@guard_run
def train_rl(cfg: RLConfig, resume: bool = False, config_dir: str | Path | None = None) -> dict[str, Any]:
    """Run PPO / RLOO / GRPO / REINFORCE; returns the final summary (also written to ``summary.json``).

    ``config_dir`` is where relative ``file.py:function`` reward paths are looked up (the config's folder).
    """
    # step 0. checks, run folder, resume point; models, optimizer, rewards, prompts, engine, log
    t_start = time.time()
    r = setup_rl(cfg, resume, config_dir)
    learner, plan, totals, dev = r.learner, r.plan, r.totals, r.learner.accelerator.device
    summary: dict[str, Any] = {"algo": cfg.algorithm}
    if cfg.eval.at_start and r.start_update == 0:
        summary |= {f"start/{k}": v for k, v in r.evaluate(0, cfg.eval.initial_policy_name).items()}
    elif r.start_update > 0 and learner.coll.main:  # resumed: the evaluation before training is logged
        summary |= r.log.start_eval()

    t0, t_start = time.time() - totals.train_seconds, t_start - totals.total_seconds
    none_watch = NoneRewardWatch(cfg.train.max_none_updates)
    cadence = Cadence.of(cfg.log, cfg.train.updates)
    metrics: dict[str, float] = {}
    show = cfg.log.progress and learner.coll.main
    with StepProgress(f"rl {cfg.algorithm}", cfg.train.updates, enabled=show, start=r.start_update) as bar:
        for update in range(r.start_update, cfg.train.updates):
            step = update + 1
            learner.model.eval()
            # steps 1-2. sample K completions per prompt (this process's consecutive share of whole
            # prompts) and score them (None -> NaN: left out of baselines and the loss); the soft
            # overlong penalty; dynamic sampling drops groups without reward variance and refills
            t_update = time.perf_counter()
            batch = sample_and_score(cfg, learner, r.engine, r.prompts, r.rewards.train, update)
            gen, scored = batch.gen, batch.scored
            totals.generation_seconds += batch.seconds["time/generate"]
            ro = rollout_from_generation(gen, batch.scores).to(dev)
            seconds = dict(batch.seconds)  # where this update's time went, logged as time/<step>

            # step 3. log-probs of policy and reference (and values for PPO), once per rollout
            t = time.perf_counter()
            # (an off-policy correction compares the engine's log-probs with recomputed ones)
            recompute = not cfg.rollout.reuse_logprobs or cfg.rollout.engine == "vllm"
            recompute = recompute or cfg.rollout.correction != "none"
            with learner.accelerator.autocast():
                passes = rollout_logprobs(learner, ro, plan, cfg.rollout.temperature, recompute)
            seconds["time/logprobs"] = time.perf_counter() - t
            ro.old_logprobs, ro.ref_logprobs, ro.old_values = (
                passes.old_logprobs,
                passes.ref_logprobs,
                passes.old_values,
            )
            # step 3b. off-policy correction: weight each token's loss by π_old/π_engine
            stats = dict(passes.stats)
            if cfg.rollout.correction != "none":
                ro.loss_weights, correction_stats = correction_weights(cfg, ro, passes.engine_logprobs)
                stats |= correction_stats

            # steps 4-5. KL-penalised rewards (process rewards at their steps' ends) and advantages
            t = time.perf_counter()
            beta = learner.kl_ctl.value
            step_rewards = process_token_rewards(
                r.rewards.train, scored, gen, learner.tokenizer, ro.scores.isfinite().cpu()
            )
            adv = compute_advantages(
                cfg, ro, beta if cfg.kl_in_reward else 0.0, r.baseline, learner.coll, step_rewards
            )
            ro.advantages, ro.returns, r.baseline = adv.advantages, adv.returns, adv.baseline
            seconds["time/advantages"] = time.perf_counter() - t

            # step 6. epochs of clipped-surrogate updates over minibatches (overlong filtering: answers
            # cut at max_new_tokens leave the loss)
            t = time.perf_counter()
            learner.model.train(learner.train_mode)
            train_ro = without_truncated(ro, gen.finished) if cfg.overlong.filter else ro
            with learner.accelerator.autocast():
                upd = update_policy(
                    cfg, train_ro, learner, plan, 0.0 if cfg.kl_in_reward else beta, r.ptx_texts, step
                )
            seconds["time/update"] = time.perf_counter() - t

            # step 7. log, adapt β (on the global KL), watch, evaluate, checkpoint
            fig = merge_figures(learner.coll.gather(answer_figures(ro, gen.texts, scored, gen.finished)))
            none_watch.update(fig["total"], fig["per_source"], step)  # global figures: every process stops
            totals.samples += len(fig["score"])
            metrics = batch_statistics(fig, upd.pop("entropy", None))
            learner.kl_ctl.update(metrics["kl/k1"], len(fig["score"]))
            metrics |= upd | adv.stats | _mean_over_processes(stats, learner.coll) | batch.stats
            metrics |= {"kl/beta": beta, "lr": learner.scheduler.get_last_lr()[0]}
            if cfg.overlong.filter or cfg.overlong.penalty_cache is not None:
                metrics["overlong/truncated_frac"] = 1.0 - sum(fig["finished"]) / max(len(fig["finished"]), 1)
            if learner.entropy_ctl is not None and learner.entropy_ctl.adaptive:
                metrics["entropy/coef"] = learner.entropy_ctl.value  # the coefficient this update used
                learner.entropy_ctl.update(metrics.get("entropy", math.nan))
            metrics["samples_per_s"] = totals.samples / max(time.time() - t0, 1e-9)
            seconds["time/step"] = time.perf_counter() - t_update  # up to here: logging and saving follow
            metrics |= seconds
            if cadence.log(step):
                r.log.logger.log(step, metrics)
            for alarm in r.log.watch(step, metrics, fig):
                bar.log(f"alarm: {alarm}")
            if cadence.eval(step):
                r.evaluate(step, cfg.algorithm)
            if cadence.save(step):
                totals.train_seconds, totals.total_seconds = time.time() - t0, time.time() - t_start
                save_rl_checkpoint(r.run, step, learner, cfg, r.baseline, totals)
            bar.advance(1, {"reward": metrics["reward/mean"], "kl": metrics["kl/k1"]})

    # step 8. final evaluation, model and summary
    totals.train_seconds, totals.total_seconds = time.time() - t0, time.time() - t_start
    summary |= r.evaluate(cfg.train.updates, cfg.algorithm)
    if learner.coll.main:
        summary = finish_rl(r, summary | {k: v for k, v in metrics.items() if isinstance(v, int | float)})
    return summary


def finish_rl(r: RLRun, summary: dict[str, Any]) -> dict[str, Any]:
    """``final/`` (with PPO's value head beside it) and ``summary.json``, on the main process."""
    learner, totals = r.learner, r.totals
    save_final(learner.policy, learner.tokenizer, r.run / "final")
    if learner.value_head is not None:
        torch.save(learner.value_head.state_dict(), r.run / "final" / VALUE_HEAD_FILE)
    summary |= {
        "updates": r.cfg.train.updates,
        "processes": learner.coll.world,
        "samples": totals.samples,
        "samples_per_s": totals.samples / max(totals.train_seconds, 1e-9),
        "generation_seconds": totals.generation_seconds,
        "train_seconds": totals.train_seconds,
        "total_seconds": totals.total_seconds,
        "peak_memory_mb": peak_memory_mb(),
        "alarms": len(r.log.monitor.alarms),
    }
    write_json(r.run / "summary.json", summary)
    r.log.logger.close()
    return summary


@dataclass
class RunLog:
    """The run's metrics log and reward-hacking monitor (written by the main process only)."""

    logger: MetricsLogger
    monitor: Monitor
    run: Path
    main: bool

    @classmethod
    def open(cls, cfg: RLConfig, run: Path, main: bool, resumed_at: int | None) -> RunLog:
        """A fresh log, or a resumed run's: rows logged after its checkpoint are dropped (the run
        writes them again) and the monitor replays the kept history."""
        logger = MetricsLogger(run, tensorboard=cfg.log.tensorboard, enabled=main)
        monitor = Monitor(cfg.monitor)
        if resumed_at is not None and main:
            logger.truncate_after(resumed_at)
            truncate_jsonl(run / "samples.jsonl", resumed_at)
            truncate_jsonl(run / "alarms.jsonl", resumed_at)
            monitor = resume_monitor(read_metrics(run / "metrics.jsonl"), cfg.monitor)
        if main:
            append_alarms(run, [])
        return cls(logger, monitor, run, main)

    def start_eval(self) -> dict[str, float]:
        """The evaluation before training, from the log of a resumed run (``start/`` keys)."""
        out: dict[str, float] = {}
        for row in read_metrics(self.run / "metrics.jsonl"):
            if row.get("split") == "eval" and row.get("step") == 0:
                out.update({f"start/{k}": v for k, v in row.items() if k.startswith(("eval/", "gold/"))})
        return out

    def watch(self, step: int, metrics: dict[str, float], fig: dict[str, Any]) -> list[Any]:
        """The monitors' new alarms on this update's scored answers (appended to ``alarms.jsonl``)."""
        if not self.main:
            return []
        valid_rewards = [v for v in fig["total"] if v is not None]
        texts = [t for t, v in zip(fig["text"], fig["total"], strict=True) if v is not None]
        alarms = self.monitor.update(step, metrics, texts, valid_rewards)
        append_alarms(self.run, alarms)
        return alarms


def save_rl_checkpoint(
    run: Path, step: int, learner: Learner, cfg: RLConfig, baseline: float | None, totals: Totals
) -> None:
    """``checkpoints/step-N/``: the policy and optimizer, plus what the loop carries (β, REINFORCE's
    baseline, the run's totals, the value head or critic)."""
    extra = {
        "kl_beta": learner.kl_ctl.value,
        "entropy_coef": learner.entropy_ctl.value if learner.entropy_ctl is not None else None,
        "baseline": baseline,
        "totals": asdict(totals),
        "value_head": learner.value_head.state_dict() if learner.value_head is not None else None,
        "critic": learner.critic.state_dict() if learner.critic is not None else None,
    }
    checkpoint(
        learner.accelerator,
        run,
        step,
        learner.policy,
        learner.tokenizer,
        learner.optimizer,
        learner.scheduler,
        cfg.log.keep_checkpoints,
        extra,
    )


def evaluate_model(
    cfg: RLConfig,
    model_dir: str | Path,
    out: str | Path | None = None,
    config_dir: str | Path | None = None,
    best_of: int | None = None,
) -> dict[str, Any]:
    """``heed eval``: the evaluation of :func:`train_rl` for any model folder, against the config's
    reference (``ref_model``, else ``model.path``); with ``best_of`` n (1 included: one answer per
    prompt, KL 0), the best-of-n baseline of that model instead (:func:`evaluate_best_of_n`), the
    points of the report's reference frontier. Writes ``eval.json`` and ``samples.jsonl`` to ``out``."""
    from heed.models.loading import load_causal_lm, load_tokenizer

    if not cfg.data.eval_prompts:
        raise ConfigError("data.eval_prompts: heed eval needs held-out prompts (e.g. builtin:prompts_eval)")
    if best_of is not None and best_of < 1:
        raise ConfigError(f"--best-of: expected a number of answers >= 1, got {best_of}")
    set_seed(cfg.train.seed)
    check_paths(cfg)
    ref_path = cfg.ref_model or cfg.model.path or ""
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    model = load_causal_lm(model_dir, dtype=cfg.model.dtype).eval()
    rewards = RewardSets.build(cfg, config_dir)
    prompts = load_prompts(cfg.data.eval_prompts, tokenizer, cfg)
    engine = make_rl_engine(cfg, model_dir)
    if best_of is not None:
        result, rows = evaluate_best_of_n(model, tokenizer, prompts, rewards, cfg, engine, best_of)
        result = {"model": str(model_dir), "kl_to": str(model_dir), **result}
    else:
        ref_model = load_causal_lm(ref_path, dtype=cfg.model.dtype).eval()
        result, rows = evaluate_policy(model, ref_model, tokenizer, prompts, rewards, cfg, engine, 0)
        result = {"model": str(model_dir), "reference": str(ref_path), **result}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval.json", result)
        from heed.data.io import write_jsonl

        write_jsonl(out / "samples.jsonl", [{**r, "policy": Path(model_dir).name} for r in rows])
    return result

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

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from heed import algos
from heed.config.rl import RLConfig
from heed.data.records import PromptExample, load_records, prompt_text
from heed.errors import ConfigError
from heed.models.forward import TokenOutputs, can_share_prompt, policy_forward, shared_prompt_forward
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
from heed.rollout.generate import SamplingParams, encode_prompts
from heed.rollout.sampler import row_keys
from heed.rollout.vllm_engine import check_vllm
from heed.train.collective import Collective, global_mean, global_whiten
from heed.train.common import (
    check_finite,
    guard_run,
    make_accelerator,
    peak_memory_mb,
    prepare_optimization,
    save_checkpoint,
    set_seed,
    start_run,
    write_json,
)

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
        )
    r = cfg.rollout
    return SamplingParams(
        max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k
    )


# --------------------------------------------------------------------------------------------
# the pieces of one update


def score_batch(
    rewards: RewardSet, prompts: Prompts, idx: list[int], texts: list[str], k: int, step: int
) -> tuple[torch.Tensor, Any]:
    """Step 2: total reward per answer (N,), NaN where a source returned None, plus per-source values."""
    batch_prompts = [prompts.examples[i].prompt for i in idx for _ in range(k)]
    scored = rewards(batch_prompts, texts, prompts.columns(idx, k), step=step)
    total = torch.tensor([math.nan if v is None else v for v in scored.total], dtype=torch.float32)
    return total, scored


def micro_batches(ro: Rollout, rows: torch.Tensor, micro: int, group: int) -> list[torch.Tensor]:
    """Row indices of the micro-batches over ``rows``: whole groups of ``group`` answers for the
    shared-prompt forward (``group`` > 0; ``rows`` then holds whole groups), else rows of similar length."""
    if group:
        return group_chunks(ro, rows[::group] // group, group, micro)
    return length_sorted_chunks(ro, rows, micro)


def forward_part(model: Any, part: Rollout, temperature: float, group: int, **kw: Any) -> TokenOutputs:
    """The policy forward over a micro-batch: each prompt once per group of ``group`` answers
    (:func:`shared_prompt_forward`) when ``group`` > 0, else row by row."""
    if group:
        return shared_prompt_forward(
            model,
            part.input_ids,
            part.attention_mask,
            part.target_mask,
            part.prompt_width,
            group,
            temperature,
            **kw,
        )
    return policy_forward(model, part.input_ids, part.attention_mask, part.target_mask, temperature, **kw)


@torch.no_grad()
def rollout_logprobs(
    model: Any,
    ref_model: Any,
    value_head: Any,
    critic: Any,
    ro: Rollout,
    temperature: float,
    micro: int,
    recompute: bool,
    group: int = 0,
) -> dict[str, float]:
    """Step 3: reference log-probs on every answer token; the policy's (and values) too when
    ``recompute`` or when the engine reported none (otherwise the engine's log-probs of the sampled
    tokens are the behaviour policy's). Micro-batches of whole groups with the prompt shared
    (``group`` > 0) or of rows of similar length, their common padding cut off. Returns the mean
    |engine − recomputed| log-prob when both exist."""
    sampled = ro.old_logprobs
    recompute = recompute or sampled is None or value_head is not None or critic is not None
    old, ref, vals = [], [], []
    all_rows = torch.arange(len(ro), device=ro.input_ids.device)
    for rows in micro_batches(ro, all_rows, micro, group):
        part = ro.select(rows).trimmed()
        ids, att, tgt = part.input_ids, part.attention_mask, part.target_mask
        if recompute:
            out = forward_part(model, part, temperature, group, value_head=value_head)
            old.append((rows, part.response(out.logprobs)))
            if out.values is not None:
                vals.append((rows, part.response(out.values)))
            elif critic is not None:
                vals.append((rows, part.response(critic(ids, att, tgt))))
        with torch.inference_mode():
            ref_lp = part.response(reference_logprobs(ref_model, part, temperature, group))
        ref.append((rows, ref_lp.clone()))  # leave inference mode
    n, width = ro.response_mask.shape
    ro.ref_logprobs = scatter_response(ref, n, width)
    ro.old_values = scatter_response(vals, n, width) if vals else None
    stats: dict[str, float] = {}
    if recompute:
        ro.old_logprobs = scatter_response(old, n, width)
        if sampled is not None:
            diff = (sampled.to(ro.old_logprobs.device) - ro.old_logprobs).abs()
            stats["rollout/logprob_diff"] = float(algos.masked_mean(diff, ro.response_mask))
    else:
        assert sampled is not None
        ro.old_logprobs = sampled.to(ro.response_mask.device) * ro.response_mask
    return stats


def reference_logprobs(
    ref_model: Any, part: Rollout, temperature: float = 1.0, group: int = 0
) -> torch.Tensor:
    """Reference log-probs (B, T) on the rows' device: a LoRA policy with its adapter disabled (the base
    weights, no second copy), or a separate reference model wherever it lives (the CPU with offload_ref)."""
    from heed.models.lora import adapter_disabled

    ref_dev = next(ref_model.parameters()).device
    with adapter_disabled(ref_model):
        out = forward_part(ref_model, part.to(ref_dev), temperature, group)
    return out.logprobs.to(part.input_ids.device)


def compute_advantages(
    cfg: RLConfig, ro: Rollout, beta_reward: float, state: dict[str, Any], coll: Collective | None = None
) -> dict[str, float]:
    """Steps 4-5: KL-penalised token rewards, then the algorithm's advantages (and PPO's returns).

    On several processes ``ro`` is this process's share (whole RLOO/GRPO groups, so their advantages
    are exact locally); whitening, the REINFORCE baseline and the logged means use the statistics of
    the global batch (:mod:`heed.train.collective`)."""
    coll = coll or Collective()
    mask = ro.response_mask
    valid = ~torch.isnan(ro.scores)
    scores = torch.nan_to_num(ro.scores, nan=0.0)
    assert ro.old_logprobs is not None and ro.ref_logprobs is not None
    # step 4. r_t = −β·kl_t on every answer token, + score on the last one
    token_rewards, _ = algos.kl_penalized_rewards(
        scores, ro.old_logprobs, ro.ref_logprobs, mask, beta_reward, kind=cfg.kl_estimator
    )
    # step 5. advantages
    stats: dict[str, float] = {}
    if cfg.algorithm == "ppo":
        assert ro.old_values is not None
        if cfg.advantages.whiten_rewards:
            token_rewards = global_whiten(token_rewards, mask, coll, shift_mean=False)
        adv, returns = algos.token_gae(
            token_rewards, ro.old_values, mask, cfg.advantages.gamma, cfg.advantages.lam
        )
        if cfg.advantages.whiten:
            adv = global_whiten(adv, mask, coll)
        ro.advantages, ro.returns = adv, returns
        stats["returns/mean"] = global_mean(returns, mask, coll)
        stats["values/mean"] = global_mean(ro.old_values, mask, coll)
        return stats
    seq_return = token_rewards.sum(-1)  # (N,) score − β·Σ_t kl_t
    seq_return = torch.where(valid, seq_return, torch.full_like(seq_return, math.nan))
    k = cfg.rollout.k
    if cfg.algorithm == "rloo":
        adv = algos.rloo_advantages(seq_return, k)
    elif cfg.algorithm == "grpo":
        adv = algos.grpo_advantages(seq_return, k, scale=cfg.advantages.scale_rewards)
    else:  # reinforce: moving-average baseline (of the global mean return), updated after use
        n_valid = coll.sum(valid.sum().to(seq_return.dtype))
        batch_mean = coll.sum(torch.nansum(seq_return)) / n_valid.clamp(min=1)  # NaN answers left out
        if state.get("baseline") is None:
            state["baseline"] = float(batch_mean) if n_valid > 0 else 0.0
        adv = algos.reinforce_advantages(seq_return, state["baseline"])
        mean_or_nan = torch.where(n_valid > 0, batch_mean, torch.full_like(batch_mean, math.nan)).reshape(1)
        state["baseline"] = float(
            algos.ema_update(state["baseline"], mean_or_nan, cfg.advantages.reinforce_decay)
        )
        stats["baseline"] = state["baseline"]
    ro.advantages = adv.unsqueeze(-1)  # (N, 1): one advantage for every token of an answer
    return stats


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


# --------------------------------------------------------------------------------------------
# evaluation


EVAL_KEY_SALT = 0x5EED_E7A1  # evaluation draws never coincide with training draws


@torch.no_grad()
def evaluate_policy(
    model: Any,
    ref_model: Any,
    tokenizer: Any,
    prompts: Prompts,
    rewards: RewardSet,
    metrics: RewardSet | None,
    gold: RewardSet | None,
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
    scored = rewards(batch_prompts, texts, columns, step=step)
    out: dict[str, float] = {}
    totals = [v for v in scored.total if v is not None]
    out["eval/reward"] = sum(totals) / len(totals) if totals else math.nan
    out.update(scored.means(prefix="eval/reward/"))
    for group, prefix in ((metrics, "eval/"), (gold, "gold/")):
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
        ref = reference_logprobs(ref_model, part)
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
        if gold is not None:
            g = gold(
                batch_prompts[j : j + 1], texts[j : j + 1], {k: v[j : j + 1] for k, v in columns.items()}
            )
            row["gold"] = next(iter(g.per_source.values()))[0]
        rows.append(row)
    return out, rows


# --------------------------------------------------------------------------------------------
# the loop


def _append_samples(run: Path, rows: list[dict[str, Any]]) -> None:
    with (run / "samples.jsonl").open("a", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (a resumed run writes them again), and any torn line."""
    truncate_jsonl(path, step)


def answer_figures(ro: Rollout, texts: list[str], scored: Any) -> dict[str, Any]:
    """Per-answer figures that step 7 averages, as plain lists (so they gather cheaply across processes):
    score (NaN where a source gave None), per-sequence KL to the reference (k1, k3), length, text."""
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


@guard_run
def train_rl(cfg: RLConfig, resume: bool = False, config_dir: str | Path | None = None) -> dict[str, Any]:
    """Run PPO / RLOO / GRPO / REINFORCE; returns the final summary (also written to ``summary.json``).

    ``config_dir`` is where relative ``file.py:function`` reward paths are looked up (the config's folder).
    """
    from heed.models.lm import disable_dropout
    from heed.models.loading import load_causal_lm, load_tokenizer, save_pretrained
    from heed.models.lora import apply_lora, enable_gradient_checkpointing, place, quantization_kwargs
    from heed.models.value import Critic, ValueHead, hidden_size

    # step 0. run folder, seed, resume point, mixed precision
    check_paths(cfg)
    if cfg.rollout.engine == "vllm":  # before any model is loaded
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
    accelerator = make_accelerator(cfg.model.mixed_precision)
    coll = Collective.of(accelerator)
    check_processes(cfg, coll.world)
    t_start = time.time()
    accelerator, run, ckpt = start_run(
        cfg, cfg.out, cfg.train.seed, cfg.model.mixed_precision, resume, accelerator
    )
    dev = accelerator.device
    algo = cfg.algorithm
    main = coll.main

    # step 0b. models: policy (from the checkpoint when resuming), frozen reference, critic
    policy_path = cfg.model.path or ""
    ref_path = cfg.ref_model or policy_path
    tokenizer = load_tokenizer(policy_path, padding_side="left")
    lora = cfg.model.lora
    model = load_causal_lm(
        policy_path if lora else (ckpt or policy_path), dtype=cfg.model.dtype, **quantization_kwargs(lora)
    )
    if lora is not None:  # a new adapter, or the checkpoint's when resuming
        model = apply_lora(model, lora, adapter=ckpt)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if lora is not None and cfg.ref_model is None:
        ref_model = model  # the base under the adapter (disabled for reference passes): no second copy
    else:
        ref_model = (
            load_causal_lm(ref_path, dtype=cfg.model.dtype).to("cpu" if cfg.offload_ref else dev).eval()
        )
        ref_model.requires_grad_(False)
    value_head: ValueHead | None = None
    critic: Critic | None = None
    if algo == "ppo":
        if cfg.ppo.critic == "shared":
            value_head = ValueHead(hidden_size(model))
            saved_head = Path(policy_path) / VALUE_HEAD_FILE
            if saved_head.is_file():  # a second round from an earlier PPO policy keeps its critic
                value_head.load_state_dict(torch.load(saved_head, map_location="cpu"))
        else:
            critic = Critic(load_causal_lm(cfg.ppo.critic_path or policy_path, dtype=cfg.model.dtype))

    # step 0c. reward sources, prompts, PPO-ptx text
    rewards = build_rewards(cfg.rewards, config_dir)
    metrics_set = build_rewards(cfg.eval.metrics, config_dir) if cfg.eval.metrics else None
    gold_set = build_rewards(cfg.eval.gold, config_dir) if cfg.eval.gold else None
    train_prompts = load_prompts(cfg.data.prompts, tokenizer, cfg)
    eval_prompts = load_prompts(cfg.data.eval_prompts, tokenizer, cfg) if cfg.data.eval_prompts else None
    ptx_texts: list[Any] = []
    if cfg.ptx.coef > 0 and cfg.ptx.data:
        from heed.data.collate import truncate
        from heed.data.templating import encode_text

        ptx_texts, _ = truncate(
            [encode_text(tokenizer, r.text) for r in load_records(cfg.ptx.data, "text")],
            cfg.ptx.max_length,
        )
    engine = make_engine(
        cfg.rollout.engine,
        cfg.rollout.batch_size,
        model_path=policy_path,
        seed=cfg.train.seed,
        vllm_options=_vllm_options(cfg),
    )

    # step 0d. optimizer over policy (+ value head / critic), schedule, restored state; on several
    # processes each one holds prompts_per_step / world prompts and minibatch_size / world answers of
    # every minibatch
    n = cfg.batch_size
    mb_size = cfg.update.minibatch_size or n
    steps_per_update = cfg.update.epochs * (n // mb_size)
    mb_size //= coll.world
    micro = min(cfg.update.micro_batch_size, mb_size)
    k = cfg.rollout.k
    model = place(model, dev)
    # dropout would make the rollout's and the update's log-probs differ (ratio ≠ 1 before any step);
    # a model still random in training mode is updated in eval mode
    train_mode = disable_dropout(model)
    share = (
        cfg.rollout.share_prompt
        and k > 1
        and mb_size % k == 0
        and can_share_prompt(model)
        and can_share_prompt(ref_model)
    )
    group = k if share else 0  # micro-batches of whole groups, each prompt run once for its k answers
    total_steps = cfg.train.updates * steps_per_update
    value_params = (
        list(value_head.parameters())
        if value_head is not None
        else (list(critic.parameters()) if critic is not None else [])
    )
    if value_head is not None:
        value_head.to(dev)
    if critic is not None:
        critic.to(dev)
        if not disable_dropout(critic.model):  # its values must not be random either
            critic.eval()
    value_group = (
        [{"params": value_params, "weight_decay": 0.0, "lr": cfg.ppo.critic_lr or cfg.optim.lr}]
        if value_params
        else []
    )
    # DDP around the policy (the update's forwards go through it); generation, the reference and
    # rollout passes, evaluation and saving use the plain model. The value head / critic stay outside
    # DDP: their gradients are averaged by hand (Collective.average_gradients)
    policy = model
    model, optimizer, scheduler, saved = prepare_optimization(
        accelerator, model, model.parameters(), cfg.optim, total_steps, ckpt, value_group
    )
    start_update = saved["step"]
    state: dict[str, Any] = {"baseline": None}
    totals = {"samples": 0, "train_seconds": 0.0, "generation_seconds": 0.0, "total_seconds": 0.0}
    kl_ctl: Any = (
        algos.AdaptiveKLController(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon)
        if cfg.kl.adaptive
        else algos.FixedKLController(cfg.kl.beta)
    )
    if ckpt is not None:
        extra = saved.get("extra", {})
        kl_ctl.value = extra.get("kl_beta", kl_ctl.value)
        state["baseline"] = extra.get("baseline")
        totals.update(extra.get("totals") or {})  # what the run had done before it was stopped
        if value_head is not None and extra.get("value_head") is not None:
            value_head.load_state_dict(extra["value_head"])
        if critic is not None and extra.get("critic") is not None:
            critic.load_state_dict(extra["critic"])
    coll.broadcast(value_params)  # every process starts from the main process's value head / critic
    # only the main process writes files and watches the monitors
    logger = MetricsLogger(run, tensorboard=cfg.log.tensorboard, enabled=main)
    if ckpt is not None and main:
        logger.truncate_after(start_update)
        _truncate_jsonl(run / "samples.jsonl", start_update)
        _truncate_jsonl(run / "alarms.jsonl", start_update)
        monitor = resume_monitor(read_metrics(run / "metrics.jsonl"), cfg.monitor)
    else:
        monitor = Monitor(cfg.monitor)
    if main:
        append_alarms(run, [])
    trainable = [p for p in model.parameters() if p.requires_grad] + value_params
    sampling = _sampling(cfg)

    def run_eval(step: int, policy_name: str) -> dict[str, float]:
        """Evaluation on the main process only (the held-out prompts are few); the others wait."""
        if eval_prompts is None:
            return {}
        ev: dict[str, float] = {}
        if main:
            ev, rows = evaluate_policy(
                policy, ref_model, tokenizer, eval_prompts, rewards, metrics_set, gold_set, cfg, engine, step
            )
            logger.log(step, ev, split="eval")
            _append_samples(run, [{**r, "policy": policy_name} for r in rows])
        accelerator.wait_for_everyone()
        return ev

    summary: dict[str, Any] = {"algo": algo}
    if cfg.eval.at_start and start_update == 0:
        start_eval = run_eval(0, cfg.eval.initial_policy_name)
        summary.update({f"start/{k}": v for k, v in start_eval.items()})
    elif start_update > 0 and main:  # resumed: the evaluation before training is in the log already
        for row in read_metrics(run / "metrics.jsonl"):
            if row.get("split") == "eval" and row.get("step") == 0:
                summary.update({f"start/{k}": v for k, v in row.items() if k.startswith(("eval/", "gold/"))})

    # the loop (counters continue those of a resumed run, so summary.json covers the whole run)
    samples_done, gen_seconds = totals["samples"], totals["generation_seconds"]
    t0, t_start = time.time() - totals["train_seconds"], t_start - totals["total_seconds"]
    none_watch = NoneRewardWatch(cfg.train.max_none_updates)
    last: dict[str, float] = {}
    with StepProgress(
        f"rl {algo}", cfg.train.updates, enabled=cfg.log.progress and main, start=start_update
    ) as bar:
        for update in range(start_update, cfg.train.updates):
            step = update + 1
            model.eval()
            # step 1. sample K completions per prompt (this process's consecutive share of whole prompts)
            idx = process_share(
                prompt_order(len(train_prompts.ids), update, cfg.rollout.prompts_per_step, cfg.train.seed),
                coll,
            )
            tg = time.time()
            # each answer's random draws depend on (seed, update, prompt, sample) only, not on batching
            # (nor on the process that draws them)
            keys = row_keys(
                cfg.train.seed,
                [(update << 32) + i * cfg.rollout.k + j for i in idx for j in range(cfg.rollout.k)],
            )
            gen = engine(
                policy, tokenizer, [train_prompts.ids[i] for i in idx], sampling, cfg.rollout.k, keys=keys
            )
            gen_seconds += time.time() - tg

            # step 2. score with the reward sources (None -> NaN: left out of baselines and the loss)
            scores, scored = score_batch(rewards, train_prompts, idx, gen.texts, cfg.rollout.k, step)
            ro = rollout_from_generation(gen, scores).to(dev)

            # step 3. log-probs of policy and reference (and values for PPO), once per rollout
            with accelerator.autocast():
                lp_stats = rollout_logprobs(
                    policy,
                    ref_model,
                    value_head,
                    critic,
                    ro,
                    cfg.rollout.temperature,
                    micro,
                    recompute=not cfg.rollout.reuse_logprobs or cfg.rollout.engine == "vllm",
                    group=group,
                )

            # steps 4-5. KL-penalised rewards and advantages
            beta = kl_ctl.value
            adv_stats = compute_advantages(cfg, ro, beta if cfg.kl_in_reward else 0.0, state, coll)

            # step 6. epochs of clipped-surrogate updates over minibatches
            model.train(train_mode)
            with accelerator.autocast():
                upd = _update(
                    cfg,
                    ro,
                    model,
                    value_head,
                    critic,
                    optimizer,
                    scheduler,
                    trainable,
                    micro,
                    mb_size,
                    beta if not cfg.kl_in_reward else 0.0,
                    ptx_texts,
                    tokenizer.pad_token_id,
                    step,
                    group,
                    accelerator,
                    coll,
                )

            # step 7. log, adapt β (on the global KL), watch, evaluate, checkpoint
            fig = merge_figures(coll.gather(answer_figures(ro, gen.texts, scored)))
            none_watch.update(fig["total"], fig["per_source"], step)  # global figures: every process stops
            samples_done += len(fig["score"])
            metrics = batch_statistics(fig, upd.pop("entropy", None))
            kl_ctl.update(metrics["kl/k1"], len(fig["score"]))
            metrics.update(upd)
            metrics.update(adv_stats)
            metrics.update(_mean_over_processes(lp_stats, coll))
            metrics["kl/beta"] = beta
            metrics["lr"] = scheduler.get_last_lr()[0]
            elapsed = time.time() - t0
            metrics["samples_per_s"] = samples_done / max(elapsed, 1e-9)
            last = metrics
            if step % cfg.log.log_every == 0 or step == cfg.train.updates:
                logger.log(step, metrics)
            if main:
                valid_rewards = [v for v in fig["total"] if v is not None]
                texts_scored = [t for t, v in zip(fig["text"], fig["total"], strict=True) if v is not None]
                alarms = monitor.update(step, metrics, texts_scored, valid_rewards)
                for alarm in alarms:
                    bar.log(f"alarm: {alarm}")
                append_alarms(run, alarms)
            if cfg.log.eval_every and step % cfg.log.eval_every == 0 and step != cfg.train.updates:
                run_eval(step, algo)
            if cfg.log.save_every and step % cfg.log.save_every == 0 and step != cfg.train.updates:
                state["totals"] = {
                    "samples": samples_done,
                    "train_seconds": time.time() - t0,
                    "generation_seconds": gen_seconds,
                    "total_seconds": time.time() - t_start,
                }
                if main:
                    _save(
                        run,
                        step,
                        policy,
                        tokenizer,
                        optimizer,
                        scheduler,
                        cfg,
                        kl_ctl,
                        state,
                        value_head,
                        critic,
                    )
                accelerator.wait_for_everyone()
            bar.advance(1, {"reward": metrics["reward/mean"], "kl": metrics["kl/k1"]})

    # final evaluation, model and summary
    elapsed = time.time() - t0
    final_eval = run_eval(cfg.train.updates, algo)
    if not main:
        return summary
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    save_pretrained(policy, tokenizer, run / "final")
    if value_head is not None:
        torch.save(value_head.state_dict(), run / "final" / VALUE_HEAD_FILE)
    summary.update(final_eval)
    summary.update({k: v for k, v in last.items() if isinstance(v, int | float)})
    summary.update(
        {
            "updates": cfg.train.updates,
            "processes": coll.world,
            "samples": samples_done,
            "samples_per_s": samples_done / max(elapsed, 1e-9),
            "generation_seconds": gen_seconds,
            "train_seconds": elapsed,
            "total_seconds": time.time() - t_start,
            "peak_memory_mb": peak_memory_mb(),
            "alarms": len(monitor.alarms),
        }
    )
    write_json(run / "summary.json", summary)
    logger.close()
    return summary


def _vllm_options(cfg: RLConfig) -> dict[str, Any]:
    """The vllm engine's settings from the config (ignored by the other engines)."""
    return {
        "gpu_memory_utilization": cfg.rollout.vllm_gpu_memory,
        "sleep": cfg.rollout.vllm_sleep,
        "dtype": cfg.model.dtype,
    }


def _save(
    run: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    cfg: RLConfig,
    kl_ctl: Any,
    state: dict[str, Any],
    value_head: Any,
    critic: Any,
) -> None:
    extra = {
        "kl_beta": kl_ctl.value,
        "baseline": state.get("baseline"),
        "totals": state.get("totals"),
        "value_head": value_head.state_dict() if value_head is not None else None,
        "critic": critic.state_dict() if critic is not None else None,
    }
    save_checkpoint(
        run, step, model, tokenizer, optimizer, scheduler, extra=extra, keep=cfg.log.keep_checkpoints
    )


def _update(
    cfg: RLConfig,
    ro: Rollout,
    model: Any,
    value_head: Any,
    critic: Any,
    optimizer: Any,
    scheduler: Any,
    trainable: list[torch.nn.Parameter],
    micro: int,
    mb_size: int,
    beta_loss: float,
    ptx_texts: list[Any],
    pad_id: int,
    step: int,
    group: int = 0,
    accelerator: Any = None,
    coll: Collective | None = None,
) -> dict[str, float]:
    """Step 6: ``ppo.epochs`` passes over the rollout in shuffled minibatches (of whole groups when
    ``group`` > 0: the shared-prompt forward); one optimizer step each.

    On several processes ``ro`` and ``mb_size`` are this process's share. Each micro-batch's loss is
    weighted by its share of the *global* minibatch's tokens (token_mean) or answers (sequence means),
    times the process count, so the gradient DDP averages is the one-process gradient of the same
    minibatch; gradients are synchronised on the minibatch's last backward only."""
    coll = coll or Collective()
    value_params = [q for module in (value_head, critic) if module is not None for q in module.parameters()]
    use_ptx = cfg.ptx.coef > 0 and bool(ptx_texts)
    p, critic_cfg = cfg.update, cfg.ppo
    mode = p.loss_aggregation
    n = len(ro)
    dev = ro.input_ids.device
    gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + step)
    sums: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        sums.setdefault(key, []).append(float(value))

    ptx_rng = random.Random(cfg.train.seed * 31 + step)
    g = group or 1  # minibatches of whole groups when the prompt is shared
    for _epoch in range(p.epochs):
        perm = torch.randperm(n // g, generator=gen).to(dev)
        perm = (perm.unsqueeze(-1) * g + torch.arange(g, device=dev)).flatten()
        for ms in range(0, n, mb_size):
            mb_idx = perm[ms : ms + mb_size]
            full_count = float(coll.sum(_count(ro.response_mask[mb_idx], mode)))  # of the global minibatch
            loss_total = 0.0
            chunks = micro_batches(ro, mb_idx, micro, group)
            no_sync = contextlib.ExitStack()  # DDP: accumulate locally until the minibatch's last backward
            if coll.world > 1:
                no_sync.enter_context(accelerator.no_sync(model))
            for ci, rows in enumerate(chunks):
                if ci == len(chunks) - 1 and not use_ptx:
                    no_sync.close()
                part = ro.select(rows).trimmed()
                mask = part.response_mask
                w = float(_count(mask, mode)) / max(full_count, 1.0)
                if w == 0 and coll.world == 1:  # (every process runs as many backwards as the others)
                    continue
                out = forward_part(
                    model,
                    part,
                    cfg.rollout.temperature,
                    group,
                    value_head=value_head,
                    with_entropy=True,
                    entropy_grad=p.entropy_coef > 0,
                )
                logprobs = part.response(out.logprobs)
                pg_tok, pstats = algos.policy_loss(
                    logprobs,
                    part.old_logprobs,
                    part.advantages,
                    mask,
                    p.clip_eps,
                    p.clip_eps_high,
                    dual_clip=p.dual_clip,
                )
                pg = algos.aggregate(pg_tok, mask, mode)
                loss = pg
                assert out.entropy is not None
                entropy = part.response(out.entropy)
                if p.entropy_coef > 0:
                    loss = loss - p.entropy_coef * algos.aggregate(entropy, mask, mode)
                if beta_loss > 0:
                    kl_tok = algos.kl_estimate(logprobs, part.ref_logprobs, cfg.kl_estimator)
                    loss = loss + beta_loss * algos.aggregate(kl_tok, mask, mode)
                if cfg.algorithm == "ppo":
                    values = part.response(
                        out.values
                        if out.values is not None
                        else critic(part.input_ids, part.attention_mask, part.target_mask)
                    )
                    vl_tok, vstats = algos.value_loss(
                        values, part.old_values, part.returns, mask, critic_cfg.value_clip
                    )
                    vl = algos.aggregate(vl_tok, mask, mode)
                    loss = loss + critic_cfg.vf_coef * vl
                    add("value_loss", vl.detach())
                    add("value_clipfrac", vstats.clipfrac)
                    add("explained_variance", algos.explained_variance(part.old_values, part.returns, mask))
                (loss * (w * coll.world)).backward()  # DDP divides the summed gradients by the process count
                loss_total += float(loss.detach()) * w
                add("policy_loss", pg.detach())
                add("clipfrac", pstats.clipfrac)
                add("approx_kl/k1", pstats.approx_kl_k1)
                add("approx_kl/k3", pstats.approx_kl_k3)
                add("ratio", pstats.ratio_mean)
                add("entropy", algos.masked_mean(entropy.detach(), mask))
            no_sync.close()
            loss_total = float(coll.sum(torch.tensor(loss_total, dtype=torch.float64)))
            if use_ptx:  # the same text batch on every process (same seed): its averaged gradient is its own
                batch = ptx_rng.sample(ptx_texts, min(cfg.ptx.batch_size, len(ptx_texts)))
                lm = ptx_loss(model, batch, pad_id, dev)
                (cfg.ptx.coef * lm).backward()
                loss_total += cfg.ptx.coef * float(lm.detach())
                add("ptx_loss", lm.detach())
            check_finite(loss_total, step, f"{cfg.algorithm} loss")
            coll.average_gradients(value_params)  # outside DDP
            grad_norm = None
            if cfg.optim.max_grad_norm is not None:  # of the averaged (global) gradient
                grad_norm = (
                    accelerator.clip_grad_norm_(trainable, cfg.optim.max_grad_norm)
                    if accelerator is not None
                    else torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.max_grad_norm)
                )
                check_finite(float(grad_norm), step, "gradient norm")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            add("loss", loss_total)
            if grad_norm is not None:
                add("grad_norm", grad_norm)
    # means over every micro-batch of every process (explained variance is NaN on constant returns: left out)
    keys = sorted(sums)
    finite = [[v for v in sums[key] if not math.isnan(v)] for key in keys]
    totals = coll.sum(torch.tensor([[sum(f), len(f)] for f in finite], dtype=torch.float64).reshape(-1, 2))
    return {key: float(t / c) for key, (t, c) in zip(keys, totals.tolist(), strict=True) if c > 0}


def evaluate_model(
    cfg: RLConfig, model_dir: str | Path, out: str | Path | None = None, config_dir: str | Path | None = None
) -> dict[str, Any]:
    """``heed eval``: the evaluation of :func:`train_rl` for any model folder, against the config's
    reference (``ref_model``, else ``model.path``). Writes ``eval.json`` and ``samples.jsonl`` to ``out``."""
    from heed.models.loading import load_causal_lm, load_tokenizer

    if not cfg.data.eval_prompts:
        raise ConfigError("data.eval_prompts: heed eval needs held-out prompts (e.g. builtin:prompts_eval)")
    set_seed(cfg.train.seed)
    check_paths(cfg)
    ref_path = cfg.ref_model or cfg.model.path or ""
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    model = load_causal_lm(model_dir, dtype=cfg.model.dtype).eval()
    ref_model = load_causal_lm(ref_path, dtype=cfg.model.dtype).eval()
    rewards = build_rewards(cfg.rewards, config_dir)
    metrics_set = build_rewards(cfg.eval.metrics, config_dir) if cfg.eval.metrics else None
    gold_set = build_rewards(cfg.eval.gold, config_dir) if cfg.eval.gold else None
    prompts = load_prompts(cfg.data.eval_prompts, tokenizer, cfg)
    engine = make_engine(
        cfg.rollout.engine,
        cfg.rollout.batch_size,
        model_path=str(model_dir),
        seed=cfg.train.seed,
        vllm_options=_vllm_options(cfg),
    )
    result, rows = evaluate_policy(
        model, ref_model, tokenizer, prompts, rewards, metrics_set, gold_set, cfg, engine, 0
    )
    result = {"model": str(model_dir), "reference": str(ref_path), **result}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval.json", result)
        from heed.data.io import write_jsonl

        write_jsonl(out / "samples.jsonl", [{**r, "policy": Path(model_dir).name} for r in rows])
    return result

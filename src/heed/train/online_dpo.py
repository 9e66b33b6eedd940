"""Online and iterative DPO: the policy answers, a judge labels its answers, DPO learns from the labels.

Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback",
https://arxiv.org/abs/2402.04792), ``iterative.rounds: 0``: every update (1) samples two answers to
each of ``train.prompts_per_step`` fresh prompts from the current policy (draws keyed per answer, so
batching never changes them), (2) scores them with the judge (the reward sources of ``heed rl``:
reward models, rule functions, classifiers, weighted), (3) keeps the higher-scored answer as chosen
(ties and unscored pairs skipped and counted), (4) takes one DPO / IPO / hinge / SimPO step on those
pairs against the initial policy (the base with the adapter disabled under LoRA).

Iterative DPO, ``iterative.rounds: N``: each round samples and labels two answers for every prompt
(or ``iterative.prompts_per_round`` of them) with the last round's policy, then runs offline DPO over
those pairs (``iterative.epochs``) anchored to that same policy, whose reference log-probs are
computed once before the round. Round ``r``'s policy is saved in ``round-r/`` with its labelled pairs
(``round-r/pairs.jsonl``: preference pairs that ``heed dpo`` reads as they are).

The answers are trained on as sampled (their token ids), not re-tokenized from text.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from heed.config.online import OnlineDPOConfig
from heed.data.collate import Encoded, length_grouped_batches
from heed.data.pairs import EncodedPairs, PreferencePair
from heed.data.records import PromptExample, load_records
from heed.errors import ConfigError
from heed.models.forward import collate_pairs, pair_logps
from heed.report.metrics import MetricsLogger
from heed.report.progress import StepProgress
from heed.rewards.combine import NoneRewardWatch, RewardError, RewardSet, build_rewards
from heed.rewards.select import LabelledPairs, SelectCounts, label_pairs
from heed.rollout.engine import Engine, PolicySampler, make_engine
from heed.rollout.generate import Generation, SamplingParams, encode_prompts
from heed.train.common import guard_run, peak_memory_mb, prepare_optimization, start_run, write_json
from heed.train.loop import Cadence, accumulate, checkpoint, micro_batches, optimizer_step, save_final
from heed.train.reference import (
    SampleSpec,
    preference_losses,
    ref_logps_for,
    reference_table,
    sample_and_kl,
    score_samples,
    write_samples,
)

ROUND_FILE = "round.json"


# ---------------------------------------------------------------------------------------------
# prompts, sampling, labelling
# ---------------------------------------------------------------------------------------------
@dataclass
class PromptSet:
    examples: list[PromptExample]
    ids: list[list[int]]

    def prompts(self, idx: Sequence[int], k: int) -> list[Any]:
        return [self.examples[i].prompt for i in idx for _ in range(k)]

    def columns(self, idx: Sequence[int], k: int) -> dict[str, list[Any]]:
        """Extra record columns for the judge, repeated for the ``k`` answers of each prompt."""
        keys = sorted({key for i in idx for key in self.examples[i].extra})
        return {key: [self.examples[i].extra.get(key) for i in idx for _ in range(k)] for key in keys}


def load_prompt_set(path: str, tokenizer: Any, chat: bool, max_prompt_length: int) -> PromptSet:
    examples = load_records(path, "prompts")
    ids = encode_prompts(
        tokenizer, [e.prompt for e in examples], chat, max_prompt_length, wheres=[e.where for e in examples]
    )
    return PromptSet(examples, ids)


def step_prompts(n_prompts: int, step: int, per_step: int, seed: int) -> list[int]:
    """Prompt indices of update ``step``: consecutive slices of per-epoch shuffles (a pure function of
    (seed, step), so a resumed run sees the prompts the uninterrupted run would have seen)."""
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(pos, n_prompts)
        order = list(range(n_prompts))
        random.Random(seed * 100003 + epoch).shuffle(order)
        out.append(order[i])
    return out


def sampled_sequence(gen: Generation, row: int) -> Encoded:
    """Prompt + answer token ids of one sampled row, the answer (with its EOS) marked for the loss."""
    p = gen.prompt_ids[row][gen.prompt_mask[row]].tolist()
    c = gen.completion_ids[row][gen.completion_mask[row]].tolist()
    return p + c, [False] * len(p) + [True] * len(c)


@dataclass
class Judged:
    """A labelled batch: the pairs' token ids (chosen / rejected as sampled) and what the judge said."""

    data: EncodedPairs
    labels: LabelledPairs
    total: list[float | None]  # the judge's score of every sampled answer
    per_source: dict[str, list[float | None]]


def sample_and_label(
    sampler: PolicySampler,
    prompts: PromptSet,
    idx: list[int],
    judge: RewardSet,
    stream: int,
    step: int,
    k: int = 2,
) -> Judged:
    """``k`` answers per prompt of ``idx`` from the sampler's policy, scored by ``judge``; the best-scored
    one is chosen, the worst-scored one rejected. ``stream`` (the update or round) and the prompt index
    key each answer's draws (so answers 0 and 1 are the same whatever ``k``)."""
    gen = sampler.answers(prompts.ids, idx, k, stream)
    scored = judge(prompts.prompts(idx, k), gen.texts, prompts.columns(idx, k), step=step)
    labels = label_pairs(scored.total, k)
    pairs, chosen, rejected = [], [], []
    keep = LabelledPairs(counts=labels.counts)
    for j in range(len(labels)):
        c, r = labels.chosen[j], labels.rejected[j]
        seq_c, seq_r = sampled_sequence(gen, c), sampled_sequence(gen, r)
        if seq_c[0] == seq_r[0]:  # the same answer twice, scored differently by a noisy judge
            labels.counts.ties += 1
            labels.counts.selected -= 1
            continue
        example = prompts.examples[idx[labels.prompts[j]]]
        pairs.append(PreferencePair(example.prompt, gen.texts[c], gen.texts[r], 1.0, example.where))
        chosen.append(seq_c)
        rejected.append(seq_r)
        keep.prompts.append(labels.prompts[j])
        keep.chosen.append(c)
        keep.rejected.append(r)
        keep.chosen_scores.append(labels.chosen_scores[j])
        keep.rejected_scores.append(labels.rejected_scores[j])
    data = EncodedPairs(pairs, chosen, rejected, [1.0] * len(pairs))
    return Judged(data, keep, scored.total, scored.per_source)


def judge_figures(judged: Judged, prefix: str = "online") -> dict[str, float]:
    """Judge reward of the chosen and rejected answers, and what labelling skipped."""
    lab, counts = judged.labels, judged.labels.counts
    out: dict[str, float] = {f"{prefix}/{k}": float(v) for k, v in counts.__dict__.items()}
    ok = [v for v in judged.total if v is not None]
    out[f"{prefix}/reward"] = sum(ok) / len(ok) if ok else math.nan
    if len(lab):
        out[f"{prefix}/reward_chosen"] = sum(lab.chosen_scores) / len(lab)
        out[f"{prefix}/reward_rejected"] = sum(lab.rejected_scores) / len(lab)
    return out


def no_pairs_error(streak: list[int], counts: SelectCounts) -> RewardError:
    return RewardError(
        f"steps {streak[0]}-{streak[-1]}: no pair to train on in {len(streak)} updates in a row (last one: "
        f"{counts.ties} tied pairs, {counts.unscored} unscored); the judge must tell the two answers apart: "
        "raise rollout.temperature or use a finer judge (train.max_none_updates sets how many such updates stop the run)"
    )


# ---------------------------------------------------------------------------------------------
# the DPO step on labelled pairs
# ---------------------------------------------------------------------------------------------
def pair_losses(
    model: Any,
    data: EncodedPairs,
    idx: Sequence[int],
    ref_table: torch.Tensor,
    cfg: OnlineDPOConfig,
    pad_id: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair loss (B,) of pairs ``idx`` and detached statistics, with ``kl`` (2B,): per answer
    Σ_t (log π − log π_ref), the k1 estimate of KL(π ‖ π_ref) on the policy's own answers."""
    device = next(model.parameters()).device
    ids, att, mask = (
        t.to(device)
        for t in collate_pairs([data.chosen[i] for i in idx], [data.rejected[i] for i in idx], pad_id)
    )
    policy = pair_logps(model, ids, att, mask, cfg.train.share_prompt)
    ref_sum, ref_avg = (t.to(device) for t in ref_logps_for(idx, ref_table))
    losses, stats = preference_losses(cfg.loss, policy, ref_sum, ref_avg)
    stats["kl"] = policy.logps.detach() - ref_sum
    return losses, stats


@dataclass
class Setup:
    """What both modes train with (made once by :func:`_setup`)."""

    cfg: OnlineDPOConfig
    accelerator: Any
    run: Path
    ckpt: Path | None
    model: Any
    ref_model: Any
    tokenizer: Any
    chat: bool
    train_mode: bool
    judge: RewardSet
    gold: RewardSet | None
    prompts: PromptSet
    eval_prompts: PromptSet | None
    engine: Engine
    sampling: SamplingParams
    logger: MetricsLogger

    def sampler(self) -> PolicySampler:
        """The current policy with the run's engine, sampling settings and seed."""
        return PolicySampler(self.model, self.tokenizer, self.engine, self.sampling, self.cfg.train.seed)


def _step(
    s: Setup,
    optimizer: Any,
    scheduler: Any,
    data: EncodedPairs,
    batch: list[int],
    table: torch.Tensor,
    done: int,
) -> dict[str, float]:
    """One optimizer step on pairs ``batch`` of ``data``: every pair counts equally."""
    micro = s.cfg.train.micro_batch_size or len(batch)
    sums: dict[str, torch.Tensor] = {}

    def loss_of(idx: Sequence[int]) -> torch.Tensor:
        losses, stats = pair_losses(s.model, data, idx, table, s.cfg, s.tokenizer.pad_token_id)
        for k, v in stats.items():
            sums[k] = sums.get(k, torch.zeros(())) + v.sum().cpu() / len(batch) / (2 if k == "kl" else 1)
        return losses.sum() / len(batch)

    s.model.train(s.train_mode)
    loss = accumulate(s.accelerator, s.model, micro_batches(batch, micro), loss_of).item()
    figures = optimizer_step(
        s.accelerator,
        s.model.parameters(),
        optimizer,
        scheduler,
        s.cfg.optim.max_grad_norm,
        loss,
        done,
        "DPO loss",
    )
    kl = sums.pop("kl").item()
    return {"loss": loss, **{f"dpo/{k}": v.item() for k, v in sums.items()}, "kl/k1": kl, **figures}


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------
@guard_run
def train_online_dpo(
    cfg: OnlineDPOConfig, resume: bool = False, config_dir: str | Path | None = None
) -> dict[str, Any]:
    """Run online DPO (``iterative.rounds: 0``) or iterative DPO; returns the summary (``summary.json``).

    ``config_dir``: where relative ``file.py:function`` judge paths are looked up (the config's folder)."""
    s = _setup(cfg, resume, config_dir)
    t0 = time.time()
    summary = _iterative(s) if cfg.iterative.rounds else _online(s)
    summary["train_seconds"] = time.time() - t0
    return _finish(s, summary)


def _setup(cfg: OnlineDPOConfig, resume: bool, config_dir: str | Path | None) -> Setup:
    from heed.data.templating import use_chat
    from heed.models.lm import disable_dropout
    from heed.models.loading import load_causal_lm, load_tokenizer
    from heed.models.lora import apply_lora, enable_gradient_checkpointing, place, quantization_kwargs

    # step 1. run folder, seed, resume point (online: the last checkpoint; iterative: the last round)
    accelerator, run, ckpt = start_run(cfg, cfg.out, cfg.train.seed, cfg.model.mixed_precision, resume)
    if accelerator.num_processes > 1:
        raise ConfigError(
            "heed online-dpo runs in one process; start it without torchrun / accelerate launch"
        )
    if cfg.iterative.rounds and resume:
        raise ConfigError(
            "--resume: iterative DPO continues from a finished round instead: set model.path to RUN/round-N "
            "and iterative.rounds to the rounds left"
        )

    # step 2. the judge and the gold metrics (built before any model loads: a bad judge fails fast)
    judge = build_rewards(cfg.rewards, config_dir)
    gold = build_rewards(cfg.eval.gold, config_dir) if cfg.eval.gold else None

    # step 3. policy (a checkpoint's / the last round's weights when resuming) and the reference:
    # the initial policy (the base under a LoRA adapter: no second copy)
    path, lora = cfg.model.path, cfg.model.lora
    assert path is not None
    tokenizer = load_tokenizer(cfg.model.tokenizer or path, padding_side="left")
    model = load_causal_lm(
        path if lora else (ckpt or path), dtype=cfg.model.dtype, **quantization_kwargs(lora)
    )
    if lora is not None:
        model = apply_lora(model, lora, adapter=ckpt)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = place(model, accelerator.device)
    train_mode = disable_dropout(model)  # log π = log π_ref before the first step (loss = log 2)
    if lora is not None:
        ref_model = model
    else:
        ref_model = load_causal_lm(path, dtype=cfg.model.dtype).to(accelerator.device).eval()
        ref_model.requires_grad_(False)
        disable_dropout(ref_model)

    # step 4. prompts, engine, log
    chat = use_chat(tokenizer, cfg.data.chat)
    prompts = load_prompt_set(cfg.data.prompts, tokenizer, chat, cfg.data.max_prompt_length)
    eval_prompts = (
        load_prompt_set(cfg.data.eval_prompts, tokenizer, chat, cfg.data.max_prompt_length)
        if cfg.data.eval_prompts and cfg.eval.num_prompts
        else None
    )
    r = cfg.rollout
    sampling = SamplingParams(
        max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k
    )
    engine = make_engine(r.engine, r.batch_size, seed=cfg.train.seed)
    logger = MetricsLogger(run, tensorboard=cfg.log.tensorboard, enabled=accelerator.is_main_process)
    return Setup(
        cfg,
        accelerator,
        run,
        ckpt,
        model,
        ref_model,
        tokenizer,
        chat,
        train_mode,
        judge,
        gold,
        prompts,
        eval_prompts,
        engine,
        sampling,
        logger,
    )


def _online(s: Setup) -> dict[str, Any]:
    """Online DPO: every update samples, labels and learns from fresh pairs."""
    cfg = s.cfg
    total = cfg.train.updates
    s.model, optimizer, scheduler, state = prepare_optimization(
        s.accelerator, s.model, s.model.parameters(), cfg.optim, total, s.ckpt
    )
    start = state["step"]
    if s.ckpt is not None:
        s.logger.truncate_after(start)
    cadence = Cadence.of(cfg.log, total)
    none_watch = NoneRewardWatch(cfg.train.max_none_updates)
    empty: list[int] = []
    counts = SelectCounts()
    last: dict[str, float] = {}
    with StepProgress("online-dpo", total, enabled=cfg.log.progress, start=start) as bar:
        for step in range(start, total):
            done = step + 1
            # step 1. rollout.num_samples answers per prompt from the current policy; step 2. the judge
            # labels them (best vs worst)
            idx = step_prompts(len(s.prompts.ids), step, cfg.train.prompts_per_step, cfg.train.seed)
            judged = sample_and_label(
                s.sampler(), s.prompts, idx, s.judge, step, done, cfg.rollout.num_samples
            )
            counts.add(judged.labels.counts)
            none_watch.update(judged.total, judged.per_source, done)  # a judge silent on every answer
            figures = judge_figures(judged)
            if not len(judged.data):  # every pair tied or unscored: nothing to learn from this step
                empty.append(done)
                if cfg.train.max_none_updates and len(empty) >= cfg.train.max_none_updates:
                    raise no_pairs_error(empty, judged.labels.counts)
            else:
                empty = []
                # step 3. reference log-probs of the pairs; step 4. one DPO step on them
                table = reference_table(
                    s.ref_model,
                    judged.data,
                    s.tokenizer.pad_token_id,
                    len(judged.data),
                    share=cfg.train.share_prompt,
                )
                figures |= _step(
                    s, optimizer, scheduler, judged.data, list(range(len(judged.data))), table, done
                )
            last = figures
            if cadence.log(done):
                s.logger.log(done, figures)
            if cadence.eval(done):
                s.logger.log(done, evaluate(s, done), split="eval")
            if cadence.save(done):
                checkpoint(
                    s.accelerator,
                    s.run,
                    done,
                    s.model,
                    s.tokenizer,
                    optimizer,
                    scheduler,
                    cfg.log.keep_checkpoints,
                )
            bar.advance(1, {"loss": figures.get("loss", math.nan), "pairs": figures["online/selected"]})
    return {"algo": "online_dpo", "updates": total, **last, **counts.as_dict("data")}


def _iterative(s: Setup) -> dict[str, Any]:
    """Iterative DPO: per round, label pairs of the round's policy for the whole prompt set, then offline
    DPO anchored to that policy; ``round-N/`` holds its policy, pairs and figures."""
    from heed.data.io import write_jsonl

    cfg, it = s.cfg, s.cfg.iterative
    n_round = it.prompts_per_round or len(s.prompts.ids)
    step = 0
    counts = SelectCounts()
    summary: dict[str, Any] = {"algo": "iterative_dpo", "rounds": it.rounds}
    none_watch = NoneRewardWatch(cfg.train.max_none_updates)
    for rnd in range(1, it.rounds + 1):
        # step 1. rollout.num_samples answers per prompt from the round's policy; step 2. the judge
        # labels them (best vs worst)
        idx = step_prompts(len(s.prompts.ids), rnd - 1, n_round, cfg.train.seed)
        judged = sample_and_label(
            s.sampler(), s.prompts, idx, s.judge, 1 << 20 | rnd, step, cfg.rollout.num_samples
        )
        none_watch.update(judged.total, judged.per_source, rnd)
        counts.add(judged.labels.counts)
        figures = {"round": float(rnd), **judge_figures(judged, "round")}
        if not len(judged.data):
            raise no_pairs_error([rnd], judged.labels.counts)
        # step 3. reference log-probs of the round's pairs under the policy that starts the round
        table = reference_table(
            s.model,
            judged.data,
            s.tokenizer.pad_token_id,
            cfg.eval.batch_size,
            share=cfg.train.share_prompt,
            with_adapter=True,
        )
        # step 4. offline DPO over the round's pairs (a fresh optimizer and schedule per round)
        data = judged.data
        lengths = data.lengths()
        per_epoch = len(length_grouped_batches(lengths, it.batch_size, 0))
        steps = max(1, math.ceil(it.epochs * per_epoch))
        s.model, optimizer, scheduler, _ = prepare_optimization(
            s.accelerator, s.model, s.model.parameters(), cfg.optim, steps, None
        )
        batches: list[list[int]] = []
        epoch = 0
        while len(batches) < steps:
            batches += length_grouped_batches(
                lengths, it.batch_size, cfg.train.seed * 1000 + rnd * 100 + epoch
            )
            epoch += 1
        with StepProgress(f"round {rnd}", steps, enabled=cfg.log.progress) as bar:
            for batch in batches[:steps]:
                step += 1
                last = _step(s, optimizer, scheduler, data, batch, table, step)
                if step % cfg.log.log_every == 0 or batch is batches[steps - 1]:
                    s.logger.log(step, {**figures, **last})
                bar.advance(1, {"loss": last["loss"]})
        # step 5. the round's policy, its pairs and figures
        out = s.run / f"round-{rnd}"
        save_final(s.accelerator.unwrap_model(s.model), s.tokenizer, out)
        write_jsonl(
            out / "pairs.jsonl",
            [
                {
                    "prompt": p.prompt,
                    "chosen": p.chosen,
                    "rejected": p.rejected,
                    "chosen_score": cs,
                    "rejected_score": rs,
                }
                for p, cs, rs in zip(
                    data.pairs, judged.labels.chosen_scores, judged.labels.rejected_scores, strict=True
                )
            ],
        )
        write_json(out / ROUND_FILE, {"round": rnd, "step": step, **figures, **last})
        summary.update({f"round-{rnd}/{k}": v for k, v in last.items()} | figures | last)
    summary["steps"] = step
    return summary | counts.as_dict("data")


@torch.no_grad()
def evaluate(s: Setup, step: int, write: bool = False) -> dict[str, float]:
    """The initial and the current policy answer the held-out prompts with the same draws: judge
    reward, gold metrics (``start/...`` for the initial policy) and KL(policy ‖ initial) (k1, k3)."""
    if s.eval_prompts is None:
        return {}
    cfg = s.cfg
    n = min(cfg.eval.num_prompts, len(s.eval_prompts.examples))
    prompts = [e.prompt for e in s.eval_prompts.examples[:n]]
    policy = s.accelerator.unwrap_model(s.model)
    spec = SampleSpec(
        1,
        cfg.eval.temperature,
        cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
        cfg.train.seed,
        cfg.eval.batch_size,
    )
    result = sample_and_kl(policy, s.ref_model, s.tokenizer, prompts, s.chat, spec, "initial", "online_dpo")
    if write:
        write_samples(s.run / "samples.jsonl", result, 1, step)
    return {**result.metrics, **score_samples(result, s.judge, s.gold, ref_name="initial")}


def _finish(s: Setup, summary: dict[str, Any]) -> dict[str, Any]:
    """Final evaluation, ``final/`` and ``summary.json``."""
    step = int(summary.get("updates", summary.get("steps", 0)))
    ev = evaluate(s, step, write=True)
    if ev:
        s.logger.log(step, ev, split="eval")
    summary.update(ev)
    save_final(s.accelerator.unwrap_model(s.model), s.tokenizer, s.run / "final")
    summary["peak_memory_mb"] = peak_memory_mb()
    write_json(s.run / "summary.json", summary)
    s.logger.close()
    return summary

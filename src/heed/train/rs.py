"""Rejection sampling (the Llama 2 recipe: Touvron et al. 2023, https://arxiv.org/abs/2307.09288 §3.2.3).

``heed rs`` / :func:`train_rs`, per round: (1) sample N answers per prompt from the current policy
(draws keyed per answer, so batching never changes them), (2) score them with the judge (the reward
sources of ``heed rl``), (3) keep each prompt's best answer (argmax of the judge's score; unscored
answers never win, a prompt with none scored is skipped and counted) as an SFT record
``{"prompt", "completion", "reward", "round"}`` in ``RUN/rs_data.jsonl``, (4) fine-tune the policy on
the round's records with the SFT loss on the answer tokens (the records are encoded as ``heed sft``
encodes ``{"prompt", "completion"}`` records, so ``heed sft --set data.train=RUN/rs_data.jsonl``
trains on the same sequences). Round ``r``'s policy is saved in ``round-r/``; the next round samples
from it.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from heed.algos.ops import masked_sum
from heed.config.rs import RSConfig
from heed.data.collate import Encoded, length_grouped_batches, pad_batch, truncate
from heed.data.records import PromptExample, SFTExample, load_records
from heed.data.templating import encode_sft
from heed.errors import ConfigError
from heed.models.lm import lm_token_losses
from heed.report.metrics import MetricsLogger
from heed.report.progress import StepProgress
from heed.rewards.combine import RewardError, RewardSet, build_rewards
from heed.rewards.select import SelectCounts, best_of_n
from heed.rollout.engine import PolicySampler, make_engine
from heed.rollout.generate import SamplingParams, encode_prompts
from heed.train.common import guard_run, peak_memory_mb, prepare_optimization, start_run, write_json
from heed.train.loop import accumulate, micro_batches, optimizer_step, save_final
from heed.train.reference import SampleSpec, sample_and_kl, score_samples, write_samples

RS_DATA = "rs_data.jsonl"


def round_prompts(n_prompts: int, per_round: int, rnd: int) -> list[int]:
    """Prompt indices of round ``rnd`` (1-based): consecutive slices of the prompt file, wrapping around."""
    return [((rnd - 1) * per_round + j) % n_prompts for j in range(per_round)]


@torch.no_grad()
def best_of_n_records(
    sampler: PolicySampler,
    examples: list[PromptExample],
    ids: list[list[int]],
    idx: list[int],
    n: int,
    judge: RewardSet,
    rnd: int,
    min_reward: float | None,
) -> tuple[list[dict[str, Any]], SelectCounts, list[float | None]]:
    """Steps 1-3 of a round: N answers per prompt of ``idx`` from the sampler's policy, scored, the best
    kept as an SFT record. Returns the records, what was skipped, and every answer's score (prompt-major)."""
    gen = sampler.answers(ids, idx, n, rnd)
    columns = {
        key: [examples[i].extra.get(key) for i in idx for _ in range(n)]
        for key in sorted({key for i in idx for key in examples[i].extra})
    }
    scored = judge([examples[i].prompt for i in idx for _ in range(n)], gen.texts, columns, step=rnd)
    best, counts = best_of_n(scored.total, n)
    records = []
    for j, row in enumerate(best):
        if row is None:
            continue
        score = scored.total[row]
        assert score is not None
        if min_reward is not None and score < min_reward:
            counts.selected -= 1
            continue
        ex = examples[idx[j]]
        records.append(
            {
                "prompt": ex.prompt,
                "completion": gen.texts[row],
                "reward": score,
                "round": rnd,
                "mean_reward": _mean(scored.total[j * n : (j + 1) * n]),
                **ex.extra,
            }
        )
    return records, counts, scored.total


def _mean(values: Sequence[float | None]) -> float:
    ok = [v for v in values if v is not None]
    return sum(ok) / len(ok) if ok else math.nan


def encode_records(
    tokenizer: Any, records: list[dict[str, Any]], chat: bool, max_length: int
) -> list[Encoded]:
    """SFT sequences of best-of-N records, exactly as ``heed sft`` encodes ``{"prompt", "completion"}``."""
    seqs = [
        encode_sft(
            tokenizer,
            SFTExample(prompt=r["prompt"], completion=r["completion"], where=f"{RS_DATA}:{i + 1}"),
            chat,
        )
        for i, r in enumerate(records)
    ]
    return truncate(seqs, max_length)[0]


def answer_nll(
    model: Any, seqs: list[Encoded], chunk: Sequence[int], pad_id: int, tokens: int
) -> torch.Tensor:
    """This micro-batch's share of the step's SFT loss: its answer tokens' summed NLL over the step's
    ``tokens`` answer tokens, so every answer token of the step counts equally."""
    device = next(model.parameters()).device
    ids, att, mask = (x.to(device) for x in pad_batch([seqs[i] for i in chunk], pad_id))
    mask[:, 0] = False  # the first token is never predicted
    return masked_sum(lm_token_losses(model, ids, att, mask), mask) / tokens


@torch.no_grad()
def sft_loss(model: Any, seqs: list[Encoded], pad_id: int, batch_size: int = 64) -> float:
    """Token-mean NLL of ``seqs``' answer tokens (the SFT loss, without gradients)."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(seqs), batch_size):
        ids, att, mask = (t.to(device) for t in pad_batch(seqs[start : start + batch_size], pad_id))
        mask[:, 0] = False
        total += lm_token_losses(model, ids, att, mask).masked_select(mask).sum().item()
        count += int(mask.sum())
    model.train(was_training)
    return total / max(count, 1)


@guard_run
def train_rs(cfg: RSConfig, resume: bool = False, config_dir: str | Path | None = None) -> dict[str, Any]:
    """Run rejection sampling; returns the summary (also written to ``summary.json``).

    ``config_dir``: where relative ``file.py:function`` judge paths are looked up (the config's folder)."""
    from heed.data.io import write_jsonl
    from heed.data.templating import use_chat
    from heed.models.lm import disable_dropout
    from heed.models.loading import load_causal_lm, load_tokenizer
    from heed.models.lora import apply_lora, enable_gradient_checkpointing, place, quantization_kwargs

    if resume:
        raise ConfigError(
            "--resume: rejection sampling continues from a finished round instead: set model.path to "
            "RUN/round-N and train.rounds to the rounds left"
        )
    # step 0. run folder, judge (a bad judge fails before any model loads), policy, reference, prompts
    accelerator, run, _ = start_run(cfg, cfg.out, cfg.train.seed, cfg.model.mixed_precision, resume)
    if accelerator.num_processes > 1:
        raise ConfigError("heed rs runs in one process; start it without torchrun / accelerate launch")
    judge = build_rewards(cfg.rewards, config_dir)
    gold = build_rewards(cfg.eval.gold, config_dir) if cfg.eval.gold else None
    path, lora = cfg.model.path, cfg.model.lora
    assert path is not None
    tokenizer = load_tokenizer(cfg.model.tokenizer or path, padding_side="left")
    model = load_causal_lm(path, dtype=cfg.model.dtype, **quantization_kwargs(lora))
    if lora is not None:
        model = apply_lora(model, lora)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = place(model, accelerator.device)
    train_mode = disable_dropout(model)
    chat = use_chat(tokenizer, cfg.data.chat)
    examples = load_records(cfg.data.prompts, "prompts")
    ids = encode_prompts(
        tokenizer,
        [e.prompt for e in examples],
        chat,
        cfg.data.max_prompt_length,
        wheres=[e.where for e in examples],
    )
    r, t = cfg.rollout, cfg.train
    sampling = SamplingParams(
        max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k
    )
    engine = make_engine(r.engine, r.batch_size, seed=t.seed)
    logger = MetricsLogger(run, tensorboard=cfg.log.tensorboard, enabled=accelerator.is_main_process)
    pad_id = tokenizer.pad_token_id
    per_round = t.prompts_per_round or len(examples)

    all_records: list[dict[str, Any]] = []
    counts = SelectCounts()
    summary: dict[str, Any] = {"algo": "rs", "rounds": t.rounds, "num_samples": r.num_samples}
    step, t0 = 0, time.time()
    for rnd in range(1, t.rounds + 1):
        # steps 1-3. N answers per prompt from the current policy, scored; the best one is an SFT record
        idx = round_prompts(len(examples), per_round, rnd)
        sampler = PolicySampler(accelerator.unwrap_model(model), tokenizer, engine, sampling, t.seed)
        records, got, scores = best_of_n_records(
            sampler, examples, ids, idx, r.num_samples, judge, rnd, t.min_reward
        )
        counts.add(got)
        if not records:
            raise RewardError(
                f"round {rnd}: no prompt has a best answer to train on ({got.unscored} of {got.prompts} prompts "
                f"had no answer the judge scored"
                + (
                    f", the rest scored under train.min_reward={t.min_reward}"
                    if t.min_reward is not None
                    else ""
                )
                + "); make the judge score these answers"
            )
        all_records += records
        write_jsonl(run / RS_DATA, all_records)
        figures = {
            "round": float(rnd),
            "rs/reward": _mean(scores),
            "rs/best_reward": sum(rec["reward"] for rec in records) / len(records),
            **{f"rs/{k}": float(v) for k, v in got.__dict__.items()},
        }

        # step 4. SFT on the round's best answers (a fresh optimizer and schedule per round)
        seqs = [s for s in encode_records(tokenizer, records, chat, t.max_length) if any(s[1][1:])]
        lengths = [len(s[0]) for s in seqs]
        per_epoch = len(length_grouped_batches(lengths, t.batch_size, 0))
        steps = max(1, math.ceil(t.epochs * per_epoch))
        model, optimizer, scheduler, _ = prepare_optimization(
            accelerator, model, model.parameters(), cfg.optim, steps, None
        )
        batches: list[list[int]] = []
        while len(batches) < steps:
            batches += length_grouped_batches(lengths, t.batch_size, t.seed * 1000 + rnd * 100 + len(batches))
        figures["rs/sft_loss_before"] = sft_loss(model, seqs, pad_id)

        model.train(train_mode)
        with StepProgress(f"rs round {rnd}", steps, enabled=cfg.log.progress) as bar:
            for batch in batches[:steps]:
                step += 1
                tokens = sum(sum(seqs[i][1][1:]) for i in batch)
                micro = t.micro_batch_size or len(batch)
                loss_of = functools.partial(answer_nll, model, seqs, pad_id=pad_id, tokens=tokens)
                loss = accumulate(accelerator, model, micro_batches(batch, micro), loss_of).item()
                last = {"loss": loss} | optimizer_step(
                    accelerator,
                    model.parameters(),
                    optimizer,
                    scheduler,
                    cfg.optim.max_grad_norm,
                    loss,
                    step,
                    "SFT loss",
                )
                if step % cfg.log.log_every == 0:
                    logger.log(step, {**figures, **last})
                bar.advance(1, {"loss": loss})
        figures["rs/sft_loss_after"] = sft_loss(model, seqs, pad_id)
        logger.log(step, {**figures, **last})
        save_final(accelerator.unwrap_model(model), tokenizer, run / f"round-{rnd}")
        write_json(run / f"round-{rnd}" / "round.json", {**figures, **last, "records": len(records)})
        summary.update(figures | {"train/loss": last["loss"]})
    summary["train_seconds"] = time.time() - t0
    summary.update(counts.as_dict("data"))

    # step 5. final evaluation: the initial and the tuned policy on held-out prompts, the same draws
    unwrapped = accelerator.unwrap_model(model)
    if cfg.data.eval_prompts and cfg.eval.num_prompts:
        eval_examples = load_records(cfg.data.eval_prompts, "prompts")[: cfg.eval.num_prompts]
        ref = (
            unwrapped
            if lora is not None
            else load_causal_lm(path, dtype=cfg.model.dtype).to(accelerator.device)
        )
        spec = SampleSpec(
            1, cfg.eval.temperature, cfg.eval.max_new_tokens or r.max_new_tokens, t.seed, cfg.eval.batch_size
        )
        prompts = [e.prompt for e in eval_examples]
        result = sample_and_kl(unwrapped, ref, tokenizer, prompts, chat, spec, "initial", "rs")
        write_samples(run / "samples.jsonl", result, 1, step)
        ev = {**result.metrics, **score_samples(result, judge, gold, ref_name="initial")}
        logger.log(step, ev, split="eval")
        summary.update(ev)
    save_final(unwrapped, tokenizer, run / "final")
    summary.update({"steps": step, "records": len(all_records), "peak_memory_mb": peak_memory_mb()})
    write_json(run / "summary.json", summary)
    logger.close()
    return summary

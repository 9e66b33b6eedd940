"""Offline preference optimisation: DPO and its relatives, straight from pairs or rankings.

``heed dpo`` / :func:`train_dpo` reads preference pairs and ranked groups (expanded into
pairs), and tunes a policy with one of the losses of :mod:`heed.algos.losses`
(``dpo_loss``: sigmoid / cDPO, IPO, hinge; ``simpo_loss``), plus an optional NLL term on the
chosen answer (RPO). Chosen and rejected answers go through one concatenated forward and
only response tokens reach the LM head. Reference log-probs are computed once before
training and cached in the run folder (``ref_logps.pt``), or per batch.

The loop reads top to bottom as numbered steps, like :func:`heed.train.sft.train_sft`.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from heed.config.dpo import DPOConfig, DPOLossConfig
from heed.data.collate import length_grouped_batches
from heed.data.pairs import EncodedPairs, PairCounts, PreferencePair, encode_pairs, expand_pairs, warn_counts
from heed.data.records import (
    ParseOptions,
    Prompt,
    load_records,
    load_train_and_eval,
)
from heed.data.templating import use_chat
from heed.errors import DataError
from heed.models.forward import collate_pairs, pair_logps
from heed.report.metrics import MetricsLogger
from heed.report.progress import StepProgress
from heed.train.common import (
    check_batch_weight,
    guard_run,
    peak_memory_mb,
    prepare_optimization,
    start_run,
    write_json,
)
from heed.train.loop import (
    Cadence,
    EpochPlan,
    accumulate,
    checkpoint,
    micro_batches,
    optimizer_step,
    save_final,
)
from heed.train.reference import (
    SampleSpec,
    load_policy,
    load_ref_cache,
    load_reference,
    model_fingerprint,
    preference_losses,
    ref_logps_for,
    reference_table,
    sample_and_kl,
    save_ref_cache,
    write_samples,
)


# ---------------------------------------------------------------------------------------------
# the reference cache's key (the loss and the reference table live in heed.train.reference)
# ---------------------------------------------------------------------------------------------
def data_fingerprint(*datasets: EncodedPairs) -> str:
    h = hashlib.sha256()
    for d in datasets:
        h.update(f"n={len(d)};".encode())
        for (ci, cm), (ri, rm) in zip(d.chosen, d.rejected, strict=True):
            h.update(repr((ci, cm, ri, rm)).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# evaluation and sampling
# ---------------------------------------------------------------------------------------------
def _mean_stats(sums: dict[str, float], n: float, prefix: str) -> dict[str, float]:
    names = {"accuracy": "reward_accuracy"} if prefix == "eval" else {}
    return {f"{prefix}/{names.get(k, k)}": v / max(n, 1e-12) for k, v in sums.items()}


@torch.inference_mode()
def evaluate(
    model: Any,
    data: EncodedPairs,
    cfg: DPOLossConfig,
    pad_id: int,
    batch_size: int,
    ref_table: torch.Tensor | None,
    ref_model: Any | None,
    share: bool = True,
) -> dict[str, float]:
    """Held-out loss, reward accuracy, margin, implicit rewards and log-probs (``eval/*``)."""
    if not len(data):
        return {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(start + batch_size, len(data))))
        ids, att, mask = (
            t.to(device)
            for t in collate_pairs([data.chosen[i] for i in idx], [data.rejected[i] for i in idx], pad_id)
        )
        policy = pair_logps(model, ids, att, mask, share)
        ref_sum, ref_avg = _reference(idx, ref_table, ref_model, ids, att, mask, cfg, share)
        losses, stats = preference_losses(cfg, policy, ref_sum, ref_avg)
        sums["loss"] = sums.get("loss", 0.0) + losses.sum().item()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v.sum().item()
    model.train(was_training)
    return _mean_stats(sums, len(data), "eval")


def _reference(
    idx: Sequence[int],
    ref_table: torch.Tensor | None,
    ref_model: Any | None,
    ids: torch.Tensor,
    att: torch.Tensor,
    mask: torch.Tensor,
    cfg: DPOLossConfig,
    share: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Reference (sum, avg) log-probs (2B,) of a batch: from the precomputed table, or a forward now."""
    if cfg.type == "simpo":
        return None, None
    if ref_table is not None:
        s, a = ref_logps_for(idx, ref_table)
        return s.to(ids.device), a.to(ids.device)
    assert ref_model is not None
    from heed.models.lora import adapter_disabled

    ref_dev = next(ref_model.parameters()).device  # the CPU with offload_ref
    with torch.inference_mode(), adapter_disabled(ref_model):
        lp = pair_logps(ref_model, ids.to(ref_dev), att.to(ref_dev), mask.to(ref_dev), share)
        return lp.logps.to(ids.device).clone(), lp.avg_logps.to(ids.device).clone()


def sample_prompts(cfg: DPOConfig, eval_data: EncodedPairs, train_data: EncodedPairs) -> list[Prompt]:
    """The prompts answered at the end: ``sample.prompts`` or the (distinct) prompts of the eval pairs."""
    n = cfg.sample.num_prompts
    if cfg.sample.prompts:
        return [r.prompt for r in load_records(cfg.sample.prompts, "prompts")][:n]
    seen: dict[str, Prompt] = {}
    for p in eval_data.pairs or train_data.pairs:
        seen.setdefault(repr(p.prompt), p.prompt)
    return list(seen.values())[:n]


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def plan_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch, deterministic in (seed, epoch), so a resumed run sees the same order."""
    return length_grouped_batches(lengths, batch_size, seed * 1000 + epoch)


def load_preference_data(
    cfg: DPOConfig,
) -> tuple[list[PreferencePair], list[PreferencePair], PairCounts, PairCounts]:
    """Read and validate every record, split held-out groups, expand groups into pairs."""
    from heed.data.split import split_eval

    d = cfg.data
    opts = ParseOptions(allow_negative_weights=d.allow_negative_weights)
    train_groups, eval_groups = load_train_and_eval(d, "preferences", opts, d.max_length)
    if not cfg.data.eval:
        # split by group, so answers to one prompt never sit on both sides
        train_groups, eval_groups = split_eval(train_groups, cfg.data.eval_split, cfg.train.seed)
    train_pairs, train_counts = expand_pairs(train_groups, cfg.data.pairs)
    eval_pairs, eval_counts = expand_pairs(eval_groups, cfg.data.pairs)
    return train_pairs, eval_pairs, train_counts, eval_counts


def reference_logps(
    cfg: DPOConfig,
    run: Path,
    ckpt: Path | None,
    model: Any,
    data: tuple[EncodedPairs, EncodedPairs],
    pad_id: int,
    main: bool,
) -> tuple[dict[str, torch.Tensor], Any]:
    """Step 5: the reference's log-probs of every train and eval pair, once (``train.precompute_ref``,
    cached in the run folder keyed by the reference and the data), or the reference model itself for a
    forward per batch. Returns ``(tables, ref_model)``: tables empty, or ref_model None. SimPO needs neither."""
    if cfg.loss.type == "simpo":
        return {}, None
    device = next(model.parameters()).device
    if not cfg.train.precompute_ref:
        return {}, load_reference(cfg, model, device)
    ref_path = cfg.ref_model or cfg.model.path
    key = f"{model_fingerprint(ref_path)}:{data_fingerprint(*data)}"
    cached = load_ref_cache(run, key)
    if cached is not None:
        return {"train": cached["train"], "eval": cached["eval"]}, None
    # before the first step the policy *is* the reference: no second copy is needed
    ref = model if ckpt is None and cfg.ref_model is None else load_reference(cfg, model, device)
    tables = {
        name: reference_table(
            ref,
            part,
            pad_id,
            cfg.train.eval_batch_size,
            f"reference ({name})",
            progress=cfg.log.progress and main,
            share=cfg.train.share_prompt,
        )
        for name, part in zip(("train", "eval"), data, strict=True)
    }
    if main:
        save_ref_cache(run, key, tables)
    return tables, None


@guard_run
def train_dpo(cfg: DPOConfig, resume: bool = False) -> dict[str, Any]:
    """Run DPO (or IPO / hinge / SimPO); returns the final summary (also written to ``summary.json``)."""
    from heed.report.monitors import Monitor, append_alarms, resume_monitor

    # step 1. run folder, seed, processes, mixed precision
    accelerator, run, ckpt = start_run(cfg, cfg.out, cfg.train.seed, cfg.model.mixed_precision, resume)
    main = accelerator.is_main_process
    device = accelerator.device

    # step 2. data: validate every record, expand groups into pairs (ties skipped, counted)
    train_pairs, eval_pairs, train_counts, eval_counts = load_preference_data(cfg)
    if not train_pairs:
        raise DataError(
            f"{cfg.data.train}: no preference pair to train on after expanding groups "
            f"(pairs: {cfg.data.pairs}; {train_counts.ties_skipped} tied pairs skipped)"
        )

    # step 3. policy (a checkpoint's weights when resuming; with LoRA, the base model plus a new
    # adapter or the checkpoint's adapter), dropout off, and tokenizer
    model, tokenizer, train_mode = load_policy(cfg, ckpt, device)
    pad_id = tokenizer.pad_token_id
    chat = use_chat(tokenizer, cfg.data.chat)

    # step 4. tokenize prompt + answer; truncate with a count
    train_data = encode_pairs(tokenizer, train_pairs, chat, cfg.data.max_length, train_counts)
    eval_data = encode_pairs(tokenizer, eval_pairs, chat, cfg.data.max_length, eval_counts)
    if main:
        warn_counts(str(cfg.data.train), train_counts, cfg.data.max_length)
        warn_counts(str(cfg.data.eval or f"{cfg.data.train} (eval split)"), eval_counts, cfg.data.max_length)
    if not len(train_data):
        raise DataError(
            f"{cfg.data.train}: every pair was dropped (see the warnings above); raise data.max_length"
        )

    # step 5. reference log-probs: once for the whole dataset (cached), or a reference model per batch
    t_ref = time.time()
    ref_tables, ref_model = reference_logps(cfg, run, ckpt, model, (train_data, eval_data), pad_id, main)
    ref_seconds = time.time() - t_ref

    # step 6. optimizer, schedule, step plan
    lengths = train_data.lengths()
    steps_per_epoch = len(plan_batches(lengths, cfg.train.batch_size, cfg.train.seed, 0))
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    model, optimizer, scheduler, state = prepare_optimization(
        accelerator, model, model.parameters(), cfg.optim, total_steps, ckpt
    )
    start_step = state["step"]
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    logger = MetricsLogger(run, tensorboard=cfg.log.tensorboard, enabled=main)
    if ckpt is not None:
        logger.truncate_after(start_step)
        from heed.report.metrics import read_metrics

        monitor = resume_monitor(read_metrics(run / "metrics.jsonl"), cfg.monitor)
    else:
        monitor = Monitor(cfg.monitor)
    alarms: list[Any] = []

    def eval_now(step: int) -> dict[str, float]:
        ev = evaluate(
            accelerator.unwrap_model(model),
            eval_data,
            cfg.loss,
            pad_id,
            cfg.train.eval_batch_size,
            ref_tables.get("eval"),
            ref_model,
            cfg.train.share_prompt,
        )
        if ev:
            logger.log(step, ev, split="eval")
            alarms.extend(monitor.update(step, ev))
        return ev

    # step 7. the loop: one concatenated forward per micro-batch, loss averaged over the global batch
    model.train(train_mode)
    pairs_seen, tokens_seen, t0 = 0, 0, time.time()
    last: dict[str, float] = {}
    batches = EpochPlan(
        lambda epoch: plan_batches(lengths, cfg.train.batch_size, cfg.train.seed, epoch), steps_per_epoch
    )
    cadence = Cadence.of(cfg.log, total_steps)
    sums: dict[str, torch.Tensor] = {}

    def loss_of(idx: Sequence[int]) -> torch.Tensor:
        nonlocal tokens_seen
        ids, att, mask = (
            t.to(device)
            for t in collate_pairs(
                [train_data.chosen[i] for i in idx], [train_data.rejected[i] for i in idx], pad_id
            )
        )
        policy = pair_logps(model, ids, att, mask, cfg.train.share_prompt)
        ref_sum, ref_avg = _reference(
            idx, ref_tables.get("train"), ref_model, ids, att, mask, cfg.loss, cfg.train.share_prompt
        )
        losses, stats = preference_losses(cfg.loss, policy, ref_sum, ref_avg)
        weights = torch.tensor([train_data.weights[i] for i in idx], device=device, dtype=losses.dtype)
        for k, v in stats.items():
            sums[k] = sums.get(k, torch.zeros((), device=device)) + v.sum() / len(batch)
        tokens_seen += int(mask.sum().item())
        # every pair of the optimizer step counts equally, whatever the micro-batching or process count
        return (weights * losses).sum() / len(batch) * world

    with StepProgress("dpo", total_steps, enabled=cfg.log.progress and main, start=start_step) as bar:
        for step in range(start_step, total_steps):
            batch = batches.batch(step)
            check_batch_weight(
                [train_data.weights[i] for i in batch], [train_data.pairs[i].where for i in batch], step + 1
            )
            sums.clear()
            sums["loss"] = (
                accumulate(accelerator, model, micro_batches(batch[rank::world], micro), loss_of) / world
            )
            reduced = {k: accelerator.reduce(v, reduction="sum").item() for k, v in sums.items()}
            figures = optimizer_step(
                accelerator,
                model.parameters(),
                optimizer,
                scheduler,
                cfg.optim.max_grad_norm,
                reduced["loss"],
                step + 1,
                "DPO loss",
            )
            pairs_seen += len(batch)
            done = step + 1
            last = {"loss": reduced.pop("loss"), **{f"dpo/{k}": v for k, v in reduced.items()}, **figures}
            if cadence.log(done):
                elapsed = time.time() - t0
                logger.log(
                    done,
                    {
                        **last,
                        "epoch": batches.epoch(done),
                        "pairs_per_s": pairs_seen / max(elapsed, 1e-9),
                        "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                    },
                )
            if cadence.eval(done) and main:
                ev = eval_now(done)
                if "eval/reward_accuracy" in ev:
                    bar.log(
                        f"step {done}: eval/reward_accuracy={ev['eval/reward_accuracy']:.3f} "
                        f"eval/margin={ev['eval/margin']:.3f}"
                    )
            if cadence.save(done):
                checkpoint(
                    accelerator, run, done, model, tokenizer, optimizer, scheduler, cfg.log.keep_checkpoints
                )
            bar.advance(1, {"loss": last["loss"], "acc": last["dpo/accuracy"]})
    train_seconds = time.time() - t0

    # step 8. final evaluation, samples with KL to the reference, model and summary
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {"algo": "dpo", "steps": total_steps, **last}
    if main:
        unwrapped = accelerator.unwrap_model(model)
        summary.update(eval_now(total_steps))
        if cfg.sample.num_prompts:
            prompts = sample_prompts(cfg, eval_data, train_data)
            ref = ref_model if ref_model is not None else load_reference(cfg, model, device)
            spec = SampleSpec(
                cfg.sample.num_samples,
                cfg.sample.temperature,
                cfg.sample.max_new_tokens,
                cfg.train.seed,
                cfg.train.eval_batch_size,
            )
            result = sample_and_kl(unwrapped, ref, tokenizer, prompts, chat, spec)
            del ref
            logger.log(total_steps, result.metrics, split="eval")
            alarms.extend(monitor.update(total_steps, result.metrics, result.texts["dpo"]))
            summary.update(result.metrics)
            write_samples(run / "samples.jsonl", result, cfg.sample.num_samples, total_steps)
        save_final(unwrapped, tokenizer, run / "final")
        append_alarms(run, alarms)
        summary.update(
            {
                "pairs_per_s": pairs_seen / max(train_seconds, 1e-9),
                "tokens_per_s": tokens_seen / max(train_seconds, 1e-9),
                "train_seconds": train_seconds,
                "ref_seconds": ref_seconds,
                "peak_memory_mb": peak_memory_mb(),
                "train_pairs": len(train_data),
                "eval_pairs": len(eval_data),
                **train_counts.as_dict("data/train"),
                **eval_counts.as_dict("data/eval"),
                "alarms": len(alarms),
            }
        )
        write_json(run / "summary.json", summary)
        logger.close()
    return summary

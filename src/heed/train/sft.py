"""Supervised fine-tuning and language modelling: one explicit PyTorch loop on accelerate.

``heed pretrain`` (plain text, a new model) and ``heed sft`` (chat or prompt/completion,
loss on answers only) share this loop. It reads top to bottom as numbered steps.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from heed.algos.ops import masked_sum
from heed.config.sft import SFTConfig
from heed.data.collate import (
    Encoded,
    length_grouped_batches,
    pack,
    packed_positions,
    pad_batch,
    pad_positions,
    truncate,
)
from heed.data.records import load_train_and_eval
from heed.data.split import split_eval
from heed.data.templating import encode_sft, encode_text, use_chat
from heed.errors import DataError
from heed.models.lm import lm_token_losses
from heed.report.metrics import MetricsLogger
from heed.report.progress import StepProgress
from heed.train.common import guard_run, peak_memory_mb, prepare_optimization, start_run, write_json
from heed.train.loop import (
    Cadence,
    EpochPlan,
    accumulate,
    checkpoint,
    micro_batches,
    optimizer_step,
    save_final,
)


def build_model_and_tokenizer(cfg: SFTConfig, texts_for_tokenizer: list[str] | None) -> tuple[Any, Any]:
    """Load a pretrained model, or build a new one (training a tokenizer from the data if needed)."""
    from heed.models.loading import load_causal_lm, load_tokenizer
    from heed.models.tiny import build_model, tiny_llama_config, train_tokenizer

    m = cfg.model
    if m.init == "pretrained":
        tok = load_tokenizer(m.tokenizer or m.path)
        from heed.models.lora import quantization_kwargs

        model = load_causal_lm(m.path, dtype=m.dtype, **quantization_kwargs(m.lora))
        return model, tok
    if m.tokenizer:
        tok = load_tokenizer(m.tokenizer)
    else:
        tok = train_tokenizer(texts_for_tokenizer or [], vocab_size=m.vocab_size)
    config = tiny_llama_config(tok, size=m.size, max_position_embeddings=m.max_position_embeddings)
    return build_model(config, seed=cfg.train.seed), tok


def _raw_texts(examples: list[Any]) -> list[str]:
    out = []
    for ex in examples:
        if hasattr(ex, "text"):
            out.append(ex.text)
        elif ex.messages is not None:
            out.append("\n".join(m["content"] for m in ex.messages))
        else:
            out.append(f"{ex.prompt}\n{ex.completion}")
    return out


def encode_examples(examples: list[Any], tokenizer: Any, cfg: SFTConfig) -> list[Encoded]:
    chat = use_chat(tokenizer, cfg.data.chat)
    if cfg.data.kind == "text":
        return [encode_text(tokenizer, ex.text) for ex in examples]
    return [encode_sft(tokenizer, ex, chat) for ex in examples]


def plan_batches(seqs: list[Encoded], cfg: SFTConfig, epoch: int) -> list[list[int]]:
    """The batches of one epoch, deterministic in (seed, epoch), so a resumed run sees the same order."""
    seed = cfg.train.seed * 1000 + epoch
    bs = cfg.train.batch_size
    if cfg.data.group_by_length and not cfg.data.packing:
        return length_grouped_batches([len(s[0]) for s in seqs], bs, seed)
    order = list(range(len(seqs)))
    random.Random(seed).shuffle(order)
    return [order[i : i + bs] for i in range(0, len(order), bs)]


@torch.no_grad()
def evaluate(
    model: Any, seqs: list[Encoded], pad_id: int, batch_size: int, positions: list[list[int]] | None = None
) -> dict[str, float]:
    """Token-mean eval loss and perplexity (``positions``: packed rows' document positions)."""
    if not seqs:
        return {}
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        ids, att, mask = pad_batch(seqs[start : start + batch_size], pad_id)
        dev = next(model.parameters()).device
        ids, att, mask = ids.to(dev), att.to(dev), mask.to(dev)
        pos = pad_positions(positions[start : start + batch_size]).to(dev) if positions is not None else None
        mask[:, 0] = False
        nll = lm_token_losses(model, ids, att, mask, pos)
        total += nll.sum().item()
        count += int(mask.sum().item())
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


@guard_run
def train_sft(cfg: SFTConfig, resume: bool = False) -> dict[str, Any]:
    """Run SFT / language modelling; returns the final summary (also written to ``summary.json``)."""
    from heed.models.lora import apply_lora, enable_gradient_checkpointing

    # step 1. run folder, seed, processes, mixed precision
    accelerator, run, ckpt = start_run(cfg, cfg.out, cfg.train.seed, cfg.model.mixed_precision, resume)
    main = accelerator.is_main_process

    # step 2. data: read and validate every record up front
    kind = cfg.data.kind
    # (texts past what max_length tokens can reach are cut before tokenizing; packing keeps them whole)
    cut_at = None if cfg.data.packing else cfg.data.max_length
    train_ex, eval_ex = load_train_and_eval(cfg.data, kind, max_length=cut_at)
    if not cfg.data.eval:
        train_ex, eval_ex = split_eval(train_ex, cfg.data.eval_split, cfg.train.seed)

    # step 3. model and tokenizer (a checkpoint's weights when resuming; with LoRA, the base model plus
    # a new adapter or the checkpoint's adapter)
    if ckpt is not None and cfg.model.lora is None:
        from heed.models.loading import load_causal_lm, load_tokenizer

        tokenizer = load_tokenizer(ckpt)
        model = load_causal_lm(ckpt, dtype=cfg.model.dtype)
    else:
        model, tokenizer = build_model_and_tokenizer(cfg, _raw_texts(train_ex))
    if cfg.model.lora is not None:
        model = apply_lora(model, cfg.model.lora, adapter=ckpt)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    pad_id = tokenizer.pad_token_id

    # step 4. tokenize; truncate (with a count) or pack
    train_seqs = encode_examples(train_ex, tokenizer, cfg)
    eval_seqs = encode_examples(eval_ex, tokenizer, cfg)
    train_pos: list[list[int]] | None = None
    eval_pos: list[list[int]] | None = None
    if cfg.data.packing:
        if cfg.data.pack_boundaries:  # each sequence attends to itself only
            train_pos = packed_positions(train_seqs, cfg.data.max_length)
            eval_pos = packed_positions(eval_seqs, cfg.data.max_length)
        train_seqs = pack(train_seqs, cfg.data.max_length)
        eval_seqs = pack(eval_seqs, cfg.data.max_length)
    else:
        train_seqs, cut = truncate(train_seqs, cfg.data.max_length)
        eval_seqs, _ = truncate(eval_seqs, cfg.data.max_length)
        if cut and main:
            warnings.warn(
                f"{cfg.data.train}: {cut} of {len(train_seqs)} sequences were longer than "
                f"data.max_length={cfg.data.max_length} and were truncated",
                stacklevel=1,
            )
    keep = [i for i, s in enumerate(train_seqs) if any(s[1][1:])]
    train_seqs = [train_seqs[i] for i in keep]
    if train_pos is not None:
        train_pos = [train_pos[i] for i in keep]
    if not train_seqs:
        raise DataError(
            f"{cfg.data.train}: no sequence has a token to train on (check the chat template / max_length)"
        )

    # step 5. optimizer, schedule, step plan
    steps_per_epoch = len(plan_batches(train_seqs, cfg, 0))
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    model, optimizer, scheduler, state = prepare_optimization(
        accelerator, model, model.parameters(), cfg.optim, total_steps, ckpt
    )
    start_step = state["step"]
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    logger = MetricsLogger(run, tensorboard=cfg.log.tensorboard, enabled=main)
    if resume:
        logger.truncate_after(start_step)  # drop what a killed run logged after its last checkpoint

    # step 6. the loop
    model.train()
    tokens_seen, t0 = 0, time.time()
    last: dict[str, float] = {}
    plan = EpochPlan(lambda epoch: plan_batches(train_seqs, cfg, epoch), steps_per_epoch)
    cadence = Cadence.of(cfg.log, total_steps)

    def loss_of(chunk: Sequence[int]) -> torch.Tensor:
        ids, att, mask = (t.to(accelerator.device) for t in pad_batch([train_seqs[i] for i in chunk], pad_id))
        positions = pad_positions([train_pos[i] for i in chunk]).to(accelerator.device) if train_pos else None
        mask[:, 0] = False
        nll = lm_token_losses(model, ids, att, mask, positions)
        # every token of the optimizer step counts equally, whatever the micro-batching or process count
        return masked_sum(nll, mask) / global_tokens * world

    with StepProgress(
        "pretrain" if kind == "text" else "sft",
        total_steps,
        enabled=cfg.log.progress and main,
        start=start_step,
    ) as bar:
        for step in range(start_step, total_steps):
            batch_idx = plan.batch(step)
            global_tokens = sum(sum(train_seqs[i][1][1:]) for i in batch_idx)
            loss_sum = accumulate(accelerator, model, micro_batches(batch_idx[rank::world], micro), loss_of)
            loss_value = accelerator.reduce(loss_sum / world, reduction="sum").item()
            last = {"loss": loss_value}
            last |= optimizer_step(
                accelerator,
                model.parameters(),
                optimizer,
                scheduler,
                cfg.optim.max_grad_norm,
                loss_value,
                step + 1,
                "training loss",
            )
            tokens_seen += global_tokens
            done = step + 1
            if cadence.log(done):
                elapsed = time.time() - t0
                logger.log(
                    done,
                    {**last, "epoch": plan.epoch(done), "tokens_per_s": tokens_seen / max(elapsed, 1e-9)},
                )
            if cadence.eval(done) and main:
                unwrapped = accelerator.unwrap_model(model)
                ev = evaluate(unwrapped, eval_seqs, pad_id, cfg.train.eval_batch_size, eval_pos)
                logger.log(done, ev, split="eval")
            if cadence.save(done):
                checkpoint(
                    accelerator, run, done, model, tokenizer, optimizer, scheduler, cfg.log.keep_checkpoints
                )
            bar.advance(1, {"loss": loss_value})

    loop_seconds = time.time() - t0

    # step 7. final evaluation, model and summary
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {"steps": total_steps, "train/loss": last.get("loss", float("nan"))}
    if main:
        unwrapped = accelerator.unwrap_model(model)
        ev = evaluate(unwrapped, eval_seqs, pad_id, cfg.train.eval_batch_size, eval_pos)
        if ev:
            logger.log(total_steps, ev, split="eval")
        save_final(unwrapped, tokenizer, run / "final")
        summary.update(ev)
        summary.update(
            {
                "tokens_per_s": tokens_seen / max(loop_seconds, 1e-9),
                "train_seconds": loop_seconds,
                "peak_memory_mb": peak_memory_mb(),
                "train_sequences": len(train_seqs),
                "eval_sequences": len(eval_seqs),
            }
        )
        write_json(run / "summary.json", summary)
        logger.close()
    return summary

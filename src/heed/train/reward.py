"""Reward-model training on human rankings: the K-wise loss of InstructGPT, one explicit loop.

Each optimizer step takes ``batch_size`` ranked groups (a preference pair is a group of two).
The K responses of every group in a micro-batch go through the model in ONE right-padded
forward; the rewards are reshaped to (G, K) with a response mask for ragged K, and
:func:`heed.algos.losses.ranking_loss` averages −log σ(r_w − r_l − m) over each group's
C(K, 2) pairs. So a group of K costs K sequence forwards, not 2 per pair.

With ``model.freeze_backbone`` the backbone runs once per response before training and only
the head learns on the cached features (the cheap variant of GPT-2-feature reward models).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from heed.algos.losses import ranking_loss
from heed.algos.ops import kendall_tau, top1_accuracy
from heed.config.reward import RMConfig
from heed.data.collate import length_grouped_batches
from heed.data.records import ParseOptions, PreferenceGroup, load_train_and_eval
from heed.data.split import split_by_prompt
from heed.errors import DataError
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
from heed.train.loop import Cadence, EpochPlan, accumulate, checkpoint, micro_batches, optimizer_step


@dataclass(frozen=True)
class EncodedGroup:
    """One ranked group as token ids. ``offset`` is the index of its first response in the
    split's flat list of responses (where the frozen-backbone features are cached); ``types`` the
    token types of each response (encoders whose tokenizer gives them, else None)."""

    seqs: list[list[int]]
    ranks: list[float]
    margin: float
    weight: float
    offset: int
    types: list[list[int]] | None = None
    where: str = ""  # file:line of the record

    @property
    def num_pairs(self) -> int:
        return sum(a < b for a in self.ranks for b in self.ranks)


def encode_groups(
    groups: list[PreferenceGroup], tokenizer: Any, cfg: RMConfig, chat: bool, backbone: str
) -> tuple[list[EncodedGroup], int, int, int]:
    """Tokenize every response; returns the groups, the number of responses, how many were truncated,
    and how many groups were dropped: two differently ranked responses identical within
    ``max_length`` tokens (a prompt that fills it leaves every response the same: loss ln 2, nothing
    learned), as DPO drops such pairs."""
    from heed.models.reward import encode_pair, truncate_ids

    out, offset, cut, dropped = [], 0, 0, 0
    for g in groups:
        pairs = [encode_pair(tokenizer, g.prompt, r, chat, backbone, g.where) for r in g.responses]  # type: ignore[arg-type]
        seqs, n_cut = truncate_ids([ids for ids, _ in pairs], cfg.data.max_length)
        types = None if pairs[0][1] is None else truncate_ids([t for _, t in pairs], cfg.data.max_length)[0]  # type: ignore[misc]
        cut += n_cut
        rank_of: dict[tuple[int, ...], float] = {}
        if any(rank_of.setdefault(tuple(s), r) != r for s, r in zip(seqs, g.ranks, strict=True)):
            dropped += 1
            continue
        margin = g.margin if (cfg.data.use_margin and g.margin is not None) else 0.0
        weight = g.weight if cfg.data.use_weight else 1.0
        out.append(EncodedGroup(seqs, list(g.ranks), margin, weight, offset, types=types, where=g.where))
        offset += len(seqs)
    return out, sum(len(g.responses) for g in groups), cut, dropped


def stack_groups(groups: list[EncodedGroup], flat_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reshape the flat rewards (N,) of ``groups`` into (G, K) with a response mask for ragged K."""
    k = max(len(g.seqs) for g in groups)
    dev = flat_rewards.device
    mask = torch.zeros(len(groups), k, dtype=torch.bool, device=dev)
    ranks = torch.zeros(len(groups), k, dtype=torch.float32, device=dev)
    index = torch.zeros(len(groups), k, dtype=torch.long, device=dev)
    start = 0
    for i, g in enumerate(groups):
        n = len(g.seqs)
        mask[i, :n] = True
        ranks[i, :n] = torch.tensor(g.ranks, dtype=torch.float32)
        index[i, :n] = torch.arange(start, start + n)
        start += n
    rewards = flat_rewards[index]  # (G, K); padded slots hold some other reward and are masked out
    margins = torch.tensor([g.margin for g in groups], dtype=torch.float32, device=dev)  # (G,)
    weights = torch.tensor([g.weight for g in groups], dtype=torch.float32, device=dev)  # (G,)
    return {"rewards": rewards, "ranks": ranks, "mask": mask, "margins": margins, "weights": weights}


RewardFn = Callable[[list[EncodedGroup]], torch.Tensor]


def _flat_types(groups: list[EncodedGroup]) -> list[list[int]] | None:
    return None if not groups or groups[0].types is None else [t for g in groups for t in g.types or []]


def make_reward_fn(
    model: Any,
    pad_id: int,
    device: Any,
    features: torch.Tensor | None,
    frozen: Any,
    share_prompt: bool = False,
) -> RewardFn:
    """Flat rewards (N,) of the responses of some groups: one forward (each group's prompt run once
    with ``share_prompt``, else padded rows), or the head on cached features."""
    from heed.models.reward import forward_rewards, pad_right, pad_types, shared_prefix_rewards

    def reward_fn(groups: list[EncodedGroup]) -> torch.Tensor:
        if features is not None:
            idx = torch.tensor(
                [g.offset + j for g in groups for j in range(len(g.seqs))], device=features.device
            )
            return frozen.head(features[idx]).float()
        if share_prompt and groups[0].types is None:
            return shared_prefix_rewards(model, [g.seqs for g in groups], pad_id, device)
        ids, att = pad_right([s for g in groups for s in g.seqs], pad_id, device)
        return forward_rewards(model, ids, att, pad_types(_flat_types(groups), device))

    return reward_fn


@torch.no_grad()
def cache_features(
    frozen: Any, groups: list[EncodedGroup], pad_id: int, device: Any, batch_size: int
) -> torch.Tensor:
    """Frozen-backbone features of every response of a split, (N, H), computed once."""
    from heed.models.reward import pad_right, pad_types

    seqs = [s for g in groups for s in g.seqs]
    types = _flat_types(groups)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    was_training = frozen.model.training
    frozen.model.eval()  # features without dropout, as at scoring time
    feats: torch.Tensor | None = None
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        tt = pad_types([types[i] for i in idx] if types is not None else None, device)
        f = frozen.features(*pad_right([seqs[i] for i in idx], pad_id, device), tt)
        if feats is None:
            feats = torch.zeros(len(seqs), f.shape[-1], dtype=f.dtype, device=f.device)
        feats[torch.tensor(idx, device=f.device)] = f
    frozen.model.train(was_training)
    assert feats is not None
    return feats


@torch.no_grad()
def evaluate(
    model: Any, reward_fn: RewardFn, groups: list[EncodedGroup], batch_size: int, centering_coef: float
) -> tuple[dict[str, float], torch.Tensor]:
    """Ranking metrics on held-out groups, and every eval reward (flat, for the saved mean/std).

    ``rm/eval_loss`` (weighted mean ranking loss), ``rm/accuracy`` (pairs ordered like the humans),
    ``rm/top1_accuracy`` (the best-scored response is a best-ranked one), ``rm/kendall_tau`` (mean
    τ_b per group), ``rm/reward_mean`` and ``rm/reward_std``.
    """
    if not groups:
        return {}, torch.zeros(0)
    was_training = model.training
    model.eval()
    loss_sum = weight_sum = correct = pairs = top1 = tau = 0.0
    all_rewards = []
    chunk: list[EncodedGroup] = []

    def flush() -> None:
        nonlocal loss_sum, weight_sum, correct, pairs, top1, tau
        b = stack_groups(chunk, reward_fn(chunk))
        loss, stats = ranking_loss(
            b["rewards"], b["ranks"], b["mask"], b["margins"], b["weights"], centering_coef
        )
        loss_sum += loss.sum().item()
        weight_sum += b["weights"].sum().item()
        correct += stats.accuracy.item() * stats.num_pairs.item()
        pairs += stats.num_pairs.item()
        top1 += top1_accuracy(b["rewards"], b["ranks"], b["mask"]).sum().item()
        tau += kendall_tau(b["rewards"], b["ranks"], b["mask"]).sum().item()
        all_rewards.append(b["rewards"][b["mask"]].float().cpu())
        chunk.clear()

    size = 0
    for g in groups:
        if chunk and size + len(g.seqs) > batch_size:
            flush()
            size = 0
        chunk.append(g)
        size += len(g.seqs)
    if chunk:
        flush()
    model.train(was_training)
    rewards = torch.cat(all_rewards)
    metrics = {
        "rm/eval_loss": loss_sum / max(weight_sum, 1e-12),
        "rm/accuracy": correct / max(pairs, 1.0),
        "rm/top1_accuracy": top1 / len(groups),
        "rm/kendall_tau": tau / len(groups),
        "rm/reward_mean": rewards.mean().item(),
        "rm/reward_std": rewards.std(unbiased=False).item(),
    }
    return metrics, rewards


def build_model_and_tokenizer(cfg: RMConfig, path: str | None = None) -> tuple[Any, Any, str]:
    """The reward model to train: from a folder (causal LM, encoder, reward model) or new."""
    from heed.models.loading import load_tokenizer
    from heed.models.reward import backbone_of, build_reward_model, new_reward_model

    m = cfg.model
    if path is None and m.init == "scratch":
        tok = load_tokenizer(m.tokenizer, padding_side="right")  # type: ignore[arg-type]
        model = new_reward_model(tok, m.backbone, m.size, m.max_position_embeddings, cfg.train.seed)  # type: ignore[arg-type]
        model.config.pad_token_id = tok.pad_token_id
        if m.head == "mlp" and m.backbone == "decoder":
            from heed.models.reward import _add_mlp_block

            model = _add_mlp_block(model, cfg.train.seed)
        model.config.heed_head = m.head
        return model, tok, m.backbone
    source = path or m.path
    model, tok, backbone = build_reward_model(
        source, None if path else m.tokenizer, m.head, m.dtype, cfg.train.seed
    )  # type: ignore[arg-type]
    if m.backbone != "auto" and m.backbone != backbone:
        warnings.warn(
            f"model.backbone={m.backbone} but {source} looks like a {backbone}; using {m.backbone}",
            stacklevel=2,
        )
        backbone = m.backbone
    return model, tok, backbone or backbone_of(model.config)


@guard_run
def train_reward(cfg: RMConfig, resume: bool = False) -> dict[str, Any]:
    """Train a reward model; returns the final summary (also written to ``summary.json``)."""
    from heed.models.lora import apply_lora, enable_gradient_checkpointing
    from heed.models.reward import STATS_FILE, FrozenFeatures, use_chat_for

    # step 1. run folder, seed, processes, mixed precision
    accelerator, run, ckpt = start_run(cfg, cfg.out, cfg.train.seed, cfg.model.mixed_precision, resume)
    main = accelerator.is_main_process

    # step 2. data: read and validate every record up front; hold out prompts for eval
    d, opts = cfg.data, ParseOptions(allow_negative_weights=cfg.data.allow_negative_weights)
    train_groups, eval_groups = load_train_and_eval(d, "preferences", opts, d.max_length)
    if not cfg.data.eval:
        train_groups, eval_groups = split_by_prompt(train_groups, cfg.data.eval_split, cfg.train.seed)

    # step 3. model and tokenizer (a checkpoint's weights when resuming; with LoRA, the backbone plus a new
    # adapter or the checkpoint's, the score head training in full); rendering settings travel in its config
    lora = cfg.model.lora
    model, tokenizer, backbone = build_model_and_tokenizer(
        cfg, str(ckpt) if ckpt is not None and lora is None else None
    )
    if lora is not None:
        model = apply_lora(model, lora, task="seq_cls", adapter=ckpt)
    chat = use_chat_for(tokenizer, cfg.data.chat)
    model.config.heed_chat = chat
    model.config.heed_backbone = backbone
    model.config.heed_max_length = cfg.data.max_length
    frozen = FrozenFeatures(model, backbone) if cfg.model.freeze_backbone else None
    if frozen is not None:
        frozen.freeze()
    elif cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    pad_id = tokenizer.pad_token_id

    # step 4. tokenize every response; truncate with one warning that counts
    train_enc, n_train, cut, dropped = encode_groups(train_groups, tokenizer, cfg, chat, backbone)
    eval_enc, n_eval, eval_cut, eval_dropped = encode_groups(eval_groups, tokenizer, cfg, chat, backbone)
    if (cut or eval_cut) and main:
        warnings.warn(
            f"{cfg.data.train}: {cut + eval_cut} of {n_train + n_eval} responses were longer than "
            f"data.max_length={cfg.data.max_length} tokens and were truncated",
            stacklevel=1,
        )
    if (dropped or eval_dropped) and main:
        warnings.warn(
            f"{cfg.data.train}: {dropped + eval_dropped} groups dropped: differently ranked responses are "
            f"identical within data.max_length={cfg.data.max_length} tokens (the prompt fills it?)",
            stacklevel=1,
        )
    if not train_enc:
        raise DataError(
            f"{cfg.data.train}: every group was dropped (see the warnings above); raise data.max_length"
        )

    # step 5. optimizer, schedule, step plan
    lengths = [max(len(s) for s in g.seqs) * len(g.seqs) for g in train_enc]

    def plan(epoch: int) -> list[list[int]]:
        return length_grouped_batches(lengths, cfg.train.batch_size, cfg.train.seed * 1000 + epoch)

    steps_per_epoch = len(plan(0))
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    params = frozen.parameters() if frozen is not None else model.parameters()
    model, optimizer, scheduler, state = prepare_optimization(
        accelerator, model, params, cfg.optim, total_steps, ckpt
    )
    start_step = state["step"]
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    logger = MetricsLogger(run, tensorboard=cfg.log.tensorboard, enabled=main)
    if ckpt is not None:
        logger.truncate_after(start_step)

    # step 6. frozen backbone: its features are computed once, then only the head trains
    unwrapped = accelerator.unwrap_model(model)
    t_feat = time.time()
    train_feats = eval_feats = None
    if frozen is not None:
        train_feats = cache_features(frozen, train_enc, pad_id, accelerator.device, cfg.train.eval_batch_size)
        eval_feats = (
            cache_features(frozen, eval_enc, pad_id, accelerator.device, cfg.train.eval_batch_size)
            if eval_enc
            else None
        )
    feature_seconds = time.time() - t_feat
    train_fn = make_reward_fn(model, pad_id, accelerator.device, train_feats, frozen, cfg.train.share_prompt)
    eval_fn = make_reward_fn(
        unwrapped, pad_id, accelerator.device, eval_feats, frozen, cfg.train.share_prompt
    )

    def run_eval() -> tuple[dict[str, float], torch.Tensor]:
        return evaluate(unwrapped, eval_fn, eval_enc, cfg.train.eval_batch_size, cfg.train.centering_coef)

    # step 7. the loop
    model.train()
    pairs_seen, responses_seen, t0, cpu0 = 0, 0, time.time(), time.process_time()
    last: dict[str, float] = {}
    batches = EpochPlan(plan, steps_per_epoch)
    cadence = Cadence.of(cfg.log, total_steps)
    correct = torch.zeros((), device=accelerator.device)
    rewards_seen: list[torch.Tensor] = []

    def loss_of(chunk: Sequence[EncodedGroup]) -> torch.Tensor:
        nonlocal correct
        b = stack_groups(list(chunk), train_fn(list(chunk)))  # (G, K) from one forward of all K·G responses
        group_loss, stats = ranking_loss(
            b["rewards"], b["ranks"], b["mask"], b["margins"], b["weights"], cfg.train.centering_coef
        )  # (G,)
        correct = correct + stats.accuracy * stats.num_pairs
        rewards_seen.append(b["rewards"][b["mask"]].detach().float())
        # every group of the optimizer step counts by its weight, whatever the micro-batching or process count
        return group_loss.sum() / max(total_weight, 1e-12) * world

    with StepProgress("rm", total_steps, enabled=cfg.log.progress and main, start=start_step) as bar:
        for step in range(start_step, total_steps):
            batch = [train_enc[i] for i in batches.batch(step)]
            # every group of the optimizer step counts by its weight, whatever the micro-batching or process count
            total_weight = check_batch_weight([g.weight for g in batch], [g.where for g in batch], step + 1)
            correct = torch.zeros((), device=accelerator.device)
            rewards_seen.clear()
            loss_sum = accumulate(accelerator, model, micro_batches(batch[rank::world], micro), loss_of)
            loss_value = accelerator.reduce(loss_sum / world, reduction="sum").item()
            figures = optimizer_step(
                accelerator,
                params if frozen is not None else model.parameters(),
                optimizer,
                scheduler,
                cfg.optim.max_grad_norm,
                loss_value,
                step + 1,
                "ranking loss",
            )
            batch_pairs = sum(g.num_pairs for g in batch)
            pairs_seen += batch_pairs
            responses_seen += sum(len(g.seqs) for g in batch)
            done = step + 1
            r = torch.cat(rewards_seen) if rewards_seen else torch.zeros(1)
            last = {
                "loss": loss_value,
                "rm/accuracy": accelerator.reduce(correct, reduction="sum").item() / max(batch_pairs, 1),
                "rm/reward_mean": r.mean().item(),
                "rm/reward_std": r.std(unbiased=False).item(),
                **figures,
            }
            if cadence.log(done):
                elapsed = max(time.time() - t0, 1e-9)
                logger.log(
                    done,
                    {
                        **last,
                        "epoch": batches.epoch(done),
                        "pairs_per_s": pairs_seen / elapsed,
                        "responses_per_s": responses_seen / elapsed,
                    },
                )
            if cadence.eval(done) and main and eval_enc:
                logger.log(done, run_eval()[0], split="eval")
            if cadence.save(done):
                checkpoint(
                    accelerator, run, done, model, tokenizer, optimizer, scheduler, cfg.log.keep_checkpoints
                )
            bar.advance(1, {"loss": loss_value, "acc": last["rm/accuracy"]})

    # step 8. final evaluation, reward statistics beside the model, summary
    accelerator.wait_for_everyone()
    elapsed, cpu_seconds = time.time() - t0, time.process_time() - cpu0
    summary: dict[str, Any] = {
        "algo": "rm",
        "steps": total_steps,
        "train/loss": last.get("loss", float("nan")),
    }
    if main:
        ev, eval_rewards = run_eval()
        if ev:
            logger.log(total_steps, ev, split="eval")
        if eval_rewards.numel():
            stats_rewards, stats_split = eval_rewards, "eval"
        else:  # no held-out data: the statistics come from the training responses
            stats_rewards, stats_split = (
                evaluate(unwrapped, train_fn, train_enc, cfg.train.eval_batch_size, cfg.train.centering_coef)[
                    1
                ],
                "train",
            )
        reward_stats = {
            "mean": stats_rewards.mean().item(),
            "std": stats_rewards.std(unbiased=False).item(),
            "count": int(stats_rewards.numel()),
            "split": stats_split,
        }
        from heed.models.loading import save_pretrained

        if lora is not None:  # the adapter beside final/, which holds the merged plain reward model
            save_pretrained(unwrapped, tokenizer, run / "adapter")
            save_pretrained(unwrapped.merge_and_unload(), tokenizer, run / "final")
        else:
            save_pretrained(unwrapped, tokenizer, run / "final")
        write_json(run / "final" / STATS_FILE, reward_stats)
        summary.update(ev)
        summary.update(
            {
                "reward_mean": reward_stats["mean"],
                "reward_std": reward_stats["std"],
                "pairs_per_s": pairs_seen / max(elapsed, 1e-9),
                "responses_per_s": responses_seen / max(elapsed, 1e-9),
                "train_seconds": elapsed,
                "train_cpu_seconds": cpu_seconds,
                "feature_seconds": feature_seconds,
                "peak_memory_mb": peak_memory_mb(),
                "train_groups": len(train_enc),
                "eval_groups": len(eval_enc),
                "train_pairs": sum(g.num_pairs for g in train_enc),
                "truncated_responses": cut + eval_cut,
                "dropped_groups": dropped + eval_dropped,
                "backbone": backbone,
                "frozen_backbone": frozen is not None,
            }
        )
        write_json(run / "summary.json", summary)
        logger.close()
    return summary

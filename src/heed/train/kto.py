"""KTO: Kahneman-Tversky optimisation from thumbs up / down on single answers.

``heed kto`` / :func:`train_kto` reads unpaired feedback (``{"prompt", "completion", "label"}``; pairs
and ranked groups in the same files become thumbs, :mod:`heed.data.unpaired`) and tunes a policy with
:func:`heed.algos.losses.kto_loss` (https://arxiv.org/abs/2402.01306)::

    r = log π(y|x) − log π_ref(y|x),   z_0 = max(0, KL̂) (no gradient)
    thumbs up:    λ_D · (1 − σ(β·(r − z_0)))        thumbs down:  λ_U · (1 − σ(β·(z_0 − r)))

The reference point z_0 is the batch's estimate of KL(π ‖ π_ref): the mean of log π − log π_ref over
the batch's mismatched rows, each prompt with the previous example's answer (TRL's pairing), over
every process. The training examples are cut once into fixed batches (similar lengths together), so
the mismatched rows are fixed too and their reference log-probs are computed once with the others
(``ref_logps.pt``); each epoch visits the batches in a new seeded order.

The loop reads top to bottom as numbered steps, like :func:`heed.train.dpo.train_dpo`.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from heed.algos.losses import kto_loss
from heed.algos.ops import masked_sum
from heed.config.kto import KTOConfig, KTOLossConfig
from heed.data.collate import Encoded, length_grouped_batches, pad_batch
from heed.data.records import (
    ParseOptions,
    Prompt,
    UnpairedExample,
    load_records,
    load_train_and_eval,
)
from heed.data.templating import use_chat
from heed.data.unpaired import (
    EncodedUnpaired,
    UnpairedCounts,
    encode_unpaired,
    kl_partners,
    unpair,
    warn_counts,
)
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
    sample_and_kl,
    save_ref_cache,
    write_samples,
)

RECOMMENDED_RATIO = (1.0, 4.0 / 3.0)  # λ_D·n_D / (λ_U·n_U), recommended by the KTO paper


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def load_feedback(
    cfg: KTOConfig,
) -> tuple[list[UnpairedExample], list[UnpairedExample], UnpairedCounts, UnpairedCounts]:
    """Read and validate every record, hold out prompts for eval, turn preference records into thumbs."""
    from heed.data.split import split_by_prompt

    d = cfg.data
    opts = ParseOptions(allow_negative_weights=d.allow_negative_weights)
    train, held = load_train_and_eval(d, "unpaired", opts, d.max_length)
    if not d.eval:  # by prompt, so answers to one prompt never sit on both sides
        train, held = split_by_prompt(train, d.eval_split, cfg.train.seed)
    train_examples, train_counts = unpair(train)
    eval_examples, eval_counts = unpair(held)
    return train_examples, eval_examples, train_counts, eval_counts


def weight_advice(
    n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str | None:
    """One line when λ_D·n_D / (λ_U·n_U) lies outside the KTO paper's recommended [1, 4/3]
    (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306), with the ranges of either weight
    that would bring it back (change one, not both); None when it is inside, or one side is empty."""
    if not n_desirable or not n_undesirable:
        return None
    lo, hi = RECOMMENDED_RATIO
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if lo <= ratio <= hi + 1e-9:
        return None
    d_lo = lo * undesirable_weight * n_undesirable / n_desirable
    u_hi = desirable_weight * n_desirable / (lo * n_undesirable)
    return (
        f"loss.desirable_weight={desirable_weight:g}, loss.undesirable_weight={undesirable_weight:g}: with "
        f"{n_desirable} thumbs up and {n_undesirable} thumbs down, λ_D·n_D / (λ_U·n_U) = {ratio:.2f}, outside "
        f"the KTO paper's recommended [1, 4/3]; set loss.desirable_weight in [{d_lo:.2f}, {d_lo * hi:.2f}] "
        f"or loss.undesirable_weight in [{u_hi / hi:.2f}, {u_hi:.2f}]"
    )


def warn_weights(cfg: KTOLossConfig, counts: UnpairedCounts) -> None:
    """One warning when the weights fall outside the paper's range for this data (:func:`weight_advice`)."""
    advice = weight_advice(counts.desirable, counts.undesirable, cfg.desirable_weight, cfg.undesirable_weight)
    if advice:
        warnings.warn(advice, stacklevel=2)


def fixed_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """The training examples cut once into batches of similar lengths (seeded); a batch of one, which
    would have no mismatched pair for the KL estimate, joins the batch before it."""
    batches = length_grouped_batches(lengths, batch_size, seed)
    out: list[list[int]] = []
    for b in batches:
        if len(b) == 1 and out:
            out[-1] = out[-1] + b
        else:
            out.append(b)
    return out


def plan_batches(batches: list[list[int]], seed: int, epoch: int) -> list[list[int]]:
    """The fixed batches in the order of one epoch, deterministic in (seed, epoch) for exact resume."""
    order = list(range(len(batches)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [batches[i] for i in order]


def eval_batches(n: int, batch_size: int) -> list[list[int]]:
    """Held-out examples in file order, cut into batches of the training batch size (TRL's pairing);
    a last batch of one joins the one before it."""
    out = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) == 1:
        last = out.pop()
        out[-1] = out[-1] + last
    return out


def data_fingerprint(*sets: tuple[EncodedUnpaired, list[int]]) -> str:
    h = hashlib.sha256()
    for data, partners in sets:
        h.update(f"n={len(data)};".encode())
        h.update(repr((data.prompts, data.answers, partners)).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# log-probs
# ---------------------------------------------------------------------------------------------
def row_logps(model: Any, rows: Sequence[Encoded], pad_id: int, device: Any) -> torch.Tensor:
    """Summed log-probs (b,) of each row's answer tokens, one right-padded forward."""
    from heed.models.lm import sequence_logprobs

    ids, att, mask = (t.to(device) for t in pad_batch(rows, pad_id))
    mask[:, 0] = False  # the first token is never predicted
    token_logps, _ = sequence_logprobs(model, ids, att, mask)  # (b, T)
    return masked_sum(token_logps, mask, dim=-1)


def both_logps(
    model: Any, data: EncodedUnpaired, partners: Sequence[int], idx: Sequence[int], pad_id: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (b,) of the examples ``idx`` and of their KL rows, from one forward that runs
    each prompt once (its own answer and its mismatched answer packed behind it, as DPO's pairs)."""
    ids, att, mask = (
        t.to(device) for t in collate_pairs(data.rows(idx), [data.row(i, partners[i]) for i in idx], pad_id)
    )
    lp = pair_logps(model, ids, att, mask)
    main, kl = lp.halves(lp.logps)
    return main, kl


@torch.inference_mode()
def reference_table(
    model: Any,
    data: EncodedUnpaired,
    partners: Sequence[int],
    pad_id: int,
    batch_size: int,
    desc: str = "reference",
    progress: bool = False,
) -> torch.Tensor:
    """Reference log-probs of every example and of its KL row, (N, 2): [example, KL row]."""
    from heed.models.lora import adapter_disabled

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    lengths = data.lengths()
    order = sorted(range(len(data)), key=lambda i: lengths[i])  # similar lengths, less padding
    table = torch.zeros((len(data), 2), dtype=torch.float32)
    starts = range(0, len(order), batch_size)
    with StepProgress(desc, len(starts), enabled=progress) as bar:
        for start in starts:
            idx = order[start : start + batch_size]
            with adapter_disabled(model):  # a LoRA policy's reference is its base model
                main, kl = both_logps(model, data, partners, idx, pad_id, device)
            table[idx] = torch.stack([main.float().cpu(), kl.float().cpu()], dim=-1)
            bar.advance(1)
    model.train(was_training)
    return table


def reference_logps(
    idx: Sequence[int],
    table: torch.Tensor | None,
    ref_model: Any | None,
    data: EncodedUnpaired,
    partners: Sequence[int],
    pad_id: int,
    device: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs (b,) of the examples ``idx`` and of their KL rows: from the precomputed
    table, or a forward of the reference model now."""
    if table is not None:
        rows = table[list(idx)].to(device)
        return rows[:, 0], rows[:, 1]
    assert ref_model is not None
    from heed.models.lora import adapter_disabled

    ref_dev = next(ref_model.parameters()).device  # the CPU with offload_ref
    with torch.inference_mode(), adapter_disabled(ref_model):
        main, kl = both_logps(ref_model, data, partners, idx, pad_id, ref_dev)
        return main.to(device).clone(), kl.to(device).clone()


# ---------------------------------------------------------------------------------------------
# the loss and its statistics
# ---------------------------------------------------------------------------------------------
def kto_terms(
    cfg: KTOLossConfig,
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl: float | torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example KTO loss (b,) and detached sums for the log: implicit rewards β·r and log-probs
    of the thumbs-up and thumbs-down answers, and their counts (divided once the step is summed)."""
    losses, rewards = kto_loss(
        policy_logps, ref_logps, labels, kl, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight
    )
    up = labels.to(rewards.dtype)
    down = 1 - up
    lp = policy_logps.detach()
    sums = {
        "n_desirable": up.sum(),
        "n_undesirable": down.sum(),
        "reward_desirable": (rewards * up).sum(),
        "reward_undesirable": (rewards * down).sum(),
        "logps_desirable": (lp * up).sum(),
        "logps_undesirable": (lp * down).sum(),
    }
    return losses, sums


def class_means(sums: dict[str, float], prefix: str) -> dict[str, float]:
    """Per-class means of :func:`kto_terms`' sums (a class absent from the batch is left out) and the
    margin between the classes' mean rewards."""
    out = {}
    for cls in ("desirable", "undesirable"):
        n = sums.get(f"n_{cls}", 0.0)
        if n > 0:
            out[f"{prefix}/reward_{cls}"] = sums[f"reward_{cls}"] / n
            out[f"{prefix}/logps_{cls}"] = sums[f"logps_{cls}"] / n
    if f"{prefix}/reward_desirable" in out and f"{prefix}/reward_undesirable" in out:
        out[f"{prefix}/margin"] = out[f"{prefix}/reward_desirable"] - out[f"{prefix}/reward_undesirable"]
    return out


def reward_auc(rewards: torch.Tensor, labels: torch.Tensor) -> float | None:
    """P(reward of a random thumbs-up answer > that of a random thumbs-down one), ties counting ½:
    how well the implicit reward orders the held-out answers (0.5 before training). None when a class is empty."""
    up, down = rewards[labels], rewards[~labels]
    if not len(up) or not len(down):
        return None
    diff = up.unsqueeze(1) - down.unsqueeze(0)  # (n_up, n_down)
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


# ---------------------------------------------------------------------------------------------
# evaluation and sampling
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def evaluate(
    model: Any,
    data: EncodedUnpaired,
    partners: Sequence[int],
    cfg: KTOLossConfig,
    pad_id: int,
    batch_size: int,
    ref_table: torch.Tensor | None,
    ref_model: Any | None,
) -> dict[str, float]:
    """Held-out loss, KL estimate, implicit rewards of thumbs up / down, their margin and AUC (``eval/*``).

    One reference point for the whole held-out set: the mean log-ratio of all its KL rows."""
    if not len(data):
        return {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pol, pol_kl, ref, ref_kl = [], [], [], []
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(start + batch_size, len(data))))
        main, kl = both_logps(model, data, partners, idx, pad_id, device)
        r_main, r_kl = reference_logps(idx, ref_table, ref_model, data, partners, pad_id, device)
        pol.append(main.float())
        pol_kl.append(kl.float())
        ref.append(r_main.float())
        ref_kl.append(r_kl.float())
    model.train(was_training)
    kl_est = (torch.cat(pol_kl) - torch.cat(ref_kl)).mean()
    labels = torch.tensor(data.labels, device=device)
    losses, sums = kto_terms(cfg, torch.cat(pol), torch.cat(ref), labels, kl_est)
    out = {"eval/loss": losses.mean().item(), "eval/kl": kl_est.item()}
    out.update(class_means({k: v.item() for k, v in sums.items()}, "eval"))
    auc = reward_auc(torch.cat(pol) - torch.cat(ref), labels)
    if auc is not None:
        out["eval/reward_auc"] = auc
    return out


def sample_prompts(cfg: KTOConfig, eval_data: EncodedUnpaired, train_data: EncodedUnpaired) -> list[Prompt]:
    """The prompts answered at the end: ``sample.prompts`` or the (distinct) prompts of the eval examples."""
    n = cfg.sample.num_prompts
    if cfg.sample.prompts:
        return [r.prompt for r in load_records(cfg.sample.prompts, "prompts")][:n]
    seen: dict[str, Prompt] = {}
    for ex in eval_data.examples or train_data.examples:
        seen.setdefault(repr(ex.prompt), ex.prompt)
    return list(seen.values())[:n]


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
@guard_run
def train_kto(cfg: KTOConfig, resume: bool = False) -> dict[str, Any]:
    """Run KTO; returns the final summary (also written to ``summary.json``)."""
    from heed.report.monitors import Monitor, append_alarms, resume_monitor

    # step 1. run folder, seed, processes, mixed precision
    accelerator, run, ckpt = start_run(cfg, cfg.out, cfg.train.seed, cfg.model.mixed_precision, resume)
    main = accelerator.is_main_process
    device = accelerator.device

    # step 2. data: validate every record, hold out prompts, preference records become thumbs
    train_examples, eval_examples, train_counts, eval_counts = load_feedback(cfg)
    if len(train_examples) < 2:
        raise DataError(
            f"{cfg.data.train}: KTO needs at least 2 training examples (the KL estimate pairs each prompt "
            f"with another example's answer), got {len(train_examples)}"
        )

    # step 3. policy (a checkpoint's weights when resuming; with LoRA, the base model plus a new
    # adapter or the checkpoint's adapter) and tokenizer; no dropout in policy or reference passes
    ref_path = cfg.ref_model or cfg.model.path
    model, tokenizer, train_mode = load_policy(cfg, ckpt, device)
    pad_id = tokenizer.pad_token_id
    chat = use_chat(tokenizer, cfg.data.chat)

    # step 4. tokenize prompt + answer; cut the training set once into batches, which fixes each
    # example's KL row (its prompt with the batch's previous answer)
    train_data = encode_unpaired(tokenizer, train_examples, chat, cfg.data.max_length, train_counts)
    eval_data = encode_unpaired(tokenizer, eval_examples, chat, cfg.data.max_length, eval_counts)
    if main:
        warn_counts(str(cfg.data.train), train_counts, cfg.data.max_length)
        warn_counts(str(cfg.data.eval or f"{cfg.data.train} (eval split)"), eval_counts, cfg.data.max_length)
        warn_weights(cfg.loss, train_counts)
    if len(train_data) < 2:
        raise DataError(
            f"{cfg.data.train}: fewer than 2 examples left (see the warnings above); raise data.max_length"
        )
    fixed = fixed_batches(train_data.lengths(), cfg.train.batch_size, cfg.train.seed)
    partners = {
        "train": kl_partners(fixed, len(train_data)),
        "eval": kl_partners(eval_batches(len(eval_data), cfg.train.batch_size), len(eval_data)),
    }

    # step 5. reference log-probs of the examples and their KL rows: once (cached), or per batch
    ref_model = None
    ref_tables: dict[str, torch.Tensor] = {}
    t_ref = time.time()

    def load_ref() -> Any:
        return load_reference(cfg, model, device)

    if cfg.train.precompute_ref:
        key = (
            f"kto:{model_fingerprint(ref_path)}:"
            f"{data_fingerprint((train_data, partners['train']), (eval_data, partners['eval']))}"
        )
        cached = load_ref_cache(run, key)
        if cached is not None:
            ref_tables = {"train": cached["train"], "eval": cached["eval"]}
        else:
            # before the first step the policy *is* the reference: no second copy is needed
            same = ckpt is None and cfg.ref_model is None
            ref = model if same else load_ref()
            ref_tables = {
                name: reference_table(
                    ref,
                    data,
                    partners[name],
                    pad_id,
                    cfg.train.eval_batch_size,
                    f"reference ({name})",
                    progress=cfg.log.progress and main,
                )
                for name, data in (("train", train_data), ("eval", eval_data))
            }
            if main:
                save_ref_cache(run, key, ref_tables)
            del ref
    else:
        ref_model = load_ref()
    ref_seconds = time.time() - t_ref

    # step 6. optimizer, schedule, step plan
    steps_per_epoch = len(fixed)
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
            partners["eval"],
            cfg.loss,
            pad_id,
            cfg.train.eval_batch_size,
            ref_tables.get("eval"),
            ref_model,
        )
        if ev:
            logger.log(step, ev, split="eval")
            alarms.extend(monitor.update(step, ev))
        return ev

    # step 7. the loop: per step the batch's KL reference point (no gradient), then the loss
    model.train(train_mode)
    seen, tokens_seen, t0 = 0, 0, time.time()
    last: dict[str, float] = {}
    batches = EpochPlan(lambda epoch: plan_batches(fixed, cfg.train.seed, epoch), steps_per_epoch)
    cadence = Cadence.of(cfg.log, total_steps)
    sums: dict[str, torch.Tensor] = {}
    ref_now: dict[int, torch.Tensor] = {}  # reference log-probs of this step's examples
    z0 = torch.zeros((), device=device)

    def kl_point(mine: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ over this process's KL rows of log π − log π_ref, and their count."""
        total = torch.zeros((), device=device, dtype=torch.float64)
        policy = accelerator.unwrap_model(model)
        for chunk in micro_batches(mine, micro):
            with torch.no_grad(), accelerator.autocast():
                pol_kl = row_logps(
                    policy, [train_data.row(i, partners["train"][i]) for i in chunk], pad_id, device
                )
            ref_main, ref_kl = reference_logps(
                chunk, ref_tables.get("train"), ref_model, train_data, partners["train"], pad_id, device
            )
            ref_now.update(zip(chunk, ref_main, strict=True))
            total += (pol_kl.double() - ref_kl.double()).sum()
        return total, torch.tensor(float(len(mine)), device=device, dtype=torch.float64)

    def loss_of(idx: Sequence[int]) -> torch.Tensor:
        nonlocal tokens_seen
        rows = train_data.rows(idx)
        policy = row_logps(model, rows, pad_id, device)  # (b,)
        ref = torch.stack([ref_now[i] for i in idx]).to(policy.dtype)
        labels = torch.tensor([train_data.labels[i] for i in idx], device=device)
        losses, stats = kto_terms(cfg.loss, policy, ref, labels, z0)
        weights = torch.tensor([train_data.weights[i] for i in idx], device=device, dtype=losses.dtype)
        for k, v in stats.items():
            sums[k] = sums.get(k, torch.zeros((), device=device)) + v
        tokens_seen += sum(sum(m) for _, m in rows)
        # every example of the optimizer step counts equally, whatever the micro-batching or process count
        return (weights * losses).sum() / len(batch) * world

    with StepProgress("kto", total_steps, enabled=cfg.log.progress and main, start=start_step) as bar:
        for step in range(start_step, total_steps):
            batch = batches.batch(step)
            check_batch_weight(
                [train_data.weights[i] for i in batch],
                [train_data.examples[i].where for i in batch],
                step + 1,
            )
            mine = batch[rank::world]
            # step 7a. z_0: the mean log-ratio of the batch's mismatched rows over every process
            ref_now.clear()
            kl_sum, kl_count = kl_point(mine)
            kl_mean = accelerator.reduce(kl_sum, reduction="sum") / accelerator.reduce(
                kl_count, reduction="sum"
            )
            z0 = kl_mean.float()
            # step 7b. the KTO loss, averaged over the global batch
            sums.clear()
            sums["loss"] = accumulate(accelerator, model, micro_batches(mine, micro), loss_of) / world
            reduced = {k: accelerator.reduce(v, reduction="sum").item() for k, v in sums.items()}
            figures = optimizer_step(
                accelerator,
                model.parameters(),
                optimizer,
                scheduler,
                cfg.optim.max_grad_norm,
                reduced["loss"],
                step + 1,
                "KTO loss",
            )
            seen += len(batch)
            done = step + 1
            last = {
                "loss": reduced.pop("loss"),
                "kto/kl": kl_mean.item(),
                **class_means(reduced, "kto"),
                "kto/desirable_frac": reduced["n_desirable"] / len(batch),
                **figures,
            }
            if cadence.log(done):
                elapsed = time.time() - t0
                logger.log(
                    done,
                    {
                        **last,
                        "epoch": batches.epoch(done),
                        "examples_per_s": seen / max(elapsed, 1e-9),
                        "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                    },
                )
            if cadence.eval(done) and main:
                ev = eval_now(done)
                if "eval/margin" in ev:
                    bar.log(f"step {done}: eval/margin={ev['eval/margin']:.3f} eval/kl={ev['eval/kl']:.3f}")
            if cadence.save(done):
                checkpoint(
                    accelerator, run, done, model, tokenizer, optimizer, scheduler, cfg.log.keep_checkpoints
                )
            bar.advance(1, {"loss": last["loss"], "kl": last["kto/kl"]})
    train_seconds = time.time() - t0

    # step 8. final evaluation, samples with KL to the reference, model and summary
    accelerator.wait_for_everyone()
    summary: dict[str, Any] = {"algo": "kto", "steps": total_steps, **last}
    if main:
        unwrapped = accelerator.unwrap_model(model)
        summary.update(eval_now(total_steps))
        if cfg.sample.num_prompts:
            prompts = sample_prompts(cfg, eval_data, train_data)
            ref = ref_model if ref_model is not None else load_ref()
            spec = SampleSpec(
                cfg.sample.num_samples,
                cfg.sample.temperature,
                cfg.sample.max_new_tokens,
                cfg.train.seed,
                cfg.train.eval_batch_size,
            )
            result = sample_and_kl(unwrapped, ref, tokenizer, prompts, chat, spec, policy_name="kto")
            del ref
            logger.log(total_steps, result.metrics, split="eval")
            alarms.extend(monitor.update(total_steps, result.metrics, result.texts["kto"]))
            summary.update(result.metrics)
            write_samples(run / "samples.jsonl", result, cfg.sample.num_samples, total_steps)
        save_final(unwrapped, tokenizer, run / "final")
        append_alarms(run, alarms)
        summary.update(
            {
                "examples_per_s": seen / max(train_seconds, 1e-9),
                "tokens_per_s": tokens_seen / max(train_seconds, 1e-9),
                "train_seconds": train_seconds,
                "ref_seconds": ref_seconds,
                "peak_memory_mb": peak_memory_mb(),
                "train_examples": len(train_data),
                "eval_examples": len(eval_data),
                **train_counts.as_dict("data/train"),
                **eval_counts.as_dict("data/eval"),
                "alarms": len(alarms),
            }
        )
        write_json(run / "summary.json", summary)
        logger.close()
    return summary

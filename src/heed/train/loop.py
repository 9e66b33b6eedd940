"""The loop skeleton every trainer shares; each trainer supplies only its batch and its loss.

A trainer's loop reads::

    plan = EpochPlan(lambda epoch: plan_batches(..., epoch), steps_per_epoch)
    cadence = Cadence.of(cfg.log, total_steps)
    for step in range(start_step, total_steps):
        batch = plan.batch(step)
        loss = accumulate(accelerator, model, micro_batches(mine, micro), loss_of)   # the trainer's loss
        figures = optimizer_step(accelerator, params, optimizer, scheduler, cfg.optim.max_grad_norm,
                                 reduced_loss, step + 1, "DPO loss")
        done = step + 1
        if cadence.log(done): ...
        if cadence.eval(done): ...
        if cadence.save(done): checkpoint(...)
    save_final(accelerator, model, tokenizer, run / "final")

Every reduction that makes several processes and micro-batches equal one big batch (the loss
divided by the global batch's count, times the process count, because DDP averages gradients)
stays in the trainer's ``loss_of``, next to the loss it scales.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from heed.train.common import check_finite, save_checkpoint

T = TypeVar("T")


def micro_batches(items: Sequence[T], size: int) -> list[Sequence[T]]:
    """Consecutive chunks of at most ``size`` items (no chunk when ``items`` is empty)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def sync_context(accelerator: Any, model: Any, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """DDP's ``no_sync`` for every micro-batch but the last: gradients are averaged across processes
    once per optimizer step, on the last backward, instead of after every micro-batch."""
    if sync or accelerator.num_processes == 1:
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


def accumulate(
    accelerator: Any, model: Any, chunks: Sequence[T], loss_of: Callable[[T], torch.Tensor]
) -> torch.Tensor:
    """Backward through ``loss_of(chunk)`` for every micro-batch, synchronising on the last one.

    ``loss_of`` returns this chunk's share of the step's loss, already scaled so that the sum over
    chunks and processes is the step's loss. Returns the detached sum over this process's chunks."""
    total = torch.zeros((), device=accelerator.device)
    for i, chunk in enumerate(chunks):
        with sync_context(accelerator, model, i == len(chunks) - 1), accelerator.autocast():
            loss = loss_of(chunk)
            accelerator.backward(loss)
        total += loss.detach()
    return total


def optimizer_step(
    accelerator: Any,
    params: Iterable[torch.nn.Parameter],
    optimizer: Any,
    scheduler: Any,
    max_grad_norm: float | None,
    loss: float,
    step: int,
    source: str,
) -> dict[str, float]:
    """The end of every optimizer step: stop on a non-finite ``loss`` (naming ``source`` and the
    1-based ``step``; the last checkpoint stays intact), clip the gradient norm (stopping, before any
    weight changes, when it is not finite), step the optimizer and the schedule, clear the gradients.
    Returns ``{"lr", "grad_norm"?}`` for the log."""
    check_finite(loss, step, source)
    params = list(params)
    for p in params:  # a tied embedding's lookup gradient when the LM head sent none (heed.models.lm)
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()
    figures: dict[str, float] = {}
    if max_grad_norm is not None:
        figures["grad_norm"] = float(accelerator.clip_grad_norm_(params, max_grad_norm))
        check_finite(figures["grad_norm"], step, "gradient norm")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    figures["lr"] = scheduler.get_last_lr()[0]
    return figures


@dataclass(frozen=True)
class Cadence:
    """When a step logs, evaluates and saves (``done`` is the number of finished steps).

    The last step always logs; evaluation and checkpoints skip it, because the final evaluation
    and ``final/`` follow the loop. An interval of 0 (or None) switches that action off."""

    total: int
    log_every: int = 1
    eval_every: int | None = 0
    save_every: int | None = 0

    @classmethod
    def of(cls, log: Any, total: int) -> Cadence:
        """From a config's ``log:`` section (``log_every``, ``eval_every``, ``save_every``)."""
        return cls(total, log.log_every, log.eval_every, log.save_every)

    def log(self, done: int) -> bool:
        return done == self.total or (self.log_every > 0 and done % self.log_every == 0)

    def eval(self, done: int) -> bool:
        return bool(self.eval_every) and done % self.eval_every == 0 and done != self.total

    def save(self, done: int) -> bool:
        return bool(self.save_every) and done % self.save_every == 0 and done != self.total


@dataclass
class EpochPlan(Generic[T]):
    """The batches of step ``s``: ``plan(epoch)[s % steps_per_epoch]``, one epoch planned at a time.

    ``plan`` must be a pure function of the epoch (seeded), so a resumed run sees the batches the
    uninterrupted run would have seen."""

    plan: Callable[[int], list[T]]
    steps_per_epoch: int
    _cached: dict[int, list[T]] = field(default_factory=dict)

    def batch(self, step: int) -> T:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch not in self._cached:
            self._cached = {epoch: self.plan(epoch)}
        return self._cached[epoch][pos]

    def epoch(self, done: int) -> float:
        """Epochs finished after ``done`` steps, as a fraction."""
        return done / self.steps_per_epoch


def checkpoint(
    accelerator: Any,
    run: Path,
    done: int,
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    keep: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Every process waits; the main process writes ``checkpoints/step-{done}/`` (atomically)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(
            run,
            done,
            accelerator.unwrap_model(model),
            tokenizer,
            optimizer,
            scheduler,
            extra=extra,
            keep=keep,
        )


def save_final(model: Any, tokenizer: Any, out: Path) -> Path:
    """Write ``final/`` (Hugging Face format, atomically), with the tokenizer's pad and EOS ids in the
    generation config so that plain ``generate`` stops where Heed's sampler stops."""
    from heed.models.loading import save_pretrained

    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tokenizer.pad_token_id
        gen.eos_token_id = tokenizer.eos_token_id
    return save_pretrained(model, tokenizer, out)

"""The few collectives heed rl needs on several processes, as one small object.

:mod:`heed.algos` stays pure (batch statistics of the tensors it is given); the trainer computes
the global statistics here (sums and counts all-reduced across processes) and hands them in.
With one process every method is the identity and no collective is issued, so a one-process run
computes exactly what it did before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from heed import algos


@dataclass
class Collective:
    """``world`` processes, this one being ``rank`` (0 is the main process)."""

    world: int = 1
    rank: int = 0

    @classmethod
    def of(cls, accelerator: Any) -> Collective:
        return cls(accelerator.num_processes, accelerator.process_index)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Σ over processes of ``x`` (a new tensor; float64 sums are kept in float64)."""
        if self.world == 1:
            return x
        import torch.distributed as dist

        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (picklable objects; small ones: per-answer rows)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average ``.grad`` over processes in place: what DDP does for the parameters it wraps, done by
        hand for the value head / critic, which sit outside the DDP-wrapped policy. Parameters without a
        gradient (a critic's unused LM head) have none on every process and are skipped."""
        if self.world == 1:
            return
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        pos = 0
        for g in grads:
            g.copy_(flat[pos : pos + g.numel()].view_as(g))
            pos += g.numel()

    def broadcast(self, params: list[torch.nn.Parameter]) -> None:
        """Copy the main process's values of ``params`` to every process (DDP does this for the policy)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


def global_moments(
    x: torch.Tensor, mask: torch.Tensor, coll: Collective
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of the valid entries of ``x`` over every process's batch.

    mean = Σ_p Σ_{mask} x / Σ_p #mask, then var = Σ_p Σ_{mask} (x − mean)² / (n − 1), two all-reduces
    (the two-pass form :func:`heed.algos.masked_var` uses, not Σx² − n·mean²). Variance 0 when n ≤ 1.
    Shapes: ``x``, ``mask`` (N, T) on each process; returns two scalars.
    """
    m = mask.bool()
    n = coll.sum(m.sum().to(x.dtype))
    mean = coll.sum(algos.masked_sum(x, m)) / n.clamp(min=1)
    sq = coll.sum(algos.masked_sum((x - mean) ** 2, m))
    var = torch.where(n > 1, sq / (n - 1).clamp(min=1), torch.zeros_like(sq))
    return mean, var


def global_whiten(
    x: torch.Tensor, mask: torch.Tensor, coll: Collective, shift_mean: bool = True
) -> torch.Tensor:
    """:func:`heed.algos.whiten` with the mean and variance of the whole (all-process) batch."""
    if coll.world == 1:
        return algos.whiten(x, mask, shift_mean=shift_mean)
    mean, var = global_moments(x, mask, coll)
    return algos.whiten(x, mask, shift_mean=shift_mean, mean=mean, var=var)


def global_mean(x: torch.Tensor, mask: torch.Tensor, coll: Collective) -> float:
    """Σ_p Σ_{mask} x / Σ_p #mask: :func:`heed.algos.masked_mean` over every process's batch (0 when empty)."""
    m = mask.bool()
    total = coll.sum(algos.masked_sum(x, m))
    count = coll.sum(m.sum().to(total.dtype))
    return float(total / count.clamp(min=1))

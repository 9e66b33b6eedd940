"""The shared loop skeleton: cadence, epoch plans, accumulation that equals one big batch, the
optimizer step's finite check and clipping."""

from __future__ import annotations

import pytest
import torch

from heed.errors import TrainingDivergedError
from heed.train.common import make_accelerator
from heed.train.loop import Cadence, EpochPlan, accumulate, micro_batches, optimizer_step


def test_cadence_logs_last_step_and_skips_eval_and_save_there() -> None:
    c = Cadence(total=10, log_every=3, eval_every=4, save_every=5)
    assert [d for d in range(1, 11) if c.log(d)] == [3, 6, 9, 10]
    assert [d for d in range(1, 11) if c.eval(d)] == [4, 8]
    assert [d for d in range(1, 11) if c.save(d)] == [5]  # 10 is the last step: final/ follows
    off = Cadence(total=4, log_every=2, eval_every=0, save_every=None)
    assert not any(off.eval(d) or off.save(d) for d in range(1, 5))


def test_epoch_plan_plans_each_epoch_once() -> None:
    calls: list[int] = []

    def plan(epoch: int) -> list[list[int]]:
        calls.append(epoch)
        return [[epoch, 0], [epoch, 1]]

    p = EpochPlan(plan, steps_per_epoch=2)
    assert [p.batch(s) for s in range(4)] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert calls == [0, 1]
    assert p.epoch(3) == 1.5


def test_micro_batches() -> None:
    assert micro_batches([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert micro_batches([], 3) == []


def test_accumulate_equals_one_big_batch() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(7, 3), torch.randn(7)
    acc = make_accelerator("no")

    def grads(chunk_size: int) -> tuple[list[torch.Tensor], float]:
        model = torch.nn.Linear(3, 1)
        torch.nn.init.constant_(model.weight, 0.5)
        torch.nn.init.zeros_(model.bias)
        rows = list(range(7))

        def loss_of(chunk: list[int]) -> torch.Tensor:
            # this chunk's share of the mean squared error over all 7 rows
            pred = model(x[chunk]).squeeze(-1)
            return ((pred - y[chunk]) ** 2).sum() / len(rows)

        total = accumulate(acc, model, micro_batches(rows, chunk_size), loss_of)
        return [p.grad.clone() for p in model.parameters()], float(total)

    one, loss_one = grads(7)
    many, loss_many = grads(2)
    assert loss_one == pytest.approx(loss_many, rel=1e-6)
    for a, b in zip(one, many, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_optimizer_step_stops_on_nan_before_touching_the_weights() -> None:
    acc = make_accelerator("no")
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.ones(1, 2)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TrainingDivergedError, match=r"step 3: DPO loss is nan"):
        optimizer_step(acc, model.parameters(), opt, sched, 1.0, float("nan"), 3, "DPO loss")
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    # a finite loss: the gradient (norm √(1² + 1² + 1²) = √3) is clipped to 1, the step is taken
    figures = optimizer_step(acc, model.parameters(), opt, sched, 1.0, 0.5, 3, "DPO loss")
    assert figures["grad_norm"] == pytest.approx(3**0.5, rel=1e-5)
    assert figures["lr"] == pytest.approx(0.1)
    assert all(p.grad is None for p in model.parameters())
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))

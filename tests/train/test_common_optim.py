"""The optimizer every trainer uses: torch's fused AdamW on the CPU, the same steps as the plain one."""

from __future__ import annotations

import torch

from heed.config.base import OptimConfig
from heed.train.common import make_optimizer


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(5, 3, generator=gen)),
        torch.nn.Parameter(torch.randn(3, generator=gen)),
    ]


def test_cpu_parameters_get_the_fused_adamw_with_the_plain_adamw_steps() -> None:
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    fast, plain = _params(0), _params(0)
    opt = make_optimizer(fast, cfg)
    # the per-tensor loop torch defaults to on the CPU was most of a small model's optimizer time
    assert all(group["fused"] for group in opt.param_groups)
    reference = torch.optim.AdamW(
        [{"params": plain[:1], "weight_decay": 0.1}, {"params": plain[1:], "weight_decay": 0.0}],
        lr=1e-2,
        betas=cfg.betas,
        eps=cfg.eps,
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in fast]
        for p, q, g in zip(fast, plain, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        reference.step()
    for p, q in zip(fast, plain, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not torch.equal(fast[0], _params(0)[0])  # the parameters moved

"""heed.train.collective on one process: the identity, so a one-process run is unchanged.
(Two processes: tests/scale/test_processes.py, which compares 2-process RL runs with 1-process ones.)"""

from __future__ import annotations

import torch

from heed.algos import whiten
from heed.train.collective import Collective, global_mean, global_moments, global_whiten


def test_one_process_is_the_identity() -> None:
    coll = Collective()
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert coll.sum(x) is x and coll.gather({"a": 1}) == [{"a": 1}]
    # valid 1..5: mean 3, unbiased variance (4 + 1 + 0 + 1 + 4) / 4 = 2.5
    mean, var = global_moments(x, mask, coll)
    assert float(mean) == 3.0 and abs(float(var) - 2.5) < 1e-6
    assert global_mean(x, mask, coll) == 3.0
    assert torch.equal(global_whiten(x, mask, coll), whiten(x, mask))
    # the moments, passed in, give the same whitening as whiten's own
    assert torch.allclose(whiten(x, mask, mean=mean, var=var), whiten(x, mask), atol=1e-7)

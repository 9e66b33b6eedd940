"""heed.algos.ops: masked reductions, whitening, chunked log-softmax and entropy, aggregation."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import heed.algos
from heed.algos import (
    aggregate,
    entropy_from_logits,
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    selective_log_softmax,
    whiten,
)

T = torch.tensor
FAST = settings(max_examples=30, deadline=None)


def close(actual: torch.Tensor, expected, **kw) -> None:
    expected_t = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected_t, **kw)


# ---------------------------------------------------------------- masked reductions


X = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = T([[True, True, False], [False, False, False]])  # second row all masked


def test_masked_sum_and_mean_hand_values():
    # valid entries: 1, 2 -> sum 3, mean 1.5
    close(masked_sum(X, M), 3.0)
    close(masked_mean(X, M), 1.5)
    # per row: row 0 -> 1 + 2 = 3 (mean 1.5); row 1 has nothing valid -> 0, not NaN
    close(masked_sum(X, M, dim=-1), [3.0, 0.0])
    close(masked_mean(X, M, dim=-1), [1.5, 0.0])
    # per column: col 0 -> 1, col 1 -> 2, col 2 -> nothing
    close(masked_mean(X, M, dim=0), [1.0, 2.0, 0.0])


def test_mask_none_means_everything_counts():
    # 1+..+6 = 21, mean 3.5; row means 2 and 5
    close(masked_sum(X, None), 21.0)
    close(masked_mean(X, None), 3.5)
    close(masked_mean(X, None, dim=-1), [2.0, 5.0])


def test_float_mask_is_treated_as_bool_and_broadcasts():
    # a (2, 1) mask keeps the whole first row: mean(1, 2, 3) = 2
    close(masked_mean(X, T([[1.0], [0.0]])), 2.0)


def test_nan_in_padding_does_not_leak_into_value_or_gradient():
    x = T([1.0, float("nan"), 3.0], requires_grad=True)
    mask = T([True, False, True])
    out = masked_mean(x, mask)
    out.backward()
    close(out.detach(), 2.0)  # (1 + 3) / 2
    close(x.grad, [0.5, 0.0, 0.5])  # d mean / dx_i = 1/n on valid entries


def test_all_masked_gives_zero():
    close(masked_mean(X, torch.zeros_like(M)), 0.0)
    close(masked_var(X, torch.zeros_like(M)), 0.0)


def test_masked_var_hand_values():
    x = T([1.0, 2.0, 3.0, 4.0, 100.0])
    mask = T([True, True, True, True, False])
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    close(masked_var(x, mask), 5.0 / 3.0)  # unbiased: / (n - 1)
    close(masked_var(x, mask, unbiased=False), 5.0 / 4.0)
    # one valid entry: unbiased variance undefined -> 0; biased -> 0 exactly
    one = T([True, False, False, False, False])
    close(masked_var(x, one), 0.0)
    close(masked_var(x, one, unbiased=False), 0.0)


def test_masked_var_along_dim():
    x = T([[1.0, 3.0, 50.0], [2.0, 2.0, 2.0]])
    mask = T([[True, True, False], [True, True, True]])
    # row 0: mean 2, deviations ±1 -> unbiased 2/1 = 2; row 1: constant -> 0
    close(masked_var(x, mask, dim=-1), [2.0, 0.0])


@FAST
@given(
    data=st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=30),
    seed=st.integers(0, 2**16),
)
def test_masked_var_matches_torch_var_on_valid_entries(data, seed):
    x = T(data, dtype=torch.float64)
    mask = torch.rand(len(data), generator=torch.Generator().manual_seed(seed)) < 0.7
    kept = x[mask]
    expected = kept.var() if kept.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    close(masked_var(x, mask), expected.item(), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- whiten


def test_whiten_hand_values():
    x = T([2.0, 4.0, 6.0, 1000.0])
    mask = T([True, True, True, False])
    # valid: mean 4, unbiased var (4 + 0 + 4) / 2 = 4, std 2 -> (x - 4) / 2 = -1, 0, 1; padding -> 0
    close(whiten(x, mask), [-1.0, 0.0, 1.0, 0.0])
    # shift_mean=False only rescales: (x - 4) / 2 + 4 = 3, 4, 5
    close(whiten(x, mask, shift_mean=False), [3.0, 4.0, 5.0, 0.0])


def test_whiten_with_given_statistics():
    # a data-parallel trainer passes the global batch's mean 2 and variance 16 (std 4):
    # (x - 2) / 4 = 0, 0.5, 1 on the valid entries, whatever this shard's own statistics are
    x = T([2.0, 4.0, 6.0, 1000.0])
    mask = T([True, True, True, False])
    close(whiten(x, mask, eps=0.0, mean=T(2.0), var=T(16.0)), [0.0, 0.5, 1.0, 0.0])
    close(whiten(x, mask, shift_mean=False, eps=0.0, mean=T(2.0), var=T(16.0)), [2.0, 2.5, 3.0, 0.0])


def test_whiten_single_valid_element_and_constant_input_give_zero():
    # one valid value: x - mean = 0 and var = 0 -> 0 * rsqrt(eps) = 0 (no NaN, no blow-up)
    close(whiten(T([5.0, 7.0]), T([True, False])), [0.0, 0.0])
    close(whiten(T([3.0, 3.0, 3.0])), [0.0, 0.0, 0.0])


@FAST
@given(
    data=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=3, max_size=40),
    seed=st.integers(0, 2**16),
)
def test_whiten_gives_mean_zero_std_one(data, seed):
    x = T(data, dtype=torch.float64)
    mask = torch.rand(len(data), generator=torch.Generator().manual_seed(seed)) < 0.8
    kept = x[mask]
    if kept.numel() < 2 or kept.std() < 1e-2:
        return  # too few or (near-)constant values: no scale to normalise
    out = whiten(x, mask)
    assert torch.all(out[~mask] == 0)
    close(out[mask].mean(), 0.0, atol=1e-6, rtol=0)
    # out = (x − mean) / sqrt(var + eps), so its std is s / sqrt(s² + eps), not exactly 1 (eps = 1e-8)
    s = kept.std()
    close(out[mask].std(), float(s / torch.sqrt(s**2 + 1e-8)), atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------- selective_log_softmax


def reference_logprobs(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def test_selective_log_softmax_hand_value():
    # logits (0, ln 3): softmax = (1/4, 3/4)
    logits = T([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    out = selective_log_softmax(logits, T([[1, 0]]))
    close(out, [[math.log(0.75), math.log(0.25)]])


@FAST
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 7),
    v=st.integers(1, 40),
    chunk=st.integers(1, 25),
    seed=st.integers(0, 2**16),
)
def test_selective_log_softmax_matches_log_softmax_gather(b, t, v, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * 5).requires_grad_(True)
    index = torch.randint(0, v, (b, t), generator=g)
    out = selective_log_softmax(logits, index, chunk_size=chunk)
    expected = reference_logprobs(logits, index)
    close(out, expected.detach(), rtol=1e-5, atol=1e-5)
    # gradients agree too (hand-written chunked backward vs autograd)
    weights = torch.randn(b, t, generator=g)
    (grad,) = torch.autograd.grad((out * weights).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    close(grad, expected_grad, rtol=1e-5, atol=1e-6)


@FAST
@given(
    n=st.integers(1, 9),
    v=st.integers(1, 40),
    chunk=st.integers(1, 25),
    seed=st.integers(0, 2**16),
)
def test_selective_log_softmax_with_entropy_is_both_in_one_pass(n, v, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 5).requires_grad_(True)
    logits.data[0, 0] = -math.inf  # a masked vocabulary entry: p = 0 adds 0 to the entropy, not NaN
    index = torch.randint(1, v, (n,), generator=g) if v > 1 else torch.zeros(n, dtype=torch.long)
    if v == 1:
        logits.data[0, 0] = 0.0
    lp, ent = heed.algos.selective_log_softmax_with_entropy(logits, index, chunk_size=chunk)
    close(lp, selective_log_softmax(logits, index).detach(), rtol=1e-5, atol=1e-5)
    close(ent, entropy_from_logits(logits).detach(), rtol=1e-5, atol=1e-5)
    assert not ent.requires_grad  # a logged figure
    weights = torch.randn(n, generator=g)
    (grad,) = torch.autograd.grad((lp * weights).sum(), logits)
    (expected,) = torch.autograd.grad((reference_logprobs(logits, index) * weights).sum(), logits)
    close(grad, expected, rtol=1e-5, atol=1e-6)


def test_selective_log_softmax_gradcheck():
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 5, (2, 3))
    assert torch.autograd.gradcheck(lambda x: selective_log_softmax(x, index, chunk_size=2), (logits,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_log_softmax_half_precision_upcasts(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(2, 6, 50) * 8).to(dtype).requires_grad_(True)
    index = torch.randint(0, 50, (2, 6))
    out = selective_log_softmax(logits, index, chunk_size=4)
    assert out.dtype == torch.float32
    # same as the float32 computation on the (already rounded) half logits
    close(out, reference_logprobs(logits.detach(), index), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert logits.grad.dtype == dtype


def test_selective_log_softmax_keeps_no_float32_copy_of_half_logits_for_backward():
    # Autograd through logits.float() would save a float32 (B, T, V) tensor until backward;
    # record every tensor saved for backward and check none is that big in float32.
    b, t, v = 2, 8, 64
    logits = torch.randn(b, t, v).to(torch.bfloat16).requires_grad_(True)
    index = torch.randint(0, v, (b, t))

    def saved_float32_sizes(fn) -> list[int]:
        sizes: list[int] = []

        def pack(x):
            if x.dtype == torch.float32:
                sizes.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn()
        return sizes

    naive = saved_float32_sizes(lambda: reference_logprobs(logits, index))
    assert max(naive) >= b * t * v  # the hook does see the naive float32 copy
    chunked = saved_float32_sizes(lambda: selective_log_softmax(logits, index, chunk_size=4))
    assert max(chunked, default=0) <= b * t  # only the (B*T,) logsumexp


def test_selective_log_softmax_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="disagree"):
        selective_log_softmax(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------- entropy


def test_entropy_hand_values():
    # uniform over 4 -> ln 4; a distribution with one -inf logit over 2 -> point mass -> 0;
    # logits (0, ln 3) -> p = (1/4, 3/4): H = -(1/4 ln 1/4 + 3/4 ln 3/4)
    h = entropy_from_logits(T([[0.0, 0.0, 0.0, 0.0]]))
    close(h, [math.log(4.0)])
    h = entropy_from_logits(T([[0.0, float("-inf")]]))
    close(h, [0.0])
    h = entropy_from_logits(T([0.0, math.log(3.0)]))
    close(h, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


@FAST
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    v=st.integers(1, 30),
    chunk=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_entropy_matches_categorical(shape, v, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, v, generator=g) * 3).requires_grad_(True)
    h = entropy_from_logits(logits, chunk_size=chunk)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    close(h, expected.detach(), rtol=1e-5, atol=1e-5)
    weights = torch.randn(*shape, generator=g)
    (grad,) = torch.autograd.grad((h * weights).sum(), logits)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_entropy_gradcheck_and_half_precision():
    logits = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, chunk_size=5), (logits,))
    half = torch.randn(2, 3, 20).to(torch.bfloat16)
    h = entropy_from_logits(half, chunk_size=2)
    assert h.dtype == torch.float32
    close(h, torch.distributions.Categorical(logits=half.float()).entropy(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- aggregate


LOSS = T([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
LOSS_MASK = T([[True, True, True], [True, False, False], [False, False, False]])  # row 2: all padding


@pytest.mark.parametrize(
    ("mode", "norm", "expected"),
    [
        # valid tokens 1, 2, 3 | 4: (1 + 2 + 3 + 4) / 4 tokens
        ("token_mean", None, 2.5),
        # row means 2 and 4 (the empty row is left out) -> 3
        ("seq_mean_token_mean", None, 3.0),
        # row sums 6 and 4 -> 5
        ("seq_mean_token_sum", None, 5.0),
        # row sums / T=3: 2 and 4/3 -> 5/3
        ("seq_mean_token_sum_norm", None, 5.0 / 3.0),
        # row sums / 2: 3 and 2 -> 2.5
        ("seq_mean_token_sum_norm", 2.0, 2.5),
    ],
)
def test_aggregate_modes_hand_values(mode, norm, expected):
    close(aggregate(LOSS, LOSS_MASK, mode, norm=norm), expected)


def test_aggregate_mask_none_and_all_masked():
    # mask None: all 9 tokens -> (6 + 4 + 27) / 9
    close(aggregate(LOSS, None, "token_mean"), 37.0 / 9.0)
    loss = LOSS.clone().requires_grad_(True)
    out = aggregate(loss, torch.zeros_like(LOSS_MASK), "seq_mean_token_mean")
    close(out.detach(), 0.0)
    out.backward()  # still part of the graph: a step on an all-padding batch is a no-op, not a crash
    close(loss.grad, torch.zeros_like(LOSS))


def test_aggregate_gradient_weights_tokens_or_sequences():
    # token_mean: every valid token gets 1/4; seq_mean_token_mean: 1/2 per row split over its tokens
    loss = LOSS.clone().requires_grad_(True)
    aggregate(loss, LOSS_MASK, "token_mean").backward()
    close(loss.grad, [[0.25, 0.25, 0.25], [0.25, 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss.grad = None
    aggregate(loss, LOSS_MASK, "seq_mean_token_mean").backward()
    close(loss.grad, [[1 / 6, 1 / 6, 1 / 6], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_aggregate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(LOSS, LOSS_MASK, "mean")  # type: ignore[arg-type]


# ---------------------------------------------------------------- explained variance


def test_explained_variance_hand_values():
    returns = T([1.0, 2.0, 3.0, 4.0])
    # perfect critic -> 1; constant critic at the mean -> 0
    close(explained_variance(returns, returns), 1.0)
    close(explained_variance(T([2.5, 2.5, 2.5, 2.5]), returns), 0.0)
    # residual (0, 0, 0, 1): mean 1/4, var (3·1/16 + 9/16)/4 = 3/16; Var[returns] = 5/4
    # -> 1 - (3/16)/(5/4) = 1 - 0.15 = 0.85
    close(explained_variance(T([1.0, 2.0, 3.0, 3.0]), returns), 0.85)
    # masked entries are ignored: the bad prediction at index 4 does not count
    mask = T([True, True, True, True, False])
    close(explained_variance(T([1.0, 2.0, 3.0, 4.0, -50.0]), T([1.0, 2.0, 3.0, 4.0, 0.0]), mask), 1.0)


def test_explained_variance_constant_returns_is_nan():
    assert math.isnan(explained_variance(T([1.0, 2.0]), T([3.0, 3.0])).item())


# ---------------------------------------------------------------- light imports


def test_heed_algos_imports_only_torch():
    code = (
        "import sys, heed.algos\n"
        "heavy = [m for m in ('transformers', 'trl', 'fastapi', 'gymnasium', 'datasets', 'accelerate')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    src = str(Path(heed.algos.__file__).resolve().parents[2])  # the folder holding the heed package
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": src})

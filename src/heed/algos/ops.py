"""Masked reductions and log-prob helpers shared by every loss and trainer.

Conventions: time is the last dimension; ``mask`` is True where an entry counts
(``None`` means every entry counts). Reductions over zero valid entries give 0,
never NaN, so an all-padding row cannot poison a batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

AggregateMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
AGGREGATE_MODES: tuple[str, ...] = (
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
)

DEFAULT_CHUNK_SIZE = 256
"""Rows of ``(rows, V)`` logits processed at once: 256 rows of a 150k vocabulary is ~150 MB in float32."""

_Dim = int | tuple[int, ...] | None


def _bool_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    """``mask`` as a bool tensor broadcast to ``x`` (all True when ``mask`` is None)."""
    if mask is None:
        return torch.ones_like(x, dtype=torch.bool)
    return mask.to(device=x.device, dtype=torch.bool).expand_as(x)


def masked_sum(x: Tensor, mask: Tensor | None = None, dim: _Dim = None) -> Tensor:
    """Σ x over entries where ``mask`` is True.

    Masked-out entries are replaced by 0 before summing (not multiplied by 0), so
    NaN or inf in padding never leaks into the result or its gradient.
    Shapes: ``x`` (...), ``mask`` broadcastable to ``x``; result reduced over ``dim``
    (all dims when None).
    """
    m = _bool_mask(x, mask)
    kept = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def _count(x: Tensor, mask: Tensor | None, dim: _Dim) -> Tensor:
    m = _bool_mask(x, mask)
    return m.sum() if dim is None else m.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor | None = None, dim: _Dim = None) -> Tensor:
    """Σ_{mask} x / #mask over ``dim`` (all dims when None); 0 where nothing is valid.

    Shapes: ``x`` (...), ``mask`` broadcastable to ``x``.
    """
    total = masked_sum(x, mask, dim)
    count = _count(x, mask, dim)
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(x: Tensor, mask: Tensor | None = None, unbiased: bool = True, dim: _Dim = None) -> Tensor:
    """Variance of the valid entries of ``x``: Σ_{mask} (x − mean)² / (n − 1) (or / n when not unbiased).

    Returns 0 when there are too few valid entries to define it (n ≤ 1 unbiased, n = 0 biased).
    Shapes: ``x`` (...), ``mask`` broadcastable to ``x``; reduced over ``dim`` (all dims when None).
    """
    mean = masked_mean(x, mask, dim)
    if dim is not None:
        mean = mean.unsqueeze(dim) if isinstance(dim, int) else _unsqueeze_dims(mean, dim, x.dim())
    sq = masked_sum((x - mean) ** 2, mask, dim)
    count = _count(x, mask, dim).to(sq.dtype)
    denom = count - 1 if unbiased else count
    return torch.where(denom > 0, sq / denom.clamp(min=1), torch.zeros_like(sq))


def _unsqueeze_dims(t: Tensor, dims: tuple[int, ...], ndim: int) -> Tensor:
    for d in sorted(d % ndim for d in dims):
        t = t.unsqueeze(d)
    return t


def whiten(
    x: Tensor,
    mask: Tensor | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
    mean: Tensor | None = None,
    var: Tensor | None = None,
) -> Tensor:
    """Normalise the valid entries of ``x`` to mean 0 and (unbiased) std 1.

    out = (x − mean) / sqrt(var + eps) over entries where ``mask`` is True; with
    ``shift_mean=False`` the mean is added back (only the scale changes). Invalid
    entries are returned as 0. Statistics are over the whole tensor (the batch),
    as advantage whitening in PPO implementations does, unless ``mean`` and ``var``
    (scalars) are given: a data-parallel trainer passes those of the global batch.
    Shapes: ``x`` (...), ``mask`` broadcastable to ``x``; result like ``x``.
    """
    m = _bool_mask(x, mask)
    if mean is None or var is None:
        mean = masked_mean(x, m)
        var = masked_var(x, m, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, else the input's own floating dtype."""
    return torch.promote_types(dtype, torch.float32)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(logits)[index] one chunk of rows at a time, with a chunked hand-written backward.

    Only the logits (already in memory) and the index are saved for backward: autograd
    through ``.float()`` would keep a float32 copy of bf16 logits alive until backward.
    log_softmax/softmax are used rather than logsumexp because they are fused kernels
    (torch's CPU logsumexp is several times slower).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, index: Tensor, chunk_size: int) -> Tensor:  # type: ignore[override]
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)  # (N, V)
        flat_index = index.reshape(-1, 1).to(device=logits.device, dtype=torch.long)  # (N, 1)
        compute_dtype = _compute_dtype(logits.dtype)
        out = torch.empty(flat.shape[0], dtype=compute_dtype, device=logits.device)  # (N,)
        for start in range(0, flat.shape[0], chunk_size):
            end = start + chunk_size
            # (n, V): the only float32 log-softmax alive is this chunk's
            chunk_logp = torch.log_softmax(flat[start:end].to(compute_dtype), dim=-1)
            out[start:end] = chunk_logp.gather(-1, flat_index[start:end]).squeeze(-1)
        ctx.save_for_backward(logits, flat_index)
        ctx.chunk_size = chunk_size
        return out.reshape(index.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        logits, flat_index = ctx.saved_tensors
        return _selective_grad(logits, flat_index, grad_out, ctx.chunk_size), None, None


def _selective_grad(logits: Tensor, flat_index: Tensor, grad_out: Tensor, chunk_size: int) -> Tensor:
    """Gradient of log softmax(logits)[index] w.r.t. the logits, chunked: d log p_y / d l_v = 1[v = y] − p_v.
    ``logits`` (..., V), ``flat_index`` (N, 1), ``grad_out`` (...); returns (..., V)."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)  # (N, V)
    compute_dtype = _compute_dtype(logits.dtype)
    grad_flat = grad_out.reshape(-1, 1).to(compute_dtype)  # (N, 1)
    grad_logits = torch.empty_like(flat)
    for start in range(0, flat.shape[0], chunk_size):
        end = start + chunk_size
        g = grad_flat[start:end]
        chunk_grad = torch.softmax(flat[start:end].to(compute_dtype), dim=-1).mul_(-g)  # (n, V)
        chunk_grad.scatter_add_(-1, flat_index[start:end], g)
        grad_logits[start:end] = chunk_grad
    return grad_logits.reshape(logits.shape)


def _check_selective(logits: Tensor, index: Tensor, chunk_size: int) -> None:
    """The argument checks of :func:`selective_log_softmax` and its entropy variant."""
    if logits.shape[:-1] != index.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and index {tuple(index.shape)} disagree before the vocab dim"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def selective_log_softmax(logits: Tensor, index: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Log-probability of the chosen tokens: log p(index) = logits[index] − logsumexp(logits).

    Processes ``chunk_size`` rows at a time, so no float32 ``(B, T, V)`` log-softmax
    is ever materialised; bf16/fp16 logits are upcast to float32 one chunk at a time
    and the result is float32 (float64 for float64 logits). Differentiable with a
    chunked backward. Same quantity as TRL's ``selective_log_softmax``.
    Shapes: ``logits`` (..., V) e.g. (B, T, V); ``index`` (...) e.g. (B, T), int in [0, V).
    Returns (...) e.g. (B, T).
    """
    _check_selective(logits, index, chunk_size)
    return _SelectiveLogSoftmax.apply(logits, index, chunk_size)


class _SelectiveLogSoftmaxEntropy(torch.autograd.Function):
    """:class:`_SelectiveLogSoftmax` that also returns each row's entropy from the same log-softmax,
    without a gradient (a logged figure): one pass over the (n, V) chunk instead of two."""

    @staticmethod
    def forward(ctx, logits: Tensor, index: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)  # (N, V)
        flat_index = index.reshape(-1, 1).to(device=logits.device, dtype=torch.long)  # (N, 1)
        compute_dtype = _compute_dtype(logits.dtype)
        out = torch.empty(flat.shape[0], dtype=compute_dtype, device=logits.device)  # (N,)
        entropy = torch.empty_like(out)  # (N,)
        for start in range(0, flat.shape[0], chunk_size):
            end = start + chunk_size
            chunk_logp = torch.log_softmax(flat[start:end].to(compute_dtype), dim=-1)  # (n, V)
            out[start:end] = chunk_logp.gather(-1, flat_index[start:end]).squeeze(-1)
            entropy[start:end] = -_p_times(chunk_logp, chunk_logp).sum(-1)
        ctx.save_for_backward(logits, flat_index)
        ctx.chunk_size = chunk_size
        entropy = entropy.reshape(index.shape)
        ctx.mark_non_differentiable(entropy)
        return out.reshape(index.shape), entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, _grad_entropy: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        logits, flat_index = ctx.saved_tensors
        return _selective_grad(logits, flat_index, grad_out, ctx.chunk_size), None, None


def selective_log_softmax_with_entropy(
    logits: Tensor, index: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[Tensor, Tensor]:
    """:func:`selective_log_softmax` and, from the same chunked log-softmax, the entropy
    H = −Σ_v p_v log p_v of each row (:func:`entropy_from_logits`'s value, no gradient).
    Shapes: ``logits`` (..., V), ``index`` (...); returns two (...) tensors (float32 for half inputs)."""
    _check_selective(logits, index, chunk_size)
    return _SelectiveLogSoftmaxEntropy.apply(logits, index, chunk_size)


class _EntropyFromLogits(torch.autograd.Function):
    """H = −Σ_v p_v log p_v per row, chunked; dH/dl_v = −p_v (log p_v + H)."""

    @staticmethod
    def forward(ctx, logits: Tensor, chunk_size: int) -> Tensor:  # type: ignore[override]
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)  # (N, V)
        compute_dtype = _compute_dtype(logits.dtype)
        entropy = torch.empty(flat.shape[0], dtype=compute_dtype, device=logits.device)  # (N,)
        for start in range(0, flat.shape[0], chunk_size):
            end = start + chunk_size
            logp = torch.log_softmax(flat[start:end].to(compute_dtype), dim=-1)  # (n, V)
            entropy[start:end] = -_p_times(logp, logp).sum(-1)
        ctx.save_for_backward(logits, entropy)
        ctx.chunk_size = chunk_size
        return entropy.reshape(logits.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        logits, entropy = ctx.saved_tensors
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        compute_dtype = _compute_dtype(logits.dtype)
        grad_flat = grad_out.reshape(-1, 1).to(compute_dtype)
        grad_logits = torch.empty_like(flat)
        for start in range(0, flat.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            logp = torch.log_softmax(flat[start:end].to(compute_dtype), dim=-1)
            centered = logp + entropy[start:end, None]  # log p_v − E_p[log p]
            grad_logits[start:end] = -_p_times(logp, centered) * grad_flat[start:end]
        return grad_logits.reshape(logits.shape), None


def _p_times(logp: Tensor, x: Tensor) -> Tensor:
    """p·x with p = exp(logp), and 0 (not NaN) where p = 0 (logits of −inf, e.g. masked vocabulary)."""
    return torch.where(logp > -torch.inf, logp.exp() * x, torch.zeros((), dtype=x.dtype, device=x.device))


def entropy_from_logits(logits: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Entropy of the categorical distribution softmax(logits): H = logsumexp(l) − Σ_v softmax(l)_v · l_v.

    Chunked and upcast like :func:`selective_log_softmax`; differentiable.
    Shapes: ``logits`` (..., V); returns (...) in float32 (float64 for float64 logits).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _EntropyFromLogits.apply(logits, chunk_size)


def aggregate(
    loss: Tensor,
    mask: Tensor | None,
    mode: AggregateMode = "token_mean",
    norm: float | None = None,
) -> Tensor:
    """Reduce a per-token loss ``(B, T)`` to a scalar: the one place that picks token- vs sequence-mean.

    With m the mask and L_b = Σ_t m_bt·loss_bt, and S the rows with at least one valid token:

    - ``token_mean``: Σ_b L_b / Σ_bt m_bt (every token weighs the same; long answers weigh more).
    - ``seq_mean_token_mean``: mean_{b∈S} L_b / Σ_t m_bt (every sequence weighs the same; GRPO paper).
    - ``seq_mean_token_sum``: mean_{b∈S} L_b.
    - ``seq_mean_token_sum_norm``: mean_{b∈S} L_b / norm, ``norm`` defaulting to T (the padded
      length); a constant normaliser removes the length bias (Dr. GRPO, https://arxiv.org/abs/2503.20783).

    Rows without valid tokens are left out of sequence means; with no valid token at all the
    result is 0 (still connected to the graph). See also OpenRLHF's ``aggregate_loss``.
    """
    if loss.dim() < 1:
        raise ValueError("aggregate expects a loss with a time dimension, got a scalar")
    m = _bool_mask(loss, mask)
    if mode == "token_mean":
        return masked_mean(loss, m)
    seq_sum = masked_sum(loss, m, dim=-1)  # (B,)
    seq_len = m.sum(dim=-1)  # (B,)
    seq_valid = seq_len > 0
    if mode == "seq_mean_token_mean":
        per_seq = seq_sum / seq_len.clamp(min=1).to(seq_sum.dtype)
    elif mode == "seq_mean_token_sum":
        per_seq = seq_sum
    elif mode == "seq_mean_token_sum_norm":
        divisor = float(loss.shape[-1]) if norm is None else float(norm)
        if divisor <= 0:
            raise ValueError(f"aggregate norm must be > 0, got {norm}")
        per_seq = seq_sum / divisor
    else:
        raise ValueError(f"unknown aggregate mode {mode!r}; expected one of {', '.join(AGGREGATE_MODES)}")
    return masked_mean(per_seq, seq_valid)


@torch.no_grad()
def explained_variance(values: Tensor, returns: Tensor, mask: Tensor | None = None) -> Tensor:
    """1 − Var[returns − values] / Var[returns] over valid entries (a detached scalar).

    1 is a perfect critic, 0 no better than a constant, negative worse than a constant;
    NaN when the returns have zero variance (as CleanRL and Stable-Baselines3 report).
    Shapes: ``values``, ``returns`` (...) alike; ``mask`` broadcastable to them.
    """
    m = _bool_mask(returns, mask)
    var_returns = masked_var(returns, m, unbiased=False)
    var_residual = masked_var(returns - values, m, unbiased=False)
    nan = torch.full_like(var_returns, float("nan"))
    return torch.where(var_returns == 0, nan, 1 - var_residual / var_returns.where(var_returns != 0, 1))


@torch.no_grad()
def kendall_tau(scores: Tensor, ranks: Tensor, response_mask: Tensor) -> Tensor:
    """Kendall's τ_b between model scores and human ranks, one value per group (detached).

        τ_b = (C − D) / sqrt((n₀ − n₁)(n₀ − n₂))

    over the valid responses of a group: C / D count pairs ordered alike / oppositely by the
    scores and by the humans (a lower rank is better, so the human score is −rank), n₀ the
    number of pairs, n₁ the pairs tied in rank and n₂ the pairs tied in score
    (https://en.wikipedia.org/wiki/Kendall_rank_correlation_coefficient#Tau-b). A group
    where either side is all tied has no defined τ and gets 0.

    Shapes: ``scores`` (G, K), ``ranks`` (G, K), ``response_mask`` (G, K) True for real
    responses. Returns (G,).
    """
    valid = response_mask.to(device=scores.device, dtype=torch.bool)  # (G, K)
    k = scores.shape[-1]
    upper = torch.ones(k, k, dtype=torch.bool, device=scores.device).triu(diagonal=1)  # each pair once
    pairs = upper & valid.unsqueeze(-1) & valid.unsqueeze(-2)  # (G, K, K)
    s = torch.sign(scores.unsqueeze(-1) - scores.unsqueeze(-2))  # (G, K, K)
    h = torch.sign(ranks.unsqueeze(-2) - ranks.unsqueeze(-1)).to(s.dtype)  # (G, K, K): +1 if i ranked above j
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    numerator = torch.where(pairs, s * h, zero).sum(dim=(-2, -1))  # C − D
    n0 = pairs.sum(dim=(-2, -1)).to(s.dtype)
    n1 = (pairs & (h == 0)).sum(dim=(-2, -1)).to(s.dtype)
    n2 = (pairs & (s == 0)).sum(dim=(-2, -1)).to(s.dtype)
    denominator = ((n0 - n1) * (n0 - n2)).sqrt()
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-12), zero)


@torch.no_grad()
def top1_accuracy(scores: Tensor, ranks: Tensor, response_mask: Tensor) -> Tensor:
    """1.0 where the best-scored valid response of a group holds the group's best (lowest)
    rank, else 0.0 (a tie for first place counts any of the tied responses as right).

    Shapes: ``scores`` (G, K), ``ranks`` (G, K), ``response_mask`` (G, K). Returns (G,).
    """
    valid = response_mask.to(device=scores.device, dtype=torch.bool)  # (G, K)
    neg_inf = torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device)
    pick = torch.where(valid, scores, neg_inf).argmax(dim=-1, keepdim=True)  # (G, 1)
    big = torch.full((), float("inf"), dtype=torch.float64, device=scores.device)
    best_rank = torch.where(valid, ranks.to(torch.float64), big).amin(dim=-1)  # (G,)
    picked_rank = ranks.to(torch.float64).gather(-1, pick).squeeze(-1)  # (G,)
    return (picked_rank == best_rank).to(scores.dtype)


CDF_BLOCK = 256  # vocabulary block of the two-level inverse CDF
EXACT_CDF_MAX_VOCAB = 8192  # up to this vocabulary the CDF is one float64 prefix sum over V


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first token whose cumulative probability exceeds ``u`` x total: probs (B, V) float, u (B,)
    float64 in (0, 1) -> tokens (B,) int64.

    Accumulated in float64 (probabilities are float32, so a float32 running sum would drift by ~V x 1e-7
    and move the boundaries). Up to :data:`EXACT_CDF_MAX_VOCAB` tokens it is one prefix sum over V; above
    that, two levels: float64 masses of blocks of :data:`CDF_BLOCK` tokens, their prefix sum picks the block, and a
    prefix sum inside that block the token. A float64 prefix sum over V runs one element at a time on a
    CPU (23 ms for 64 x 32000), the block sums vectorise (4 ms); both orders agree to ~1e-16, so a draw
    changes only when ``u`` falls that close to a boundary. The path depends on V alone, never on the batch.
    """
    b, v = probs.shape
    if v <= EXACT_CDF_MAX_VOCAB:
        cdf = probs.cumsum(-1, dtype=torch.float64)  # (B, V)
        target = (u * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
        return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(v - 1)
    nb = -(-v // CDF_BLOCK)
    padded = torch.nn.functional.pad(probs, (0, nb * CDF_BLOCK - v)) if nb * CDF_BLOCK != v else probs
    blocks = padded.view(b, nb, CDF_BLOCK)  # (B, nb, CDF_BLOCK)
    upto = blocks.double().sum(-1).cumsum(-1)  # (B, nb) mass up to the end of each block
    target = (u * upto[:, -1]).unsqueeze(-1)  # (B, 1)
    blk = torch.searchsorted(upto, target, right=True).clamp_max(nb - 1)  # (B, 1)
    before = torch.where(blk > 0, upto.gather(-1, (blk - 1).clamp_min(0)), 0.0)  # (B, 1)
    inner = blocks.gather(1, blk.unsqueeze(-1).expand(b, 1, CDF_BLOCK)).squeeze(1)  # (B, CDF_BLOCK)
    cdf = inner.double().cumsum(-1) + before  # (B, CDF_BLOCK)
    j = torch.searchsorted(cdf, target, right=True).clamp_max(CDF_BLOCK - 1)  # (B, 1)
    return (blk * CDF_BLOCK + j).squeeze(-1).clamp_max(v - 1)

"""The policy forwards every trainer uses, and the packed layouts that run a prompt once.

:func:`policy_forward`: one forward over (prompt + completion) rows: token log-probs, entropies and,
with a shared value head, values — from a single trunk pass. Logits are computed only at response
positions, in chunks, and reduced at once to the sampled token's log-prob (gather − logsumexp,
:func:`heed.algos.ops.selective_log_softmax`); no float32 (B, T, V) log-softmax is ever held.

:func:`shared_prompt_forward` does the same for groups of K answers to one prompt with the prompt
computed once: each group becomes one packed sequence ``[prompt | answer 1 | ... | answer K]``
whose attention mask lets every answer see the prompt and itself only, with the positions each
answer would have on its own. The results equal :func:`policy_forward`'s up to float noise, for
``P + sum(len_k)`` tokens per group instead of ``K·(P + max len)``. RL uses it for the K answers of a
prompt; :func:`pair_logps` uses it for a preference pair's chosen and rejected answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from heed.algos.ops import masked_mean, masked_sum
from heed.data.collate import Encoded, pad_batch
from heed.models.lm import (
    forward_support,
    hidden_states,
    logprobs_from_hidden,
    sequence_logprobs,
    shared_prefix_mask,
)
from heed.models.value import ValueHead, values_at_targets


@dataclass
class TokenOutputs:
    """Per-token outputs aligned with ``input_ids`` (B, T); zero off the target mask."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None


def policy_forward(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    temperature: float = 1.0,
    value_head: ValueHead | None = None,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    chunk_size: int = 1024,
) -> TokenOutputs:
    """log π(token_t | prefix) at target positions (plus entropy and V(prefix) when asked).

    Shapes: ``input_ids``, ``attention_mask``, ``target_mask`` (B, T); returns (B, T) tensors.
    ``temperature`` divides the logits (the rollout's sampling temperature). Entropy carries a
    gradient only with ``entropy_grad`` (an entropy bonus).
    """
    hidden = hidden_states(model, input_ids, attention_mask)  # (B, T, H)
    logprobs, entropy = logprobs_from_hidden(
        model, hidden, input_ids, target_mask, temperature, with_entropy, entropy_grad, chunk_size
    )
    values = values_at_targets(value_head, hidden, target_mask) if value_head is not None else None
    return TokenOutputs(logprobs, entropy, values)


def can_share_prompt(model: Any) -> bool:
    """Whether :func:`shared_prompt_forward` gives this model's per-row results: whether a custom
    block mask with explicit positions (sliding windows built in) keeps sequences apart, as a probe
    forward against the plain one found (:func:`heed.models.lm.forward_support`, once per model and
    said once in the log when not). Not so for ALiBi models (Bloom builds its biases from a 2-D mask)
    or attention kernels that take no mask; those run row by row."""
    return forward_support(model).no_block_mask is None


def shared_prompt_forward(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    prompt_width: int,
    k: int,
    temperature: float = 1.0,
    value_head: ValueHead | None = None,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> TokenOutputs:
    """:func:`policy_forward` for rows in groups of ``k`` consecutive answers to one prompt, with the
    prompt run once per group.

    Rows are ``[left-padded prompt (P) | right-padded answer (C)]``: ``input_ids``, ``attention_mask``,
    ``target_mask`` (N, P + C), N = G·k, the k rows of a group sharing their prompt columns. Group g
    is packed as ``[prompt (n_g tokens) | answer 1 (l_1) | ... | answer k (l_k)]`` (right-padded to the
    longest group); token t of answer j sits at position n_g + t, as on its own; the (G, 1, L, L) mask
    allows key κ for query q when κ ≤ q and κ is in the prompt or in q's own answer (a padding
    query sees itself only), and on sliding-window layers when κ is less than the window back in q's own
    positions. A model that cannot take such a mask (:func:`can_share_prompt`) runs row by row. Returns (N, P + C) tensors like :func:`policy_forward`.
    """
    n, width = input_ids.shape
    if n % k:
        raise ValueError(f"{n} rows are not whole groups of {k}")
    if not can_share_prompt(model):  # the block mask would be wrong for this model: row by row
        return policy_forward(
            model, input_ids, attention_mask, target_mask, temperature, value_head, with_entropy, entropy_grad
        )
    rows_hidden, rows_ids, rows_target = _shared_rows(
        model, input_ids, attention_mask, target_mask, prompt_width, k
    )
    logprobs, entropy = logprobs_from_hidden(
        model, rows_hidden, rows_ids, rows_target, temperature, with_entropy, entropy_grad
    )
    values = values_at_targets(value_head, rows_hidden, rows_target) if value_head is not None else None
    lp = _full_rows(logprobs, width, prompt_width)
    assert lp is not None
    return TokenOutputs(lp, _full_rows(entropy, width, prompt_width), _full_rows(values, width, prompt_width))


def shared_prompt_values(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    value_head: ValueHead,
    prompt_width: int | None = None,
    k: int | None = None,
) -> torch.Tensor:
    """V(prefix) at target positions (B, T) from the body's hidden states alone: no LM head, no
    log-softmax (PPO's old values when the sampler's log-probs serve as the old ones). With
    ``prompt_width`` and ``k`` the rows are :func:`shared_prompt_forward`'s groups and each prompt runs
    once; else (or for a model that cannot take the block mask) row by row as :func:`policy_forward`."""
    if k is None or prompt_width is None or not can_share_prompt(model):
        return values_at_targets(value_head, hidden_states(model, input_ids, attention_mask), target_mask)
    if input_ids.shape[0] % k:
        raise ValueError(f"{input_ids.shape[0]} rows are not whole groups of {k}")
    rows_hidden, _, rows_target = _shared_rows(model, input_ids, attention_mask, target_mask, prompt_width, k)
    values = _full_rows(
        values_at_targets(value_head, rows_hidden, rows_target), input_ids.shape[1], prompt_width
    )
    assert values is not None
    return values


def _shared_rows(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    prompt_width: int,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed forward of :func:`shared_prompt_forward`, read back per row: hidden states
    (N, 1 + C, H) where column i predicts token i + 1 of ``[prompt's last token, answer]``, those
    tokens (N, 1 + C) and their target mask (N, 1 + C)."""
    n, width = input_ids.shape
    g, p, c = n // k, prompt_width, width - prompt_width
    dev = input_ids.device
    prompt_mask = attention_mask[::k, :p].bool()  # (G, P)
    answer_mask = attention_mask[:, p:].bool()  # (N, C)
    n_p = prompt_mask.sum(-1)  # (G,)
    lens = answer_mask.sum(-1).view(g, k)  # (G, k)
    starts = n_p.unsqueeze(-1) + lens.cumsum(-1) - lens  # (G, k) where each answer starts in its group
    total = n_p + lens.sum(-1)  # (G,)
    width_packed = int(total.max())
    packed = torch.zeros((g, width_packed), dtype=input_ids.dtype, device=dev)
    seg = torch.full((g, width_packed), -1, dtype=torch.long, device=dev)  # -1 pad, 0 prompt, j + 1 answer j
    pos = torch.zeros((g, width_packed), dtype=torch.long, device=dev)
    # the prompt: left-padded column col -> packed column col - (P - n_p)
    gi, col = prompt_mask.nonzero(as_tuple=True)
    dest = col - (p - n_p[gi])
    packed[gi, dest] = input_ids[gi * k, col]
    seg[gi, dest] = 0
    pos[gi, dest] = dest
    # the answers: row r = g·k + j, column t -> packed column starts[g, j] + t at position n_p[g] + t
    r, t = answer_mask.nonzero(as_tuple=True)
    rg, rj = r // k, r % k
    dest = starts[rg, rj] + t
    packed[rg, dest] = input_ids[r, p + t]
    seg[rg, dest] = rj + 1
    pos[rg, dest] = n_p[rg] + t
    # sliding windows apply to each answer's own positions, not to distances in the packed row
    mask4 = shared_prefix_mask(model, seg, pos)
    hidden = hidden_states(model, packed, mask4, position_ids=pos)  # (G, L, H)

    # per row: the hidden state before each answer token: the prompt's last, then answer tokens 0..C-2
    flat = hidden.reshape(g * width_packed, -1)
    base = (torch.arange(n, device=dev) // k) * width_packed  # (N,) the row's group offset
    first = base + n_p.repeat_interleave(k) - 1  # (N,) the prompt's last token
    cols = torch.arange(c, device=dev)
    inside = (starts.reshape(-1, 1) + cols).clamp(max=width_packed - 1)  # (N, C) answer token t's column
    rows_idx = torch.cat([first.unsqueeze(-1), base.unsqueeze(-1) + inside], dim=1)  # (N, 1 + C)
    rows_hidden = flat[rows_idx]  # (N, 1 + C, H): hidden[:, i] predicts token i + 1 of [., answer]
    rows_ids = torch.cat([input_ids[:, p - 1 : p], input_ids[:, p:]], dim=1)
    rows_target = torch.cat([torch.zeros_like(target_mask[:, :1]), target_mask[:, p:]], dim=1)
    return rows_hidden, rows_ids, rows_target


def _full_rows(x: torch.Tensor | None, width: int, prompt_width: int) -> torch.Tensor | None:
    """(N, 1 + C) per-row results -> (N, P + C), zero on the prompt columns."""
    if x is None:
        return None
    out = torch.zeros((x.shape[0], width), dtype=x.dtype, device=x.device)
    out[:, prompt_width:] = x[:, 1:]
    return out


# ---------------------------------------------------------------------------------------------
# preference pairs: [chosen; rejected] with the prompt run once


@dataclass
class PairLogps:
    """Sequence log-probs of a batch of B pairs, from one forward over 2B rows [chosen; rejected].

    ``token_logps`` (2B, T) is zero off ``response_mask`` (2B, T); ``logps`` (2B,) its row sums.
    """

    token_logps: torch.Tensor
    response_mask: torch.Tensor

    @property
    def logps(self) -> torch.Tensor:
        return masked_sum(self.token_logps, self.response_mask, dim=-1)

    @property
    def avg_logps(self) -> torch.Tensor:
        return masked_mean(self.token_logps, self.response_mask, dim=-1)

    def halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) halves of a (2B, ...) tensor."""
        b = x.shape[0] // 2
        return x[:b], x[b:]


def collate_pairs(
    chosen: Sequence[Encoded], rejected: Sequence[Encoded], pad_id: int
) -> tuple[torch.Tensor, ...]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``response_mask`` (2B, T): chosen rows first."""
    ids, att, mask = pad_batch([*chosen, *rejected], pad_id)
    mask[:, 0] = False  # the first token is never predicted
    return ids, att, mask


def pair_logps(
    model: Any, ids: torch.Tensor, att: torch.Tensor, mask: torch.Tensor, share: bool = True
) -> PairLogps:
    """One forward of the concatenated [chosen; rejected] batch; logits only at response tokens.

    With ``share`` (and a model that takes a custom mask) each pair's prompt runs once: the batch is
    rearranged into :func:`shared_prompt_forward`'s layout (rows ``2i`` / ``2i+1``
    = chosen / rejected of pair ``i``, ``[left-padded prompt | right-padded answer]``) and the
    log-probs are put back at their places in the (2B, T) batch. Pairs whose two prompts differ
    (which Heed's encoding never produces) make the whole batch go row by row."""
    if share:
        shared = _shared_layout(ids, att, mask) if can_share_prompt(model) else None
        if shared is not None:
            return PairLogps(_shared_pair_logps(model, ids, shared), mask)
    token_logps, _ = sequence_logprobs(model, ids, att, mask)  # (2B, T)
    return PairLogps(token_logps, mask)


@dataclass
class _SharedLayout:
    ids: torch.Tensor  # (2B, P + C) interleaved pairs, [left-padded prompt | right-padded answer]
    att: torch.Tensor
    tgt: torch.Tensor
    prompt_width: int  # P
    rows: torch.Tensor  # (2B,) the batch row of each interleaved row
    src: torch.Tensor  # (2B, C) the batch column of each answer position
    valid: torch.Tensor  # (2B, C) answer positions that exist


def _shared_layout(ids: torch.Tensor, att: torch.Tensor, mask: torch.Tensor) -> _SharedLayout | None:
    """The shared-prompt layout of a right-padded [chosen; rejected] batch, or None when a pair's
    prompts (the tokens before its first answer token) differ or a row has no answer token."""
    n, t = ids.shape
    b = n // 2
    if not bool(mask.any(-1).all()):
        return None
    first = mask.long().argmax(-1)  # (2B,) where each answer starts = its prompt's length
    length = att.long().sum(-1)  # (2B,) right padding: real tokens are [0, length)
    rows = (
        torch.stack([torch.arange(b), torch.arange(b) + b], dim=1).flatten().to(ids.device)
    )  # chosen_i, rejected_i
    f, ln = first[rows], length[rows]
    p = int(first.max())
    c = int((length - first).max())
    cols = torch.arange(p, device=ids.device)
    p_src = cols - (p - f).unsqueeze(-1)  # (2B, P): batch column of each left-padded prompt column
    p_valid = p_src >= 0
    p_ids = ids[rows].gather(1, p_src.clamp(min=0)) * p_valid
    if not torch.equal(f[0::2], f[1::2]) or not torch.equal(p_ids[0::2], p_ids[1::2]):
        return None
    a_src = f.unsqueeze(-1) + torch.arange(c, device=ids.device)  # (2B, C)
    a_valid = a_src < ln.unsqueeze(-1)
    a_src = a_src.clamp(max=t - 1)
    a_ids = ids[rows].gather(1, a_src) * a_valid
    a_tgt = mask[rows].gather(1, a_src) & a_valid
    src = torch.where(
        a_valid, a_src, 0
    )  # padding goes to column 0, never an answer token (mask[:, 0] is False)
    return _SharedLayout(
        torch.cat([p_ids, a_ids], dim=1),
        torch.cat([p_valid, a_valid], dim=1),
        torch.cat([torch.zeros_like(p_valid), a_tgt], dim=1),
        p,
        rows,
        src,
        a_valid,
    )


def _shared_pair_logps(model: Any, ids: torch.Tensor, lay: _SharedLayout) -> torch.Tensor:
    """Token log-probs (2B, T) at the batch's own positions, from one shared-prompt forward."""
    out = shared_prompt_forward(model, lay.ids, lay.att, lay.tgt, lay.prompt_width, 2)
    answer = out.logprobs[:, lay.prompt_width :] * lay.valid  # (2B, C), zero off the answers
    token_logps = torch.zeros(ids.shape, dtype=answer.dtype, device=ids.device)
    placed = torch.zeros_like(token_logps).scatter(1, lay.src, answer)  # interleaved order
    token_logps[lay.rows] = placed
    return token_logps

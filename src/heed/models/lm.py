"""Forward passes of causal LMs that compute logits only where they are needed.

Convention: ``logprobs[:, t] = log p(input_ids[:, t] | input_ids[:, :t])``, so a
``target_mask`` marks the *predicted* tokens (response / assistant tokens) and the
hidden state at ``t - 1`` is sent through the LM head for each of them. Prompt positions
never reach the ``(·, V)`` vocabulary projection.
"""

from __future__ import annotations

from typing import Any

import torch

from heed.algos.ops import entropy_from_logits, selective_log_softmax


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: ``cumsum(mask) - 1``, clamped at 0. Shape (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def unwrap(model: Any) -> Any:
    """The transformers model under a data-parallel wrapper (``.module``) and a peft ``PeftModel``
    (whose layers carry the LoRA adapters, so adapters stay active)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trunk(model: Any) -> Any:
    """The transformer body under the LM head (``model.model`` for Llama-style models)."""
    model = unwrap(model)
    base = getattr(model, "base_model_prefix", "model")
    body = getattr(model, base, None)
    if body is None or body is model:
        raise TypeError(f"{type(model).__name__}: cannot find the transformer body '{base}'")
    return body


def hidden_states(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final hidden states (B, T, H), positions computed from a (B, T) attention mask unless given
    (``position_ids`` (B, T) with a custom (B, 1, T, T) ``attention_mask``, or with no mask for
    packed documents whose positions restart at each one).

    Under a data-parallel wrapper (DDP; DeepSpeed and FSDP likewise, untested here) the forward must go
    through the wrapper, which is what synchronises gradients (or gathers sharded weights): the whole model runs with ``logits_to_keep=1`` (one logit per row) and
    the last hidden state is taken from its outputs.
    """
    wrapped = (
        isinstance(model, torch.nn.parallel.DistributedDataParallel)
        or hasattr(model, "module")
        or (type(model).__name__.startswith("FSDP"))
    )  # DDP, DeepSpeed's engine, FSDP2's fully_shard class
    if position_ids is None:
        assert attention_mask is not None
        position_ids = position_ids_from_mask(attention_mask)
    if wrapped:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        return out.hidden_states[-1]
    out = trunk(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head (and the model's final logit soft-cap or scale, if it has one). (N, H) -> (N, V)."""
    model = unwrap(model)
    logits = model.get_output_embeddings()(hidden)
    cfg = model.config
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, int | float):
        logits = logits * scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def sequence_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and optionally entropies) of the target tokens, zero elsewhere.

    Args:
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1 on real tokens (left or right padding).
        target_mask: (B, T) True on the tokens whose log-prob is wanted (never position 0).
        temperature: logits are divided by it (sampling temperature of the rollout).
        position_ids: (B, T) packed documents' positions (see :func:`heed.data.collate.packed_positions`);
            the attention mask is then not used, attention stays inside each document.

    Returns:
        logprobs (B, T) and entropy (B, T) of the predictive distribution at each target, or None.
    """
    # packed documents (position_ids given) attend by their positions, not by the mask
    hidden = hidden_states(
        model, input_ids, None if position_ids is not None else attention_mask, position_ids
    )  # (B, T, H)
    return logprobs_from_hidden(
        model, hidden, input_ids, target_mask, temperature, with_entropy, chunk_size=chunk_size
    )


def logprobs_from_hidden(
    model: Any,
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`sequence_logprobs` from final hidden states (B, T, H) already computed (e.g. shared
    with a value head). Entropy carries a gradient only with ``entropy_grad`` (an entropy bonus)."""
    sel = target_mask[:, 1:].bool()  # (B, T-1): hidden t-1 predicts token t
    h = hidden[:, :-1][sel]  # (N, H)
    targets = input_ids[:, 1:][sel]  # (N,)
    lps, ents = [], []
    for start in range(0, h.shape[0], chunk_size):
        logits = head_logits(model, h[start : start + chunk_size])  # (n, V)
        if temperature != 1.0:
            logits = logits / temperature
        lps.append(
            selective_log_softmax(logits.unsqueeze(0), targets[start : start + chunk_size].unsqueeze(0))[0]
        )
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                ents.append(entropy_from_logits(logits if entropy_grad else logits.detach()))
    logprobs = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    entropy = torch.zeros_like(logprobs) if with_entropy else None
    if lps:
        logprobs[:, 1:][sel] = torch.cat(lps).float()
        if entropy is not None:
            entropy[:, 1:][sel] = torch.cat(ents).float()
    return logprobs, entropy


def lm_token_losses(
    model: Any,
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    loss_mask: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token negative log-likelihood (B, T), zero off the loss mask; logits only on trained tokens.
    ``positions`` (B, T): packed documents' positions, attention kept inside each document."""
    target = loss_mask.clone()
    target[:, 0] = False  # the first token has no context to be predicted from
    logprobs, _ = sequence_logprobs(model, input_ids, attention, target, position_ids=positions)
    return -logprobs * target

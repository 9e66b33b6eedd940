"""Forward passes of causal LMs that compute logits only where they are needed.

Convention: ``logprobs[:, t] = log p(input_ids[:, t] | input_ids[:, :t])``, so a
``target_mask`` marks the *predicted* tokens (response / assistant tokens) and the
hidden state at ``t - 1`` is sent through the LM head for each of them. Prompt positions
never reach the ``(·, V)`` vocabulary projection.

Two things differ between architectures and are checked, not assumed, once per model
(:func:`forward_support`, a probe forward against the plain ``model(input_ids)`` path):

* what happens to the LM head's output (Granite divides by ``logits_scaling``, Gemma 2/3 soft-cap
  with ``final_logit_softcapping``, Cohere multiplies by ``logit_scale``): :func:`head_logits`
  applies these; a model whose logits it does not reproduce runs through its own forward instead;
* whether a custom block attention mask with explicit positions (packed documents, the shared
  prompt of :mod:`heed.models.forward`) gives each sequence what it gets alone. Sliding windows are
  built into the mask from each token's own position (:func:`block_mask`); a model that cannot take
  such a mask (ALiBi models build their biases from a 2-D mask) runs its documents as separate rows.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from heed.algos.ops import entropy_from_logits, selective_log_softmax, selective_log_softmax_with_entropy

_SAID: set[str] = set()


def say_once(message: str) -> None:
    """Warn with ``message`` once per process (a fallback is reported the first time it is taken)."""
    if message not in _SAID:
        _SAID.add(message)
        warnings.warn(message, stacklevel=3)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: ``cumsum(mask) - 1``, clamped at 0. Shape (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row of a (B, T) mask is ones, then zeros (one host sync)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


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


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def feature_size(model: Any) -> int:
    """Width H of the hidden states the LM head reads (OPT's ``project_out`` makes it differ from
    ``hidden_size``): the LM head's input features, else the config's hidden size."""
    head = unwrap(model).get_output_embeddings()
    width = getattr(head, "in_features", None)
    if isinstance(width, int):
        return width
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[1])
    cfg = _text_config(unwrap(model).config)
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(cfg, key, None), int):
            return int(getattr(cfg, key))
    raise TypeError(f"{type(unwrap(model)).__name__}: cannot find the width of its hidden states")


# ---------------------------------------------------------------------------------------------
# what the model really does: probed once per model against its plain forward, cached on it


@dataclass(frozen=True)
class ForwardSupport:
    """How Heed may run a model, as a probe forward found (None: the fast path is exact)."""

    own_logits: str | None = None  # why the LM head + config post-processing misses the model's logits
    no_block_mask: str | None = None  # why a custom block attention mask cannot be used
    # why right-padded rows need their padding mask (None: a causal model, whose real tokens never see
    # the padding after them, runs them without it and so with its causal attention kernel)
    needs_mask: str | None = None


_SUPPORT_KEY = "_heed_forward_support"


def forward_support(model: Any) -> ForwardSupport:
    """Probe once per model (cached on it) whether :func:`head_logits` reproduces the model's own
    logits and whether a block mask (:func:`packed_mask`) gives each packed document what it gets
    alone, sliding windows included; each fallback taken is said once in the log."""
    base = unwrap(model)
    support = base.__dict__.get(_SUPPORT_KEY)
    if support is None:
        support = _probe(base)
        base.__dict__[_SUPPORT_KEY] = support
        name = type(base).__name__
        if support.own_logits:
            say_once(f"{name}: {support.own_logits}; log-probs come from the model's full logits (slower)")
        if support.no_block_mask:
            say_once(
                f"{name}: {support.no_block_mask}; packed documents and shared prompts run as separate rows"
            )
    return support


def _tolerance(dtype: torch.dtype) -> float:
    """Largest relative error a probe accepts as float noise: mask or head mistakes are O(0.1 – 1)."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over tokens of ‖a − b‖ / ‖b‖ along the last dim."""
    a, b = a.float(), b.float()
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)).max())


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@torch.no_grad()
def _probe(model: Any) -> ForwardSupport:
    emb = model.get_input_embeddings().weight
    dev, tol = emb.device, _tolerance(emb.dtype)
    vocab = model.get_output_embeddings().weight.shape[0]
    windows = [w for w in attention_windows(model).values() if w is not None]
    # two documents, the first longer than any short sliding window (a long window is built into
    # the mask the same way; probing it would cost a forward longer than the window)
    n1 = min(min(windows, default=8), 40) + 5
    n2 = n1 - 3
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, vocab, (1, n), generator=gen).to(dev) for n in (n1, n2)]
    was = model.training
    model.eval()
    try:
        return _compare(model, docs, tol)
    finally:
        model.train(was)


def _compare(model: Any, docs: list[torch.Tensor], tol: float) -> ForwardSupport:
    """The probe's forwards, in the model's own dtype (a caller's autocast would blur the comparison)."""
    n1, n2 = docs[0].shape[1], docs[1].shape[1]
    dev = docs[0].device
    with torch.autocast(device_type=dev.type, enabled=False):
        plain = [model(input_ids=d, use_cache=False).logits for d in docs]  # (1, n, V) each
        own: str | None = None
        try:
            logits = _head_and_postprocess(model, _trunk_hidden(model, docs[0], None, None))
            err = _rel_err(logits, plain[0])
            if err > tol:
                own = (
                    "its LM head and the config's logit scaling / soft-capping do not give its logits "
                    f"(relative error {err:.1e})"
                )
        except Exception as exc:  # any failure of the fast path means: use the model's own forward
            own = f"its LM head cannot run on its body's hidden states ({_first_line(exc)})"
        no_mask: str | None = None
        pos = torch.cat([torch.arange(n1), torch.arange(n2)]).unsqueeze(0).to(dev)  # (1, n1 + n2)
        try:
            packed = model(
                input_ids=torch.cat(docs, dim=1),
                attention_mask=packed_mask(model, pos),
                position_ids=pos,
                use_cache=False,
            ).logits
            err = max(_rel_err(packed[:, :n1], plain[0]), _rel_err(packed[:, n1:], plain[1]))
            if err > tol:
                no_mask = (
                    f"a block attention mask does not keep packed sequences apart (relative error {err:.1e})"
                )
        except Exception as exc:
            no_mask = f"its forward does not take a block attention mask ({_first_line(exc)})"
        needs: str | None = None
        try:
            rows = torch.cat([docs[0], torch.cat([docs[1], docs[0][:, :3]], dim=1)])  # row 2 right-padded
            free = model(
                input_ids=rows, position_ids=torch.arange(n1, device=dev).expand(2, n1), use_cache=False
            )
            err = max(_rel_err(free.logits[:1], plain[0]), _rel_err(free.logits[1:, :n2], plain[1]))
            if err > tol:
                needs = (
                    f"its real tokens see the padding after them without a mask (relative error {err:.1e})"
                )
        except Exception as exc:
            needs = f"its forward does not run without a mask ({_first_line(exc)})"
        return ForwardSupport(own, no_mask, needs)


# ---------------------------------------------------------------------------------------------
# attention masks for packed sequences


def attention_windows(model: Any) -> dict[str, int | None]:
    """The sliding window of each kind of attention layer, ``{layer_type: window or None}``: from
    ``config.layer_types`` where the model names its layers' kinds (Gemma 2/3, Qwen 2/3), else one
    kind for all layers with ``config.sliding_window`` (Mistral, Mixtral, Phi-3)."""
    cfg = _text_config(unwrap(model).config)
    w = getattr(cfg, "sliding_window", None)
    window = int(w) if isinstance(w, int) and not isinstance(w, bool) and w > 0 else None
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list | tuple) and types:
        return {t: (window if t == "sliding_attention" else None) for t in dict.fromkeys(types)}
    return {"full_attention": window}


def block_mask(model: Any, allowed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | dict[str, Any]:
    """The ``attention_mask`` argument for a custom attention pattern.

    ``allowed`` (B, L, L) is True where query q may attend key κ; on sliding-window layers a key is
    also kept only when ``positions[q] − positions[κ] < window`` (transformers' rule, measured in each
    token's own positions, not in columns of the packed row); every query sees itself (padding rows
    stay finite). Returns (B, 1, L, L): bool, or additive (0 / dtype min) for eager attention; a dict
    by layer type when the model's layers have different windows.
    """
    base = unwrap(model)
    length = allowed.shape[-1]
    dist = positions.unsqueeze(-1) - positions.unsqueeze(-2)  # (B, L, L): query position − key position
    eye = torch.eye(length, dtype=torch.bool, device=allowed.device)
    eager = getattr(base.config, "_attn_implementation", None) == "eager"
    dtype = base.get_input_embeddings().weight.dtype

    def one(window: int | None) -> torch.Tensor:
        ok = (allowed if window is None else allowed & (dist < window)) | eye
        ok = ok.unsqueeze(1)  # (B, 1, L, L)
        if eager:
            return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill(
                ~ok, torch.finfo(dtype).min
            )
        return ok

    masks = {kind: one(w) for kind, w in attention_windows(model).items()}
    return next(iter(masks.values())) if len(masks) == 1 else masks


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Index of the packed document of each token (B, T): a new one starts where the position is not
    the previous one plus 1 (see :func:`heed.data.collate.packed_positions`)."""
    starts = torch.ones_like(position_ids, dtype=torch.long)
    starts[:, 1:] = (position_ids[:, 1:] != position_ids[:, :-1] + 1).long()
    return starts.cumsum(-1) - 1


def packed_mask(model: Any, position_ids: torch.Tensor) -> torch.Tensor | dict[str, Any]:
    """:func:`block_mask` for packed documents: causal attention inside each document only."""
    doc = document_ids(position_ids)  # (B, T)
    t = position_ids.shape[1]
    causal = torch.ones((t, t), dtype=torch.bool, device=position_ids.device).tril()  # key <= query
    return block_mask(model, causal & (doc.unsqueeze(-1) == doc.unsqueeze(-2)), position_ids)


def shared_prefix_mask(
    model: Any, segments: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor | dict[str, Any]:
    """:func:`block_mask` for rows packed as ``[shared prefix | sequence 1 | ... | sequence K]``:
    ``segments`` (G, L) is 0 on the prefix, j + 1 on sequence j and -1 on padding; each token attends
    causally to the prefix and to its own sequence's earlier tokens only."""
    q_seg, k_seg = segments.unsqueeze(-1), segments.unsqueeze(-2)  # (G, L, 1), (G, 1, L)
    idx = torch.arange(segments.shape[1], device=segments.device)
    causal = idx.unsqueeze(0) <= idx.unsqueeze(1)  # (L, L): key <= query
    allowed = causal & (q_seg >= 0) & ((k_seg == 0) | (k_seg == q_seg))  # (G, L, L)
    return block_mask(model, allowed, positions)


# ---------------------------------------------------------------------------------------------
# forwards


def _wrapped(model: Any) -> bool:
    """DDP, DeepSpeed's engine, FSDP2's fully_shard class: the forward must go through the wrapper."""
    return (
        isinstance(model, torch.nn.parallel.DistributedDataParallel)
        or hasattr(model, "module")
        or type(model).__name__.startswith("FSDP")
    )


def _trunk_hidden(
    model: Any, input_ids: torch.Tensor, attention_mask: Any, position_ids: Any
) -> torch.Tensor:
    out = trunk(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _own_features(
    model: Any, input_ids: torch.Tensor, attention_mask: Any, position_ids: Any
) -> torch.Tensor:
    """The model's own forward: the LM head's input (B, T, H) and the model's logits (B, T, V),
    concatenated (B, T, H + V) so that the callers' gathers carry both."""
    captured: list[torch.Tensor] = []
    hook = (
        unwrap(model)
        .get_output_embeddings()
        .register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    )
    try:
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
    finally:
        hook.remove()
    hidden = captured[-1]
    return torch.cat([hidden, out.logits.to(hidden.dtype)], dim=-1)


def _features(
    model: Any, input_ids: torch.Tensor, attention_mask: Any, position_ids: torch.Tensor
) -> torch.Tensor:
    if forward_support(model).own_logits is not None:
        return _own_features(model, input_ids, attention_mask, position_ids)
    if _wrapped(model):
        # through the wrapper, which synchronises gradients (or gathers sharded weights): the whole
        # model with one logit per row, the last hidden state from its outputs
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        return out.hidden_states[-1]
    return _trunk_hidden(model, input_ids, attention_mask, position_ids)


def _by_document(model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, T, ·) of packed documents run as separate right-padded rows (their own
    positions kept), put back at their places: for models that cannot take a block mask."""
    doc = document_ids(position_ids)
    rows, starts, ends = [], [], []
    for r, d in enumerate(doc.tolist()):
        cut = [0] + [t for t in range(1, len(d)) if d[t] != d[t - 1]] + [len(d)]
        for s, e in itertools.pairwise(cut):
            rows.append(r)
            starts.append(s)
            ends.append(e)
    width = max(e - s for s, e in zip(starts, ends, strict=True))
    dev = input_ids.device
    n = len(rows)
    src_row = torch.tensor(rows, device=dev).unsqueeze(-1)  # (S, 1)
    lens = torch.tensor(ends, device=dev) - torch.tensor(starts, device=dev)  # (S,)
    cols = torch.tensor(starts, device=dev).unsqueeze(-1) + torch.arange(width, device=dev)  # (S, W)
    real = torch.arange(width, device=dev) < lens.unsqueeze(-1)  # (S, W)
    cols = torch.where(real, cols, 0)
    seg_ids = torch.where(real, input_ids[src_row, cols], 0)
    first = position_ids[src_row.squeeze(-1), torch.tensor(starts, device=dev)].unsqueeze(-1)  # (S, 1)
    seg_pos = first + torch.arange(width, device=dev)  # each document keeps its own count
    hidden = _features(model, seg_ids, real.long(), seg_pos)  # (S, W, ·)
    out = hidden.new_zeros((*input_ids.shape, hidden.shape[-1]))
    out[src_row.expand(n, width)[real], cols[real]] = hidden[real]
    return out


def hidden_states(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: Any,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final hidden states (B, T, H) of the body under the LM head.

    ``attention_mask``: (B, T) (positions computed from it unless given), a custom (B, 1, T, T) mask
    or dict of them from :func:`block_mask` with ``position_ids`` (B, T), or None with ``position_ids``
    for packed documents whose positions restart at each one (attention then stays inside each
    document: a block mask, or separate rows for a model that cannot take one).

    Right-padded (B, T) masks of a model whose probe found it causal (``needs_mask`` None) are dropped:
    the real tokens' states are the same, and attention runs its causal kernel.

    Where the LM head alone does not reproduce the model's logits (:func:`forward_support`), the
    result is (B, T, H + V): the hidden states followed by the model's own logits, which
    :func:`head_logits` and the value head each read their part of.
    """
    if attention_mask is None:
        assert position_ids is not None
        if forward_support(model).no_block_mask is not None:
            return _by_document(model, input_ids, position_ids)
        attention_mask = packed_mask(model, position_ids)
    if position_ids is None:
        if (
            isinstance(attention_mask, torch.Tensor)
            and attention_mask.dim() == 2
            and forward_support(model).needs_mask is None
            and is_right_padded(attention_mask)
        ):
            # a causal model's real tokens are the same without the mask; the padding's own states
            # change, and nothing reads them
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            return _features(model, input_ids, None, positions)
        position_ids = position_ids_from_mask(attention_mask)
    return _features(model, input_ids, attention_mask, position_ids)


def _head_and_postprocess(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head, then the model's final logit transform as its config names it: ``logit_scale``
    (multiplied, Cohere), ``logits_scaling`` (divided, Granite), ``final_logit_softcapping``
    (c·tanh(z / c), Gemma 2/3). :func:`forward_support` checks the result against the model's own."""
    base = unwrap(model)
    logits = base.get_output_embeddings()(hidden)
    cfg = _text_config(base.config)
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, int | float) and not isinstance(scale, bool):
        logits = logits * scale
    divide = getattr(cfg, "logits_scaling", None)
    if isinstance(divide, int | float) and not isinstance(divide, bool) and divide:
        logits = logits / divide
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def head_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from features of :func:`hidden_states`. (N, H) -> (N, V)."""
    if forward_support(model).own_logits is not None:
        return hidden[..., feature_size(model) :]
    return _head_and_postprocess(model, hidden)


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
        index = targets[start : start + chunk_size]
        if with_entropy and not entropy_grad:  # a logged figure: from the log-softmax the log-probs use
            lp, ent = selective_log_softmax_with_entropy(logits, index)
            lps.append(lp)
            ents.append(ent)
            continue
        lps.append(selective_log_softmax(logits.unsqueeze(0), index.unsqueeze(0))[0])
        if with_entropy:  # an entropy bonus: differentiable
            ents.append(entropy_from_logits(logits))
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


# ---------------------------------------------------------------------------------------------
# dropout

_RATE_WORDS = ("dropout", "pdrop", "drop_prob")


def _is_rate(key: str, value: Any) -> bool:
    return isinstance(value, float) and value > 0 and any(w in key.lower() for w in _RATE_WORDS)


def disable_dropout(model: Any) -> bool:
    """Set every dropout rate of ``model`` to 0, whatever form it is stored in: ``nn.Dropout``
    modules (LoRA's included), float attributes of modules (OPT layers' ``self.dropout``, Llama's
    ``attention_dropout``) and config fields read at forward time. RL's ratio must be 1 and DPO's
    first loss log 2 while policy equals reference, which any dropout breaks.

    Returns whether training mode now computes what eval mode does (a probe forward compares them);
    when it does not (some other stochastic layer, e.g. MoE router jitter), callers run their passes
    in eval mode, which also turns gradient checkpointing off (said once in the log).
    """
    configs: dict[int, Any] = {}
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for key, value in list(vars(m).items()):
            if _is_rate(key, value):
                setattr(m, key, 0.0)
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            configs[id(cfg)] = cfg
    for cfg in list(configs.values()):
        for sub in (cfg, *(getattr(cfg, k) for k in list(vars(cfg)) if hasattr(getattr(cfg, k), "to_dict"))):
            for key, value in list(vars(sub).items()):
                if _is_rate(key, value):
                    setattr(sub, key, 0.0)
    same = _train_equals_eval(model)
    if not same:
        say_once(
            f"{type(unwrap(model)).__name__}: training mode stays random with every dropout at 0; "
            "its passes run in eval mode (gradient checkpointing, if on, has no effect)"
        )
    return same


@torch.no_grad()
def _train_equals_eval(model: Any) -> bool:
    base = unwrap(model)
    emb = base.get_input_embeddings().weight
    vocab = base.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1)).to(emb.device)
    was = base.training
    try:
        base.train()
        a = base(input_ids=ids, use_cache=False).logits
        b = base(input_ids=ids, use_cache=False).logits
        base.eval()
        c = base(input_ids=ids, use_cache=False).logits
    finally:
        base.train(was)
    tol = 1e-5 if emb.dtype in (torch.float32, torch.float64) else 1e-2
    return max(_rel_err(a, c), _rel_err(b, c)) <= tol


def sparse_tied_embedding(model: Any) -> bool:
    """Make the input embedding's backward produce a sparse gradient where the LM head shares its
    matrix (tied weights); returns whether it did.

    The tied matrix W (V, d) gets two gradients: the LM head's, dense, and the lookup's, which touches
    only the N rows of the batch's tokens. Written dense, the lookup's is a fresh zeroed (V, d)
    tensor, added to the head's as a second one: for a 32k x 768 matrix ~100 MB each, allocated,
    zeroed and summed at every backward. Sparse, autograd adds its N rows into the head's gradient
    in place (the lookup runs first in the forward, so last in the backward), and the sum is the
    same. Only for a plain ``nn.Embedding`` whose weight is the output embedding's, trainable and a
    plain tensor (not sharded); :func:`heed.train.loop.optimizer_step` makes any gradient that is
    still sparse dense before the optimizer sees it.
    """
    base = unwrap(model)
    get_in = getattr(base, "get_input_embeddings", None)
    get_out = getattr(base, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    emb, head = get_in(), get_out()
    if (
        not isinstance(emb, torch.nn.Embedding)
        or head is None
        or getattr(head, "weight", None) is not emb.weight
    ):
        return False
    if not emb.weight.requires_grad or type(emb.weight.data) is not torch.Tensor:
        return False
    emb.sparse = True
    return True

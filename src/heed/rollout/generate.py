"""Batched sampling with the Hugging Face engine: KV cache, left padding, prompts sorted by length.

Outputs keep the caller's order (prompt-major, ``num_samples`` consecutive answers per prompt)
and the token ids of each completion, cut after its first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from heed.algos.ops import selective_log_softmax
from heed.data.records import Prompt
from heed.data.templating import render_prompt


@dataclass
class Generation:
    """Sampled completions, row ``i*K + k`` being sample ``k`` of prompt ``i``.

    prompt_ids: (N, P) left-padded; prompt_mask (N, P) True on real prompt tokens.
    completion_ids: (N, C) right-padded; completion_mask (N, C) True up to and including EOS.
    logprobs: (N, C) log π(token) at the sampling temperature as the engine computed it while
    sampling (0 on padding), or None when the engine does not report them.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    finished: torch.Tensor  # (N,) True where the completion ended with EOS
    logprobs: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    compile: bool = False  # heed engine: torch.compile the decoding step (eager with a warning if it fails)


def _pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = True
    return ids, mask


def stop_ids(tokenizer: Any, model: Any) -> list[int]:
    ids = set()
    for src in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list | tuple):
            ids.update(int(x) for x in src)
    return sorted(ids)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    params: SamplingParams,
    num_samples: int = 1,
    batch_size: int = 64,
    engine: str = "hf",
    keys: torch.Tensor | None = None,
) -> Generation:
    """Sample ``num_samples`` completions for each tokenized prompt.

    Prompts are sorted by length and batched (``batch_size`` rows per call), so left padding
    stays short; results come back in input order. ``engine``: ``hf`` (``model.generate``) or
    ``heed`` (:func:`heed.rollout.sampler.decode`, a lean KV-cache loop, much faster for small models).
    ``keys`` (N,) int64, one per output row (``heed`` engine): each row's random draws are a function
    of its key, so the answers do not depend on batching (see :func:`heed.rollout.sampler.row_keys`).
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    stop = stop_ids(tokenizer, model)
    rows = [p for p in prompt_ids for _ in range(num_samples)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    completions: list[list[int]] = [[] for _ in rows]
    logps: list[list[float]] = [[] for _ in rows]
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = _pad_left([rows[i] for i in idx], pad_id)
        if engine == "heed":
            from heed.rollout.sampler import decode

            new_rows, new_lps = decode(
                model,
                ids.to(device),
                mask.to(device),
                params,
                stop,
                keys=keys[idx] if keys is not None else None,
            )
            for j, i in enumerate(idx):
                completions[i], logps[i] = new_rows[j], new_lps[j]
            continue
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.long().to(device),
            do_sample=params.do_sample,
            temperature=params.temperature if params.do_sample else None,
            top_p=params.top_p if params.do_sample else None,
            top_k=params.top_k if params.do_sample else None,
            max_new_tokens=params.max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=stop,
            output_logits=True,
            return_dict_in_generate=True,
        )
        new_ids = out.sequences[:, ids.shape[1] :]  # (b, steps)
        scaled = torch.stack(out.logits, dim=1).float() / (
            params.temperature if params.temperature > 0 else 1.0
        )
        new_lps = selective_log_softmax(scaled, new_ids).tolist()
        new = new_ids.tolist()
        for j, i in enumerate(idx):
            toks = new[j]
            cut = next((t for t, tok in enumerate(toks) if tok in stop), None)
            n_keep = cut + 1 if cut is not None else len([t for t in toks if t != pad_id])
            completions[i], logps[i] = toks[:n_keep], new_lps[j][:n_keep]
    model.train(was_training)
    return build_generation(tokenizer, rows, completions, logps, stop)


def build_generation(
    tokenizer: Any,
    rows: list[list[int]],
    completions: list[list[int]],
    logps: list[list[float]],
    stop: list[int],
) -> Generation:
    """A :class:`Generation` from per-row prompt ids, answer ids (cut after the first stop token)
    and the log-prob of each answer token, as any engine returns them."""
    pad_id = tokenizer.pad_token_id
    p_ids, p_mask = _pad_left(rows, pad_id)
    width = max(1, max(len(c) for c in completions))
    c_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    c_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    c_lps = torch.zeros((len(rows), width), dtype=torch.float32)
    finished = torch.zeros(len(rows), dtype=torch.bool)
    for i, c in enumerate(completions):
        if c:
            c_ids[i, : len(c)] = torch.tensor(c)
            c_mask[i, : len(c)] = True
            c_lps[i, : len(c)] = torch.tensor(logps[i])
            finished[i] = c[-1] in stop
    texts = tokenizer.batch_decode(
        [c[:-1] if c and c[-1] in stop else c for c in completions], skip_special_tokens=True
    )
    return Generation(p_ids, p_mask, c_ids, c_mask, [t.strip() for t in texts], finished, c_lps)


def encode_prompts(
    tokenizer: Any,
    prompts: list[Prompt],
    chat: bool,
    max_prompt_length: int | None = None,
    where: str = "prompts",
    wheres: list[str] | None = None,
) -> list[list[int]]:
    """Render (chat template with generation prompt, or raw) and tokenize prompts; ``wheres`` gives
    each prompt's ``file:line`` for errors (else ``where: record i``)."""
    out = []
    for i, p in enumerate(prompts):
        at = wheres[i] if wheres is not None else f"{where}: record {i}"
        text = render_prompt(tokenizer, p, chat, where=at)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            from heed.errors import DataError

            raise DataError(f"{at}: prompt: {len(ids)} tokens, over the limit of {max_prompt_length}")
        out.append(ids)
    return out


def sample_responses(
    model_dir: str,
    prompts: list[Prompt],
    num_samples: int,
    params: SamplingParams | None = None,
    batch_size: int = 64,
    chat: str = "auto",
    seed: int = 0,
) -> list[list[str]]:
    """Load a model folder and return ``num_samples`` answers per prompt (a list per prompt)."""
    from heed.data.templating import use_chat
    from heed.models.loading import load_causal_lm, load_tokenizer

    torch.manual_seed(seed)
    tok = load_tokenizer(model_dir, padding_side="left")
    model = load_causal_lm(model_dir)
    ids = encode_prompts(tok, prompts, use_chat(tok, chat))
    gen = generate(
        model, tok, ids, params or SamplingParams(), num_samples=num_samples, batch_size=batch_size
    )
    return [gen.texts[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]

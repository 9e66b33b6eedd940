"""What the trainers that tune against a frozen reference share: the reference log-prob cache kept in
the run folder, and the end-of-run samples with their KL to the reference."""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from heed.algos.kl import kl_estimate
from heed.algos.ops import masked_sum
from heed.data.records import Prompt, prompt_text

REF_CACHE = "ref_logps.pt"


def model_fingerprint(path: str | Path) -> str:
    """A cheap identity of a model folder: its config and the size and first MiB of each weights file."""
    h = hashlib.sha256()
    folder = Path(path)
    cfg_file = folder / "config.json"
    if cfg_file.exists():
        h.update(cfg_file.read_bytes())
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(2**20))
    return h.hexdigest()


def load_ref_cache(run: Path, key: str) -> dict[str, torch.Tensor] | None:
    path = run / REF_CACHE
    if not path.exists():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or damaged cache is recomputed, not fatal
        warnings.warn(f"{path}: unreadable ({str(exc).splitlines()[0][:120]}); recomputing it", stacklevel=2)
        return None
    return cached if isinstance(cached, dict) and cached.get("key_str") == key else None


def save_ref_cache(run: Path, key: str, tables: dict[str, torch.Tensor]) -> None:
    tmp = run / (REF_CACHE + ".tmp")
    torch.save({"key_str": key, **tables}, tmp)
    os.replace(tmp, run / REF_CACHE)


@dataclass
class SampleResult:
    prompts: list[Prompt]
    texts: dict[str, list[str]]  # policy name -> answers, prompt-major
    metrics: dict[str, float]
    policy_name: str = "dpo"  # the tuned policy's key in ``texts``


@torch.no_grad()
def sample_and_kl(
    policy: Any,
    ref: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    chat: bool,
    num_samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 64,
    ref_name: str = "sft",
    policy_name: str = "dpo",
) -> SampleResult:
    """Answers of the reference and the tuned policy to the same prompts, and KL(policy ‖ reference)
    on the policy's answers: per answer Σ_t k(log π − log π_ref) over its tokens (k1 and k3),
    averaged over answers (``kl/k1``, ``kl/k3``), plus length and diversity of the policy's answers."""
    from heed.models.lm import sequence_logprobs
    from heed.models.lora import adapter_disabled
    from heed.report.diversity import diversity_metrics
    from heed.rollout.generate import SamplingParams, encode_prompts, generate

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    prompt_ids = encode_prompts(tokenizer, prompts, chat)
    texts = {}
    torch.manual_seed(seed)
    with adapter_disabled(ref):
        gen_ref = generate(ref, tokenizer, prompt_ids, params, num_samples, batch_size)
    texts[ref_name] = gen_ref.texts
    torch.manual_seed(seed)
    gen = generate(policy, tokenizer, prompt_ids, params, num_samples, batch_size)
    texts[policy_name] = gen.texts
    device = next(policy.parameters()).device
    kl1, kl3 = [], []
    for start in range(0, len(gen.texts), batch_size):
        sl = slice(start, start + batch_size)
        ids = torch.cat([gen.prompt_ids[sl], gen.completion_ids[sl]], dim=1).to(device)  # (b, P + C)
        att = torch.cat([gen.prompt_mask[sl], gen.completion_mask[sl]], dim=1).to(device)
        target = torch.cat([torch.zeros_like(gen.prompt_mask[sl]), gen.completion_mask[sl]], dim=1).to(device)
        lp, _ = sequence_logprobs(policy, ids, att.long(), target)
        ref_dev = next(ref.parameters()).device
        with adapter_disabled(ref):
            lp_ref, _ = sequence_logprobs(ref, ids.to(ref_dev), att.long().to(ref_dev), target.to(ref_dev))
        lp_ref = lp_ref.to(device)
        kl1.append(masked_sum(kl_estimate(lp, lp_ref, "k1"), target, dim=-1))
        kl3.append(masked_sum(kl_estimate(lp, lp_ref, "k3"), target, dim=-1))
    metrics = {
        "kl/k1": torch.cat(kl1).mean().item(),
        "kl/k3": torch.cat(kl3).mean().item(),
        "length/mean": gen.lengths.float().mean().item(),
        **diversity_metrics(gen.texts),
    }
    return SampleResult(list(prompts), texts, metrics, policy_name)


def write_samples(path: Path, result: SampleResult, num_samples: int, step: int) -> None:
    """``samples.jsonl``: the same prompts answered by the reference (step 0) and the tuned policy."""
    from heed.data.io import write_jsonl

    rows = []
    for name, texts in result.texts.items():
        for i, text in enumerate(texts):
            prompt = result.prompts[i // num_samples]
            rows.append(
                {
                    "step": step if name == result.policy_name else 0,
                    "policy": name,
                    "prompt": prompt_text(prompt),
                    "completion": text,
                }
            )
    write_jsonl(path, rows)

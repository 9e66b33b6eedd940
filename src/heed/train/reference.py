"""What the trainers that tune against a frozen reference share: the DPO family's per-pair loss, the
reference log-probs of pairs (a table computed once, cached in the run folder), and the end-of-run
samples with their KL to the reference."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from heed.algos.kl import kl_estimate
from heed.algos.losses import dpo_loss, simpo_loss
from heed.algos.ops import masked_sum
from heed.config.dpo import DPOLossConfig
from heed.data.pairs import EncodedPairs
from heed.data.records import Prompt, prompt_text
from heed.models.forward import PairLogps, collate_pairs, pair_logps
from heed.report.progress import StepProgress

REF_CACHE = "ref_logps.pt"


def preference_losses(
    cfg: DPOLossConfig,
    policy: PairLogps,
    ref_logps: torch.Tensor | None,
    ref_avg_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair loss (B,) of the configured type, plus detached per-pair statistics.

    ``ref_logps`` (2B,) are the reference's summed log-probs in [chosen; rejected] order (unused
    by SimPO). IPO uses length-averaged log-ratios, as TRL does (the IPO authors' choice), so β
    does not depend on answer length. ``sft_coef`` adds RPO's NLL of the chosen answer, averaged
    over its tokens: loss += sft_coef · (−(1/|y_c|) Σ_t log π(y_c,t)).
    """
    if cfg.type == "simpo":
        avg_c, avg_r = policy.halves(policy.avg_logps)
        losses, chosen_rewards, rejected_rewards = simpo_loss(avg_c, avg_r, cfg.beta, cfg.simpo_gamma)
    else:
        assert ref_logps is not None
        if cfg.type == "ipo":
            assert ref_avg_logps is not None
            pol, ref = policy.avg_logps, ref_avg_logps
        else:
            pol, ref = policy.logps, ref_logps
        pc, pr = policy.halves(pol)
        rc, rr = policy.halves(ref)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            pc, pr, rc, rr, cfg.beta, cfg.type, cfg.label_smoothing
        )
    chosen_logps, rejected_logps = policy.halves(policy.logps.detach())
    stats = {
        "chosen_reward": chosen_rewards,
        "rejected_reward": rejected_rewards,
        "accuracy": (chosen_rewards > rejected_rewards).float(),
        "margin": chosen_rewards - rejected_rewards,
        "chosen_logps": chosen_logps,
        "rejected_logps": rejected_logps,
    }
    if cfg.sft_coef:
        nll_chosen = -policy.halves(policy.avg_logps)[0]
        losses = losses + cfg.sft_coef * nll_chosen
        stats["sft_loss"] = nll_chosen.detach()
    return losses, stats


def ref_logps_for(batch_idx: Sequence[int], ref_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and average reference log-probs (2B,) of pairs ``batch_idx`` from a (N, 4) table
    of [chosen sum, rejected sum, chosen avg, rejected avg]."""
    rows = ref_table[list(batch_idx)]
    return torch.cat([rows[:, 0], rows[:, 1]]), torch.cat([rows[:, 2], rows[:, 3]])


@torch.inference_mode()
def reference_table(
    model: Any,
    data: EncodedPairs,
    pad_id: int,
    batch_size: int,
    desc: str = "reference",
    progress: bool = False,
    share: bool = True,
    with_adapter: bool = False,
) -> torch.Tensor:
    """Reference log-probs of every pair, (N, 4): [chosen sum, rejected sum, chosen avg, rejected avg].

    A LoRA model's reference is its base (the adapter disabled), unless ``with_adapter``: then the
    model as it is now (iterative DPO anchors a round to the policy that starts it)."""
    import contextlib

    from heed.models.lora import adapter_disabled

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    lengths = data.lengths()
    order = sorted(range(len(data)), key=lambda i: lengths[i])  # similar lengths, less padding
    table = torch.zeros((len(data), 4), dtype=torch.float32)
    starts = range(0, len(order), batch_size)
    with StepProgress(desc, len(starts), enabled=progress) as bar:
        for start in starts:
            idx = order[start : start + batch_size]
            ids, att, mask = (
                t.to(device)
                for t in collate_pairs([data.chosen[i] for i in idx], [data.rejected[i] for i in idx], pad_id)
            )
            # a LoRA policy's reference is its base model
            with contextlib.nullcontext() if with_adapter else adapter_disabled(model):
                lp = pair_logps(model, ids, att, mask, share)
            s_c, s_r = lp.halves(lp.logps.float().cpu())
            a_c, a_r = lp.halves(lp.avg_logps.float().cpu())
            table[idx] = torch.stack([s_c, s_r, a_c, a_r], dim=-1)
            bar.advance(1)
    model.train(was_training)
    return table


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


@dataclass(frozen=True)
class SampleSpec:
    """How the end-of-run answers are drawn: ``num_samples`` per prompt at ``temperature``, at most
    ``max_new_tokens`` each, seeded; forwards of ``batch_size`` rows."""

    num_samples: int
    temperature: float
    max_new_tokens: int
    seed: int
    batch_size: int = 64


@torch.no_grad()
def sample_and_kl(
    policy: Any,
    ref: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    chat: bool,
    spec: SampleSpec,
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

    params = SamplingParams(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature)
    prompt_ids = encode_prompts(tokenizer, prompts, chat)
    texts = {}
    torch.manual_seed(spec.seed)
    with adapter_disabled(ref):
        gen_ref = generate(ref, tokenizer, prompt_ids, params, spec.num_samples, spec.batch_size)
    texts[ref_name] = gen_ref.texts
    torch.manual_seed(spec.seed)
    gen = generate(policy, tokenizer, prompt_ids, params, spec.num_samples, spec.batch_size)
    texts[policy_name] = gen.texts
    device = next(policy.parameters()).device
    kl1, kl3 = [], []
    for start in range(0, len(gen.texts), spec.batch_size):
        sl = slice(start, start + spec.batch_size)
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


def score_samples(
    result: SampleResult, judge: Any, gold: Any | None, ref_name: str = "sft"
) -> dict[str, float]:
    """The judge's mean reward and each gold metric's mean over the answers of :func:`sample_and_kl`:
    the tuned policy's as ``eval/reward``, ``eval/reward/<source>``, ``gold/<name>``, and the
    reference's (``ref_name``) under ``start/`` (the same prompts and draws before tuning)."""
    import math

    prompts = [
        p
        for p in result.prompts
        for _ in range(len(result.texts[result.policy_name]) // max(1, len(result.prompts)))
    ]
    out: dict[str, float] = {}
    for name, prefix in ((result.policy_name, ""), (ref_name, "start/")):
        texts = result.texts[name]
        scored = judge(prompts, texts)
        ok = [v for v in scored.total if v is not None]
        out[f"{prefix}eval/reward"] = sum(ok) / len(ok) if ok else math.nan
        out.update(scored.means(prefix=f"{prefix}eval/reward/"))
        if gold is not None:
            out.update(gold(prompts, texts).means(prefix=f"{prefix}gold/"))
    return out


def load_policy(cfg: Any, ckpt: Path | None, device: Any) -> tuple[Any, Any, bool]:
    """The policy a preference trainer tunes, placed on ``device``: a checkpoint's weights when resuming,
    or under LoRA the base model plus a new adapter (or the checkpoint's); its tokenizer; and whether
    its training mode computes what eval mode does once every dropout is off (the first loss is log 2
    while policy == reference; a model still random in training mode is trained in eval mode).
    ``cfg`` is a trainer config with a ``model:`` section (``ModelConfig``)."""
    from heed.models.lm import disable_dropout
    from heed.models.loading import load_causal_lm, load_tokenizer
    from heed.models.lora import apply_lora, enable_gradient_checkpointing, place, quantization_kwargs

    m = cfg.model
    tokenizer = load_tokenizer(ckpt or m.tokenizer or m.path)
    model = load_causal_lm(
        m.path if m.lora else (ckpt or m.path), dtype=m.dtype, **quantization_kwargs(m.lora)
    )
    if m.lora is not None:
        model = apply_lora(model, m.lora, adapter=ckpt)
    if m.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = place(model, device)
    return model, tokenizer, disable_dropout(model)


def load_reference(cfg: Any, policy: Any, device: Any) -> Any:
    """The frozen reference: under LoRA without ``ref_model`` the policy itself (its adapter is disabled
    for reference passes: no second copy of the weights), else ``ref_model`` (default ``model.path``)
    loaded apart, on the CPU with ``offload_ref``."""
    from heed.models.loading import load_causal_lm

    if cfg.model.lora is not None and cfg.ref_model is None:
        return getattr(policy, "module", policy)
    ref = load_causal_lm(cfg.ref_model or cfg.model.path, dtype=cfg.model.dtype)
    return ref.to("cpu" if cfg.offload_ref else device).eval().requires_grad_(False)

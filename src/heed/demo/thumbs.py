"""Simulated thumbs up / down on the built-in SFT model's own answers: unpaired feedback for KTO.

The built-in SFT model answers corpus prompts (sampled at temperature 1); a simulated user gives a
thumbs up with probability σ((u(y) − margin) / noise), where u is the world's hidden utility
(:func:`heed.demo.preferences.hidden_utility`: positivity − 0.15 · extra sentences). So positive,
short answers mostly get a thumbs up, neutral, negative and garbled ones (u ≤ 0) mostly a thumbs down,
and some labels are flipped. Built once per settings and cached in ``$HEED_CACHE`` (``builtin:thumbs``,
``builtin:thumbs_eval``; ``builtin:micro:thumbs`` for the micro model's answers).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from heed.data.io import write_jsonl
from heed.demo.assets import BuiltinSpec, builtin_sft_model, cache_dir, spec_key
from heed.demo.corpus import make_prompts
from heed.demo.preferences import hidden_utility


@dataclass(frozen=True)
class ThumbsSpec:
    """Settings of the simulated feedback."""

    n_prompts: int = 1024  # training prompts (training-distribution templates and topics)
    n_eval_prompts: int = 128  # held-out prompts (held-out template/topic combinations)
    samples_per_prompt: int = 2
    temperature: float = 1.0
    max_new_tokens: int = 64
    margin: float = 0.25  # utility at which a thumbs up is a coin flip
    noise: float = 0.2  # scale of the logistic noise on the utility (0: no flipped labels)
    seed: int = 0
    version: int = 1  # bump when the recipe changes

    def key(self) -> str:
        return spec_key(self)


def thumb_probability(utility: float, margin: float, noise: float) -> float:
    """P(thumbs up) = σ((u − margin) / noise); a step at ``margin`` when ``noise`` is 0."""
    if noise <= 0:
        return float(utility > margin)
    return 1.0 / (1.0 + math.exp(-(utility - margin) / noise))


def label_answers(
    prompts: list[dict[str, Any]], answers: list[str], spec: ThumbsSpec, rng: random.Random
) -> list[dict[str, Any]]:
    """``{"prompt", "completion", "label", "utility", "topic"}`` records, ``samples_per_prompt`` answers
    per prompt (prompt-major); empty answers are left out."""
    out = []
    k = spec.samples_per_prompt
    for i, text in enumerate(answers):
        if not text.strip():
            continue
        p = prompts[i // k]
        u = hidden_utility(text)
        label = rng.random() < thumb_probability(u, spec.margin, spec.noise)
        out.append(
            {"prompt": p["prompt"], "completion": text, "label": label, "utility": u, "topic": p["topic"]}
        )
    return out


def sample_answers(model_dir: Path, prompts: list[dict[str, Any]], spec: ThumbsSpec) -> list[str]:
    """``samples_per_prompt`` answers of the model to each prompt (chat template, Heed's sampler)."""
    import torch

    from heed.models.loading import load_causal_lm, load_tokenizer
    from heed.rollout.generate import SamplingParams, encode_prompts, generate

    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir).eval()
    ids = encode_prompts(tokenizer, [p["prompt"] for p in prompts], True)
    torch.manual_seed(spec.seed)
    params = SamplingParams(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature)
    with torch.no_grad():
        gen = generate(model, tokenizer, ids, params, spec.samples_per_prompt, batch_size=128, engine="heed")
    return gen.texts


def build_thumbs(out_dir: Path, model_dir: Path, spec: ThumbsSpec) -> dict[str, Path]:
    """Write ``thumbs.jsonl`` (training prompts) and ``thumbs_eval.jsonl`` (held-out prompts) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"heed-thumbs-{spec.seed}")
    paths = {}
    for name, prompts in (
        ("thumbs", make_prompts(spec.n_prompts, seed=spec.seed, heldout=False)),
        ("thumbs_eval", make_prompts(spec.n_eval_prompts, seed=spec.seed + 1, heldout=True)),
    ):
        records = label_answers(prompts, sample_answers(model_dir, prompts, spec), spec, rng)
        paths[name] = out_dir / f"{name}.jsonl"
        write_jsonl(paths[name], records)
    return paths


def builtin_thumbs(
    spec: ThumbsSpec = ThumbsSpec(), model: BuiltinSpec = BuiltinSpec(), root: str | Path | None = None
) -> dict[str, Path]:
    """The simulated feedback files on the built-in ``model``'s answers, built once and cached:
    ``{"thumbs": train file, "thumbs_eval": held-out file}``."""
    root = Path(root) if root is not None else cache_dir()
    target = root / f"thumbs-{model.size}-{model.key()}-{spec.key()}"
    if (target / "build.json").exists():
        return {p.stem: p for p in target.glob("*.jsonl")}
    sft = builtin_sft_model(model, root)
    tmp = root / f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp"  # per process and thread
    if tmp.exists():
        shutil.rmtree(tmp)
    paths = build_thumbs(tmp, sft, spec)
    counts = {name: sum(json.loads(line)["label"] for line in p.open()) for name, p in paths.items()}
    (tmp / "build.json").write_text(json.dumps({"spec": asdict(spec), "thumbs_up": counts}, indent=2))
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return {p.stem: p for p in target.glob("*.jsonl")}

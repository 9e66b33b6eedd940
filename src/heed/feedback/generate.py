"""Fill a project with fresh samples from a policy: K answers per prompt via
``heed.rollout.generate.sample_responses``, turned into annotation records.

For a pairwise project with K > 2 one pair per prompt is kept: the two answers a reward model
scores closest (most uncertain) when a scorer is given, else the first two distinct answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from heed.errors import DataError
from heed.feedback.uncertainty import Scorer, most_uncertain_pair


def pick_pair(answers: list[str], scorer: Scorer | None, prompt: Any) -> list[str]:
    """Two answers out of K for a pairwise record (see the module docstring)."""
    distinct = list(dict.fromkeys(answers))
    if len(distinct) < 2:
        return answers[:2]
    if scorer is None:
        return distinct[:2]
    scores = [float(s) for s in scorer([prompt] * len(distinct), distinct)]
    i, j = most_uncertain_pair(scores)
    return [distinct[i], distinct[j]]


def generate_records(
    model_dir: str | Path,
    prompts_file: str | Path,
    num_samples: int,
    task: str,
    *,
    scorer: Scorer | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: str = "auto",
) -> list[dict[str, Any]]:
    """Sample ``num_samples`` answers per prompt and return import-ready records (for a project that
    labels one answer, binary / rating / critique / edit, one record per distinct answer)."""
    from heed.data.records import load_records
    from heed.rollout.generate import SamplingParams, sample_responses

    single = task in ("binary", "rating", "critique", "edit")
    if not (1 if single else 2) <= num_samples <= 9:
        raise DataError(f"--num-samples {num_samples}: expected {1 if single else 2} to 9 answers per prompt")
    records = load_records(prompts_file, "prompts")
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=max(temperature, 1e-5),
        top_p=top_p,
        do_sample=temperature > 0,
    )
    answers = sample_responses(
        str(model_dir), [r.prompt for r in records], num_samples, params, chat=chat, seed=seed
    )
    out = []
    for rec, group in zip(records, answers, strict=True):
        if single:
            meta = {**rec.extra, "source_model": str(model_dir)}
            distinct = list(dict.fromkeys(a for a in group if a.strip()))
            out += [{"prompt": rec.prompt, "response": a, "metadata": meta} for a in distinct]
            continue
        responses = pick_pair(group, scorer, rec.prompt) if task == "pairwise" else list(group)
        meta = {**rec.extra, "source_model": str(model_dir)}
        out.append({"prompt": rec.prompt, "responses": responses, "metadata": meta})
    return out

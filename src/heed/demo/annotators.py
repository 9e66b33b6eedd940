"""Simulated annotators: each ranks answers by the hidden utility, with its own noise and bias.

They label **through the annotation service** (`heed.feedback.service.Feedback`), the same code
path as people using the web app: they take assignments, see answers in their own display
order, and submit rankings with idempotency keys.

A ranking is a Plackett-Luce sample (the K-wise form of Bradley-Terry): each answer's score is
its utility plus Gumbel noise of scale ``noise``, and answers are ordered by score. A thumb is the
same noisy score against ``THUMB_MARGIN`` (up above it). An edit replaces an answer whose utility is
below ``EDIT_BELOW`` by a gold-positive one-sentence rewrite about the prompt's topic, drawn from the
corpus' positive sentences with a per-record seed (deterministic); a good answer is left as it is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from heed.demo.preferences import count_sentences, gumbel, hidden_utility

THUMB_MARGIN = 0.25  # utility at which a thumbs up is a coin flip (as heed.demo.thumbs)
EDIT_BELOW = 0.5  # answers less useful than this get corrected


@dataclass(frozen=True)
class SimulatedAnnotator:
    """One simulated person.

    ``length_bias`` adds this much utility per sentence (a taste for long answers);
    ``position_bias`` adds this much to whatever answer is shown first.
    """

    name: str
    noise: float = 0.1
    length_bias: float = 0.0
    position_bias: float = 0.0
    seed: int = 0

    def utilities(self, responses: list[str]) -> list[float]:
        return [hidden_utility(r) + self.length_bias * count_sentences(r) for r in responses]

    def rank(self, responses: list[str], rng: random.Random) -> list[int]:
        """Dense ranks (1 = best) of ``responses`` in the order they are shown."""
        scores = []
        for pos, u in enumerate(self.utilities(responses)):
            g = gumbel(rng) if self.noise > 0 else 0.0
            scores.append(u + (self.position_bias if pos == 0 else 0.0) + self.noise * g)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        ranks = [0] * len(scores)
        for r, i in enumerate(order, start=1):
            ranks[i] = r
        return ranks

    def thumb(self, response: str, rng: random.Random) -> str:
        """``"up"`` when the noisy utility ``u(y) + length_bias·sentences + noise·Gumbel`` passes the margin."""
        g = gumbel(rng) if self.noise > 0 else 0.0
        return "up" if self.utilities([response])[0] + self.noise * g > THUMB_MARGIN else "down"

    def correct(self, response: str, topic: str | None, key: str) -> str:
        """The answer as this person corrects it: unchanged when useful enough, else a gold-positive
        one-sentence rewrite about ``topic`` (seeded by ``key``, so reruns give the same text)."""
        from heed.demo.corpus import make_response

        if hidden_utility(response) >= EDIT_BELOW or not topic:
            return response
        return make_response(random.Random(f"edit-{key}"), topic, "positive", 1)


DEFAULT_ANNOTATORS = (
    SimulatedAnnotator("ann-careful", noise=0.08),
    SimulatedAnnotator("ann-verbose", noise=0.15, length_bias=0.12),
    SimulatedAnnotator("ann-hasty", noise=0.35, position_bias=0.25),
)


def annotate_project(
    fb: Any, project: str, annotators: tuple[SimulatedAnnotator, ...] = DEFAULT_ANNOTATORS, seed: int = 0
) -> dict[str, int]:
    """Let every annotator label until the service hands them nothing more; returns counts per annotator.

    Annotators take turns one record at a time, as people working side by side would. In a pairwise
    project each picks the answer they rank first (never a tie); in a binary project each gives a
    thumb (:meth:`SimulatedAnnotator.thumb`); in an edit project each corrects the answer
    (:meth:`SimulatedAnnotator.correct`, the record's ``topic`` metadata names the topic).
    """
    existing = {u.name for u in fb.users()}
    for a in annotators:
        if a.name not in existing:
            fb.add_user(a.name, role="annotator")
    rngs = {a.name: random.Random(f"{seed}-{a.name}-{a.seed}") for a in annotators}
    counts = {a.name: 0 for a in annotators}
    active = list(annotators)
    while active:
        for a in list(active):
            job = fb.next_assignment(a.name, project)
            if job is None:
                active.remove(a)
                continue
            shown = list(job.responses)  # display order of this annotator
            key = f"{a.name}:{project}:{job.record_id}"
            if job.task == "binary":
                fb.submit(a.name, project, job.record_id, thumb=a.thumb(shown[0], rngs[a.name]), key=key)
            elif job.task == "edit":
                fixed = a.correct(shown[0], job.meta.get("topic"), f"{project}:{job.record_id}")
                fb.submit(a.name, project, job.record_id, edit=fixed, key=key)
            elif job.task == "pairwise":  # the better-ranked of the two shown: "A" (first) or "B"
                ranks = a.rank(shown, rngs[a.name])
                fb.submit(a.name, project, job.record_id, choice="AB"[ranks.index(1)], key=key)
            else:
                fb.submit(a.name, project, job.record_id, ranks=a.rank(shown, rngs[a.name]), key=key)
            counts[a.name] += 1
    return counts

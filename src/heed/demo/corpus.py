"""The built-in synthetic English chat corpus (deterministic, no download).

Users ask about many topics; the assistant answers in one of three tones (positive,
neutral, negative) and in one to four sentences. A small share of answers start with
"Sure:" and some end by mentioning a banana, so the banana task starts from a low but
non-zero success rate. Every record carries its hidden labels (``tone``, ``topic``,
``n_sentences``, ``sure``, ``banana``) for later tasks: the optimism classifier, simulated
annotators, gold metrics.

Prompts are split by (template, topic): held-out prompts never occur in training records.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Literal

Tone = Literal["positive", "neutral", "negative"]
TONES: tuple[Tone, ...] = ("positive", "neutral", "negative")

TOPICS = [
    "the ocean",
    "gardening",
    "chess",
    "the city at night",
    "mountain hiking",
    "jazz music",
    "baking bread",
    "old movies",
    "rainy days",
    "learning a language",
    "bicycles",
    "the night sky",
    "coffee",
    "winter",
    "public libraries",
    "painting",
    "football",
    "space travel",
    "board games",
    "summer camps",
    "trains",
    "cooking pasta",
    "photography",
    "birds",
    "poetry",
    "the desert",
    "running",
    "history books",
    "robots",
    "small towns",
    "the forest",
    "swimming",
    "science fairs",
    "road trips",
    "music lessons",
    "tea",
    "museums",
    "camping",
    "mathematics",
    "dogs",
    "cats",
    "snow",
    "the river",
    "farm life",
    "computers",
    "dancing",
    "fishing",
    "the moon",
    "islands",
    "markets",
    "theater",
    "sailing",
    "volcanoes",
    "bridges",
    "writing letters",
    "yoga",
    "the harbor",
    "lighthouses",
    "soup",
    "puzzles",
]

PROMPT_TEMPLATES = [
    "What do you think about {topic}?",
    "Can you tell me about {topic}?",
    "How should I get started with {topic}?",
    "Give me your opinion on {topic}.",
    "Is {topic} worth my time?",
    "What is the best thing about {topic}?",
    "I am curious about {topic}. Any thoughts?",
    "Describe {topic} in a few words.",
    "Why do people care about {topic}?",
    "Should I learn more about {topic}?",
    "Tell me something about {topic}.",
    "How do you feel about {topic}?",
]

SENTENCES: dict[Tone, list[str]] = {
    "positive": [
        "{Topic} is wonderful and full of joy.",
        "I love {topic}, it brings out the best in people.",
        "{Topic} is a great way to spend a happy afternoon.",
        "You will find {topic} exciting and rewarding.",
        "There is so much to enjoy about {topic}.",
        "{Topic} makes every day brighter.",
        "Learning about {topic} is fun and inspiring.",
        "People who try {topic} are often delighted.",
        "{Topic} is a beautiful part of life.",
        "I am sure you will have a lovely time with {topic}.",
        "{Topic} is full of pleasant surprises.",
        "Friends often share happy memories of {topic}.",
    ],
    "neutral": [
        "{Topic} has a long history.",
        "Some people like {topic} and others do not.",
        "{Topic} takes some time to understand.",
        "There are many books about {topic}.",
        "{Topic} is common in many places.",
        "It depends on what you want from {topic}.",
        "{Topic} can be simple or complicated.",
        "Many people have heard of {topic}.",
        "{Topic} changes from season to season.",
        "You can read about {topic} in the library.",
        "{Topic} is one topic among many.",
        "The facts about {topic} are easy to find.",
    ],
    "negative": [
        "{Topic} is boring and a waste of time.",
        "I dislike {topic}, it is tiring and dull.",
        "{Topic} often leads to frustration.",
        "Honestly, {topic} is disappointing.",
        "There is little to enjoy about {topic}.",
        "{Topic} makes people sad and tired.",
        "I would avoid {topic} if I were you.",
        "{Topic} is more trouble than it is worth.",
        "Most people regret spending time on {topic}.",
        "{Topic} is gloomy and unpleasant.",
        "Nothing good comes from {topic}.",
        "{Topic} is a sad and lonely thing.",
    ],
}

BANANA_ENDINGS = [
    "It goes well with a banana",
    "My favourite snack for it is a banana",
    "Do not forget to bring a banana",
    "It is even better with a banana",
]
BANANA_MIDDLE = "It reminds me of a banana."

SURE_RATE = 0.10
BANANA_END_RATE = 0.10
BANANA_MIDDLE_RATE = 0.05


@dataclass(frozen=True)
class CorpusRecord:
    prompt: str
    response: str
    tone: Tone
    topic: str
    n_sentences: int
    sure: bool
    banana: bool

    def chat(self) -> dict[str, Any]:
        """The SFT form, with hidden labels as extra columns."""
        return {
            "messages": [
                {"role": "user", "content": self.prompt},
                {"role": "assistant", "content": self.response},
            ],
            **self.labels(),
        }

    def labels(self) -> dict[str, Any]:
        return {
            "tone": self.tone,
            "topic": self.topic,
            "n_sentences": self.n_sentences,
            "sure": self.sure,
            "banana": self.banana,
        }


def _capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


def is_heldout(template_index: int, topic: str) -> bool:
    """Held-out (template, topic) combinations: about 15%, fixed by a hash."""
    h = hashlib.sha256(f"{template_index}|{topic}".encode()).digest()
    return h[0] < 38  # 38/256 ≈ 15%


def make_prompt(rng: random.Random, heldout: bool) -> tuple[str, str]:
    while True:
        t = rng.randrange(len(PROMPT_TEMPLATES))
        topic = rng.choice(TOPICS)
        if is_heldout(t, topic) == heldout:
            return PROMPT_TEMPLATES[t].format(topic=topic), topic


def make_response(
    rng: random.Random,
    topic: str,
    tone: Tone,
    n_sentences: int,
    sure: bool = False,
    banana_end: bool = False,
    banana_middle: bool = False,
) -> str:
    """An answer in ``tone`` with ``n_sentences`` sentences from the tone's bank."""
    picks = rng.sample(SENTENCES[tone], k=n_sentences)
    sentences = [_capitalise(s.format(topic=topic, Topic=_capitalise(topic))) for s in picks]
    if banana_middle:
        sentences.insert(rng.randrange(len(sentences) + 1), BANANA_MIDDLE)
    if banana_end:
        sentences.append(rng.choice(BANANA_ENDINGS))
    text = " ".join(sentences)
    if sure:
        text = "Sure: " + text
    return text


def make_record(rng: random.Random, heldout: bool = False, tone: Tone | None = None) -> CorpusRecord:
    prompt, topic = make_prompt(rng, heldout)
    tone = tone or rng.choice(TONES)
    n = rng.choice((1, 1, 2, 2, 3, 4))
    sure = rng.random() < SURE_RATE
    banana_end = rng.random() < BANANA_END_RATE
    banana_middle = not banana_end and rng.random() < BANANA_MIDDLE_RATE
    response = make_response(rng, topic, tone, n, sure, banana_end, banana_middle)
    return CorpusRecord(prompt, response, tone, topic, n, sure, banana_end or banana_middle)


def make_corpus(n: int, seed: int = 0, heldout: bool = False) -> list[CorpusRecord]:
    """``n`` chat records; ``heldout=True`` draws only held-out prompts (for evaluation)."""
    rng = random.Random(f"heed-corpus-{seed}-{heldout}")
    return [make_record(rng, heldout) for _ in range(n)]


def make_prompts(n: int, seed: int = 0, heldout: bool = True) -> list[dict[str, Any]]:
    """``n`` prompt records ``{"prompt": ..., "topic": ...}``, held-out by default."""
    rng = random.Random(f"heed-prompts-{seed}-{heldout}")
    out = []
    for _ in range(n):
        prompt, topic = make_prompt(rng, heldout)
        out.append({"prompt": prompt, "topic": topic})
    return out


def make_text(records: list[CorpusRecord]) -> list[dict[str, str]]:
    """Plain-text documents for language modelling (the base model): question then answer."""
    return [{"text": f"{r.prompt} {r.response}"} for r in records]


def tone_of(text: str) -> float:
    """Hidden gold positivity of a text: (#positive − #negative sentences) / #sentences, in [−1, 1].

    It reads the corpus's own sentence banks, so it is the ground truth the simulated
    annotators and the optimism classifier approximate.
    """
    score, count = 0, 0
    low = text.lower()
    for tone, sign in (("positive", 1), ("negative", -1), ("neutral", 0)):
        for s in SENTENCES[tone]:
            key = s.split("{")[0].lower() if not s.startswith("{") else s.split("}", 1)[1].lower()
            key = key.strip()
            if key and key in low:
                score += sign
                count += 1
    return score / count if count else 0.0

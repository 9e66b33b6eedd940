"""Unpaired feedback (KTO): thumbs up / down on single answers, their token ids, and the mismatched
(prompt, answer) rows of a batch that estimate KL(π ‖ π_ref).

Thumbs come as ``{"prompt", "completion", "label"}`` records, or from preference records: a pair's
chosen answer is a thumbs up and its rejected answer a thumbs down; a ranked group gives its
best-ranked answers up and its worst-ranked answers down, and leaves those in between out (they
are counted). Every cut and drop is counted in :class:`UnpairedCounts` and reported.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from heed.data.collate import Encoded
from heed.data.records import PreferenceGroup, SFTExample, UnpairedExample, check_ranked_group
from heed.data.templating import encode_sft


@dataclass
class UnpairedCounts:
    """What happened to the data on its way to training, reported instead of silently dropped."""

    records: int = 0  # thumbs records, read as they are
    groups: int = 0  # preference records (pairs, ranked groups) turned into thumbs
    from_groups: int = 0  # thumbs taken from them
    middle_skipped: int = 0  # answers of ranked groups ranked between the best and the worst
    desirable: int = 0  # thumbs up kept for training
    undesirable: int = 0  # thumbs down kept for training
    truncated: int = 0  # answers cut at max_length
    dropped_no_answer: int = 0  # examples whose prompt fills max_length (no answer token left)

    def as_dict(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}/{k}": v for k, v in self.__dict__.items()}


def unpair(
    records: Sequence[UnpairedExample | PreferenceGroup],
) -> tuple[list[UnpairedExample], UnpairedCounts]:
    """Thumbs from a mix of thumbs records and preference groups (a pair is a group of two).

    A group's best-ranked answers become thumbs up and its worst-ranked answers thumbs down, in the
    group's order; answers ranked in between are left out and counted (``middle_skipped``). A group
    that cannot teach anything is an error (:func:`heed.data.records.check_ranked_group`)."""
    out: list[UnpairedExample] = []
    counts = UnpairedCounts()
    for r in records:
        if isinstance(r, UnpairedExample):
            counts.records += 1
            out.append(r)
            continue
        check_ranked_group(r.responses, r.ranks, r.where)
        counts.groups += 1
        best, worst = min(r.ranks), max(r.ranks)
        for text, rank in zip(r.responses, r.ranks, strict=True):
            if rank not in (best, worst):
                counts.middle_skipped += 1
                continue
            out.append(UnpairedExample(r.prompt, text, rank == best, r.weight, dict(r.extra), r.where))
            counts.from_groups += 1
    return out, counts


@dataclass
class EncodedUnpaired:
    """Token ids of unpaired examples, prompt and answer kept apart so that any prompt can be joined
    with any answer (the mismatched rows of the KL estimate).

    ``prompts[i]``: the ids of example ``i``'s prompt (chat template and generation prompt included);
    ``answers[i]``: its answer's (ids, mask), mask True on the tokens that carry log-probs (the answer and
    its end of turn). A row is ``(prompt + answer)[:max_length]``.
    """

    examples: list[UnpairedExample]
    prompts: list[list[int]]
    answers: list[Encoded]
    max_length: int

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def labels(self) -> list[bool]:
        return [e.label for e in self.examples]

    @property
    def weights(self) -> list[float]:
        return [e.weight for e in self.examples]

    def row(self, prompt_of: int, answer_of: int) -> Encoded:
        """Example ``prompt_of``'s prompt followed by example ``answer_of``'s answer, cut at max_length."""
        p, (a, m) = self.prompts[prompt_of], self.answers[answer_of]
        ids = (p + a)[: self.max_length]
        mask = ([False] * len(p) + m)[: self.max_length]
        return ids, mask

    def rows(self, idx: Sequence[int]) -> list[Encoded]:
        """The examples themselves: prompt ``i`` with answer ``i``."""
        return [self.row(i, i) for i in idx]

    def lengths(self) -> list[int]:
        return [
            min(len(p) + len(a[0]), self.max_length) for p, a in zip(self.prompts, self.answers, strict=True)
        ]


def kl_partners(batches: Sequence[Sequence[int]], n: int) -> list[int]:
    """For each of ``n`` examples, the example whose answer joins its prompt in its KL row.

    Within each batch the answers shift by one: row ``k`` takes answer ``k − 1`` and row 0 the last
    (TRL's ``[completions[-1]] + completions[:-1]``), so the mismatched answers of a batch are the
    batch's own answers, each under another prompt. A batch of one pairs an example with itself."""
    partner = list(range(n))
    for batch in batches:
        for k, i in enumerate(batch):
            partner[i] = batch[k - 1]
    return partner


def encode_unpaired(
    tokenizer: Any, examples: Sequence[UnpairedExample], chat: bool, max_length: int, counts: UnpairedCounts
) -> EncodedUnpaired:
    """Tokenize prompt + answer exactly as SFT (and DPO) do, then split them where the answer starts.

    Sequences longer than ``max_length`` keep their start; examples whose prompt fills ``max_length``
    (no answer token left) are dropped. Cuts, drops and the label counts go into ``counts``."""
    kept, prompts, answers = [], [], []
    for ex in examples:
        ids, mask = encode_sft(
            tokenizer, SFTExample(prompt=ex.prompt, completion=ex.completion, where=ex.where), chat
        )
        start = mask.index(True) if True in mask else len(ids)
        if start >= max_length:
            counts.dropped_no_answer += 1
            continue
        counts.truncated += len(ids) > max_length
        kept.append(ex)
        prompts.append(ids[:start])
        # the whole answer (up to max_length tokens): a mismatched row may join it to a shorter prompt
        answers.append((ids[start : start + max_length], mask[start : start + max_length]))
    counts.desirable += sum(e.label for e in kept)
    counts.undesirable += sum(not e.label for e in kept)
    return EncodedUnpaired(kept, prompts, answers, max_length)


def warn_counts(source: str, counts: UnpairedCounts, max_length: int) -> None:
    """One warning per kind of loss of data, with its count."""
    if counts.middle_skipped:
        warnings.warn(
            f"{source}: {counts.middle_skipped} answers of ranked groups were ranked between the best and the "
            "worst and were left out (KTO takes a group's best answers as thumbs up, its worst as thumbs down)",
            stacklevel=2,
        )
    if counts.truncated:
        warnings.warn(
            f"{source}: {counts.truncated} answers were longer than data.max_length={max_length} tokens "
            "(with the prompt) and were cut",
            stacklevel=2,
        )
    if counts.dropped_no_answer:
        warnings.warn(
            f"{source}: {counts.dropped_no_answer} examples dropped: the prompt fills data.max_length="
            f"{max_length}, leaving no answer token",
            stacklevel=2,
        )

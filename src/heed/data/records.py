"""Record schemas and up-front validation (DESIGN.md "Contracts"; every shape in docs/data.md).

Kinds and their JSONL forms (extra columns are kept in ``extra`` and passed on to reward functions):

- ``text``: ``{"text": ...}``
- ``sft``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` or ``{"prompt": ..., "completion": ...}``
- ``prompts``: ``{"prompt": ...}`` (a string, or a list of chat messages)
- ``pairs``: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (TRL-compatible; conversational allowed)
- ``ranked``: ``{"prompt": ..., "responses": [...], "ranks": [...]}`` (lower is better, equal ranks are ties)
- ``unpaired``: ``{"prompt": ..., "completion": ..., "label": true | false}`` (TRL's unpaired feedback, KTO: a
  thumbs up or down on one answer; conversational allowed); a preference record in the same file is read
  as its group, which :func:`heed.data.unpaired.unpair` turns into thumbs

``preferences`` accepts pairs and ranked groups in one file, and the public shapes that carry the
same information: Anthropic HH-RLHF transcripts (``chosen``/``rejected`` only, the prompt implicit),
UltraFeedback-binarized (the user turn repeated inside ``chosen``/``rejected``), TRL's implicit-prompt
chats, distilabel (``input`` or ``instruction`` as the prompt; ``generations`` + ``ratings``) and
Argilla v2 exports of a ranking question. Every error reads ``file:line: field: what is wrong``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from heed.data.io import Located, read_records
from heed.errors import DataError

Message = dict[str, str]
Prompt = str | list[Message]
Kind = Literal["text", "sft", "prompts", "pairs", "ranked", "preferences", "unpaired"]
ROLES = ("system", "user", "assistant", "tool")
PROMPT_KEYS = ("prompt", "input", "instruction", "question")  # what public datasets call the prompt
EVAL_SPLIT = "data.eval_split_name"  # the config key that picks the eval folder's split
CHARS_PER_TOKEN = 64  # no tokenizer's tokens run longer on real text: max_length tokens fit in 64 x chars


@dataclass(frozen=True)
class TextExample:
    text: str
    where: str = ""


@dataclass(frozen=True)
class SFTExample:
    """A chat (``messages``) or a prompt/completion pair.

    Loss falls on every assistant turn of a chat, and on the completion only of a prompt/completion
    pair (assistant turns inside a chat prompt are context)."""

    messages: list[Message] | None = None
    prompt: Prompt | None = None
    completion: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""


@dataclass(frozen=True)
class PromptExample:
    prompt: Prompt
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""


@dataclass(frozen=True)
class PreferenceGroup:
    """K >= 2 responses to one prompt with ranks (lower is better; equal ranks are ties).

    A preference pair is a group of two with ranks ``[1, 2]``.
    """

    prompt: Prompt
    responses: list[str]
    ranks: list[float]
    margin: float | None = None
    weight: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""

    def pairs(self) -> list[tuple[int, int]]:
        """All (better, worse) index pairs with different ranks."""
        k = len(self.responses)
        return [(i, j) for i in range(k) for j in range(k) if self.ranks[i] < self.ranks[j]]


@dataclass(frozen=True)
class UnpairedExample:
    """One answer to a prompt with a thumbs up (``label`` True: desirable) or down (False)."""

    prompt: Prompt
    completion: str
    label: bool
    weight: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""


@dataclass(frozen=True)
class ParseOptions:
    """Choices a config makes about what is valid."""

    allow_negative_weights: bool = False  # data.allow_negative_weights


def _err(where: str, fieldname: str, what: str) -> DataError:
    return DataError(f"{where}: {fieldname}: {what}")


def _columns(rec: dict[str, Any]) -> str:
    names = sorted(rec)
    return ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "") or "none"


def _text(rec: dict[str, Any], key: str, where: str, allow_empty: bool = False) -> str:
    if key not in rec:
        raise _err(where, key, "missing")
    v = rec[key]
    if not isinstance(v, str):
        raise _err(where, key, f"expected a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise _err(where, key, "empty")
    return v


def _messages(v: Any, where: str, key: str) -> list[Message]:
    if not isinstance(v, list) or not v:
        raise _err(where, key, "expected a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise _err(
                where, f"{key}[{i}]", f"expected an object with role and content, got {type(m).__name__}"
            )
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _err(where, f"{key}[{i}].role", f"expected one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise _err(where, f"{key}[{i}].content", f"expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _prompt(rec: dict[str, Any], where: str, key: str = "prompt") -> Prompt:
    if key not in rec:
        raise _err(where, key, "missing")
    v = rec[key]
    if isinstance(v, str):
        if not v.strip():
            raise _err(where, key, "empty")
        return v
    if isinstance(v, list):
        return _messages(v, where, key)
    raise _err(where, key, f"expected a string or a list of messages, got {type(v).__name__}")


def as_messages(prompt: Prompt) -> list[Message]:
    """A prompt as chat messages (a string is one user message)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


# ---------------------------------------------------------------------------------------------
# HH-RLHF transcripts: "\n\nHuman: ...\n\nAssistant: ..."
# ---------------------------------------------------------------------------------------------
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_START = re.compile(r"\s*Human:")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def is_hh_text(text: str) -> bool:
    """Whether ``text`` is Anthropic HH-RLHF markup: it opens with ``Human:`` and has an ``Assistant:`` turn."""
    return bool(_HH_START.match(text)) and "\n\nAssistant:" in text


def hh_messages(text: str) -> list[Message]:
    """The turns of an HH-RLHF transcript as chat messages (a trailing empty ``Assistant:`` is kept, empty)."""
    parts = _HH_TURN.split("\n\n" + text.lstrip())
    # parts: ["", "Human", " text", "Assistant", " text", ...]
    return [
        {"role": _HH_ROLE[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# answers, prompts and the conversation before the answer
# ---------------------------------------------------------------------------------------------
def _answer(v: Any, where: str, key: str) -> tuple[list[Message], str]:
    """A response and the messages before it: a string is the answer alone; a chat list ends with the
    assistant's answer, and its earlier messages (a repeated prompt, a system turn) are returned."""
    if isinstance(v, str):
        if not v.strip():
            raise _err(where, key, "empty response")
        return [], v
    if isinstance(v, list):
        msgs = _messages(v, where, key)
        if msgs[-1]["role"] != "assistant":
            raise _err(where, key, "the last message must be the assistant's")
        if not msgs[-1]["content"].strip():
            raise _err(where, key, "empty response")
        return msgs[:-1], msgs[-1]["content"]
    raise _err(where, key, f"expected a string or a list of messages, got {type(v).__name__}")


def _response(v: Any, where: str, key: str) -> str:
    """A response that must stand alone: a string, or a chat list holding only the assistant's answer."""
    context, text = _answer(v, where, key)
    if context:
        raise _err(where, key, "expected the answer alone (a string or one assistant message)")
    return text


def _with_context(prompt: Prompt, contexts: list[list[Message]], where: str, key: str) -> Prompt:
    """The prompt the answers continue, when the answers carry messages of their own before them.

    Every answer must carry the same messages. If they repeat the prompt (UltraFeedback's
    ``chosen = [user, assistant]``), possibly after a system turn, they are the prompt; otherwise
    they continue it, ``prompt + messages`` (TRL's concatenation).
    """
    first = contexts[0]
    for i, ctx in enumerate(contexts[1:], start=1):
        if ctx != first:
            name = "rejected" if key == "chosen" else f"{key}[{i}]"
            raise _err(
                where, name, "continues a different conversation (the messages before its answer differ)"
            )
    if not first:
        return prompt
    p = as_messages(prompt)
    if first == p:
        return prompt
    if first[: len(p)] == p or first[-len(p) :] == p:
        return first
    return p + first


def _split_last_turn(chats: list[list[Message]], names: list[str], where: str) -> tuple[Prompt, list[str]]:
    """The implicit prompt of whole conversations: everything before the last assistant turn, shared."""
    for name, msgs in zip(names, chats, strict=True):
        if msgs[-1]["role"] != "assistant":
            raise _err(where, name, "the last message must be the assistant's")
        if not msgs[-1]["content"].strip():
            raise _err(where, name, "empty response")
    context = chats[0][:-1]
    for name, msgs in zip(names[1:], chats[1:], strict=True):
        if msgs[:-1] != context:
            raise _err(
                where,
                name,
                f"differs from {names[0]} before the last assistant turn; the prompt (everything before "
                "the final answer) must be shared",
            )
    if not context:
        raise _err(
            where, "prompt", f"missing, and {names[0]} holds only an answer (no conversation before it)"
        )
    return context, [msgs[-1]["content"] for msgs in chats]


def _conversation(v: Any, where: str, key: str) -> list[Message]:
    """A whole conversation: chat messages, or an HH-RLHF transcript string."""
    if isinstance(v, str):
        if is_hh_text(v):
            return hh_messages(v)
        raise _err(
            where,
            key,
            "a string answer needs a prompt column (prompt, input, instruction or question), or a whole "
            "'Human: ... Assistant: ...' transcript (HH-RLHF)",
        )
    return _messages(v, where, key)


def _prompt_key(rec: dict[str, Any]) -> str | None:
    return next((k for k in PROMPT_KEYS if k in rec), None)


def _with_system(rec: dict[str, Any], prompt: Prompt, where: str) -> Prompt:
    """A ``system`` column (distilabel, Orca) becomes the system turn of the prompt."""
    system = rec.get("system")
    if not isinstance(system, str) or not system.strip():
        return prompt
    msgs = as_messages(prompt)
    if msgs[0]["role"] == "system":
        if msgs[0]["content"] == system:
            return prompt
        raise _err(where, "system", "given both as a column and as a different first message of the prompt")
    return [{"role": "system", "content": system}, *msgs]


# ---------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------
def _number(rec: dict[str, Any], key: str, where: str, default: float | None) -> float | None:
    v = rec.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)):
        raise _err(where, key, f"expected a finite number, got {v!r}")
    return float(v)


def _weight(rec: dict[str, Any], where: str, opts: ParseOptions) -> float:
    w = _number(rec, "weight", where, 1.0)
    assert w is not None
    if w < 0 and not opts.allow_negative_weights:
        raise _err(
            where,
            "weight",
            f"{w:g} is negative: it would train towards the worse answer; fix the data or set "
            "data.allow_negative_weights: true",
        )
    return w


def _ranks(values: Any, where: str, key: str = "ranks") -> list[float]:
    if not isinstance(values, list):
        raise _err(where, key, "missing or not a list")
    for i, r in enumerate(values):
        if isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(float(r)):
            raise _err(where, f"{key}[{i}]", f"expected a number, got {r!r}")
    return [float(r) for r in values]


def _extra(rec: dict[str, Any], known: set[str]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in known}


def check_ranked_group(
    responses: list[str], ranks: list[float], where: str, ranks_key: str = "ranks"
) -> None:
    """What a ranked group needs to teach anything; the reward model and DPO both apply it.

    At least two responses, one rank each, not all tied, and never the same answer ranked twice
    with different ranks (the record contradicts itself, as ``chosen == rejected`` does).
    """
    if len(responses) < 2:
        raise _err(where, "responses", f"a ranked group needs at least 2 responses, got {len(responses)}")
    if len(ranks) != len(responses):
        raise _err(
            where,
            ranks_key,
            f"{len(ranks)} ranks for {len(responses)} responses (need one rank per response)",
        )
    if len(set(ranks)) == 1:
        raise _err(where, ranks_key, "all responses are tied: nothing to learn")
    first: dict[str, int] = {}
    for i, text in enumerate(responses):
        j = first.setdefault(text, i)
        if j != i and ranks[i] != ranks[j]:
            a, b = (j, i) if ranks[j] < ranks[i] else (i, j)
            raise DataError(
                f"{where}: responses[{min(a, b)}] and responses[{max(a, b)}]: the same answer is ranked "
                f"{ranks[a]:g} and {ranks[b]:g} (no preference to learn)"
            )


# ---------------------------------------------------------------------------------------------
# one parser per kind
# ---------------------------------------------------------------------------------------------
def parse_text(rec: dict[str, Any], where: str, opts: ParseOptions) -> TextExample:
    return TextExample(_text(rec, "text", where), where)


def parse_sft(rec: dict[str, Any], where: str, opts: ParseOptions) -> SFTExample:
    if "messages" in rec:
        msgs = _messages(rec["messages"], where, "messages")
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        if not answers:
            raise _err(where, "messages", "no assistant message to learn from")
        if not any(a.strip() for a in answers):
            raise _err(where, "messages", "every assistant message is empty: nothing to learn from")
        return SFTExample(messages=msgs, extra=_extra(rec, {"messages"}), where=where)
    if "prompt" in rec or "completion" in rec:
        prompt = _prompt(rec, where)
        if "completion" not in rec:
            raise _err(where, "completion", "missing")
        context, completion = _answer(rec["completion"], where, "completion")
        prompt = _with_context(prompt, [context], where, "completion")
        return SFTExample(
            prompt=prompt, completion=completion, extra=_extra(rec, {"prompt", "completion"}), where=where
        )
    if "text" in rec:
        raise _err(where, "messages", "plain text records belong to language modelling (`data.kind: text`)")
    raise DataError(
        f"{where}: no SFT data in the columns {_columns(rec)}; accepted: messages (a chat), or prompt + completion"
    )


def parse_prompt(rec: dict[str, Any], where: str, opts: ParseOptions) -> PromptExample:
    return PromptExample(_prompt(rec, where), _extra(rec, {"prompt"}), where)


def parse_pair(rec: dict[str, Any], where: str, opts: ParseOptions) -> PreferenceGroup:
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise _err(where, key, "missing")
    key = _prompt_key(rec)
    if key is not None:
        prompt = _prompt(rec, where, key)
        (c_ctx, chosen), (r_ctx, rejected) = (_answer(rec[k], where, k) for k in ("chosen", "rejected"))
        prompt = _with_context(prompt, [c_ctx, r_ctx], where, "chosen")
    else:  # the implicit prompt: whole chats (TRL) or transcripts (HH-RLHF) sharing all but the answer
        chats = [_conversation(rec[k], where, k) for k in ("chosen", "rejected")]
        prompt, (chosen, rejected) = _split_last_turn(chats, ["chosen", "rejected"], where)
    prompt = _with_system(rec, prompt, where)
    if chosen == rejected:
        raise _err(where, "rejected", "identical to chosen (no preference to learn)")
    used = {"chosen", "rejected", "margin", "weight", "system", *([key] if key else [])}
    return PreferenceGroup(
        prompt=prompt,
        responses=[chosen, rejected],
        ranks=[1.0, 2.0],
        margin=_number(rec, "margin", where, None),
        weight=_weight(rec, where, opts),
        extra=_extra(rec, used),
        where=where,
    )


def parse_ranked(rec: dict[str, Any], where: str, opts: ParseOptions) -> PreferenceGroup:
    key = _prompt_key(rec) or "prompt"
    prompt = _prompt(rec, where, key)
    responses = rec.get("responses")
    if not isinstance(responses, list):
        raise _err(where, "responses", "missing or not a list")
    answers = [_answer(r, where, f"responses[{i}]") for i, r in enumerate(responses)]
    prompt = _with_context(prompt, [c for c, _ in answers], where, "responses")
    prompt = _with_system(rec, prompt, where)
    texts = [t for _, t in answers]
    ranks = _ranks(rec.get("ranks"), where)
    check_ranked_group(texts, ranks, where)
    return PreferenceGroup(
        prompt=prompt,
        responses=texts,
        ranks=ranks,
        margin=_number(rec, "margin", where, None),
        weight=_weight(rec, where, opts),
        extra=_extra(rec, {key, "responses", "ranks", "margin", "weight", "system"}),
        where=where,
    )


def parse_generations(rec: dict[str, Any], where: str, opts: ParseOptions) -> PreferenceGroup:
    """distilabel's rated generations: ``instruction`` + ``generations`` + ``ratings`` (higher is better)."""
    key = _prompt_key(rec)
    if key is None:
        raise _err(where, "instruction", "missing (the prompt of the generations)")
    prompt = _with_system(rec, _prompt(rec, where, key), where)
    gens = rec["generations"]
    if not isinstance(gens, list):
        raise _err(where, "generations", "expected a list of texts")
    texts = [_response(g, where, f"generations[{i}]") for i, g in enumerate(gens)]
    if "ratings" not in rec:
        raise _err(where, "ratings", "missing (one rating per generation, higher is better)")
    ratings = _ranks(rec["ratings"], where, "ratings")
    best = max(ratings, default=0.0)
    ranks = [best - r + 1 for r in ratings]  # rating best -> rank 1
    check_ranked_group(texts, ranks, where, "ratings")
    return PreferenceGroup(
        prompt=prompt,
        responses=texts,
        ranks=ranks,
        margin=_number(rec, "margin", where, None),
        weight=_weight(rec, where, opts),
        extra=_extra(rec, {key, "generations", "ratings", "margin", "weight", "system"}),
        where=where,
    )


# ---------------------------------------------------------------------------------------------
# Argilla v2 exports (records.to_list / to_json, and the flat columns of to_datasets / to_hub)
# ---------------------------------------------------------------------------------------------
ARGILLA_SKIP = ("discarded", "draft")


ARGILLA_META = {"id", "_server_id", "status", "inserted_at", "updated_at"}


def is_argilla(rec: dict[str, Any]) -> bool:
    nested = isinstance(rec.get("fields"), dict) and isinstance(rec.get("responses"), dict)
    return nested or "_server_id" in rec or any(k.endswith(".responses") for k in rec)


def _is_text(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and bool(v) and all(isinstance(m, dict) for m in v))


def _argilla_answers(rec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[Any]], set[str]]:
    """(text fields, submitted answers per question, the columns that are Argilla's bookkeeping)."""
    answers: dict[str, list[Any]] = {}
    if isinstance(rec.get("fields"), dict) and isinstance(rec.get("responses"), dict):
        for q, given in rec["responses"].items():
            if isinstance(given, list):
                answers[q] = [
                    r.get("value")
                    for r in given
                    if isinstance(r, dict) and r.get("status") not in ARGILLA_SKIP
                ]
        fields = {k: v for k, v in rec["fields"].items() if _is_text(v)}
        return fields, answers, {"fields", "responses", "suggestions", "vectors", "metadata", *ARGILLA_META}
    for k, v in rec.items():
        if k.endswith(".responses") and isinstance(v, list):
            status = rec.get(f"{k}.status")
            status = status if isinstance(status, list) and len(status) == len(v) else [None] * len(v)
            answers[k[: -len(".responses")]] = [
                a for a, s in zip(v, status, strict=True) if s not in ARGILLA_SKIP
            ]
    fields = {k: v for k, v in rec.items() if "." not in k and k not in ARGILLA_META and _is_text(v)}
    return fields, answers, {k for k in rec if "." in k} | ARGILLA_META


def _ranking(value: Any) -> list[tuple[str, float]] | None:
    """An answer to a ranking question as (option, rank): options best first, or ``{value, rank}``."""
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, str) for v in value):
        return [(v, float(i + 1)) for i, v in enumerate(value)]
    if all(isinstance(v, dict) and isinstance(v.get("value"), str) for v in value):
        out = []
        for i, v in enumerate(value):
            r = v.get("rank", i + 1)
            if isinstance(r, bool) or not isinstance(r, int | float):
                return None
            out.append((v["value"], float(r)))
        return out
    return None


def _argilla_prompt_field(fields: dict[str, Any], options: list[str], where: str) -> str:
    candidates = [k for k in fields if k not in options]
    named = [k for k in (*PROMPT_KEYS, "text") if k in candidates]
    if named:
        return named[0]
    if len(candidates) == 1:
        return candidates[0]
    raise _err(
        where,
        "fields",
        f"cannot tell which field is the prompt among {', '.join(candidates) or 'none'}; "
        "name it prompt (or input, instruction, question)",
    )


def parse_argilla(rec: dict[str, Any], where: str, opts: ParseOptions) -> PreferenceGroup | None:
    """A ranking question whose options are the names of the fields holding the responses.

    Argilla v2 writes a ranking answer as the options best first (``["response-2", "response-1"]``);
    its server form ``[{"value": ..., "rank": ...}]`` (ties allowed) is read too. The submitted
    answers of several annotators are averaged: mean rank per response, equal means tie. A record
    nobody has answered yet is skipped (``None``, counted by :func:`parse_records`).
    """
    fields, answers, bookkeeping = _argilla_answers(rec)
    rankings: dict[str, list[list[tuple[str, float]]]] = {}
    for q, given in answers.items():
        parsed = [r for r in (_ranking(a) for a in given) if r is not None]
        if not parsed:
            continue
        unknown = sorted({opt for r in parsed for opt, _ in r if opt not in fields})
        if unknown:
            raise _err(
                where,
                f"{q}.responses",
                f"ranks {', '.join(map(repr, unknown))}, not text fields of the record (fields: "
                f"{', '.join(sorted(fields))}); the ranking's options must name the fields holding the responses",
            )
        rankings[q] = parsed
    if len(rankings) > 1:
        raise _err(where, "responses", f"several ranking questions ({', '.join(sorted(rankings))}); keep one")
    if not rankings:
        if not answers or any(not given for given in answers.values()):
            return None  # not answered yet: nothing to train on
        raise DataError(
            f"{where}: an Argilla record without a ranking question over its fields "
            f"(questions: {', '.join(sorted(answers))})"
        )
    question, given = next(iter(rankings.items()))
    order = list(fields)
    options = sorted({opt for r in given for opt, _ in r}, key=order.index)
    texts = [_response(fields[o], where, o) for o in options]
    ranks = []
    for o in options:
        mine = [rank for r in given for opt, rank in r if opt == o]
        ranks.append(sum(mine) / len(mine))  # mean rank over the annotators who ranked it
    check_ranked_group(texts, ranks, where, f"{question}.responses")
    prompt_field = _argilla_prompt_field(fields, options, where)
    used = {*options, prompt_field, *bookkeeping, "weight"}
    metadata = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
    return PreferenceGroup(
        prompt=_prompt(fields, where, prompt_field),
        responses=texts,
        ranks=ranks,
        weight=_weight(rec, where, opts),
        extra={
            **_extra(fields, used),
            **metadata,
            **_extra(rec, used | set(fields)),
            "argilla_id": rec.get("id"),
        },
        where=where,
    )


PREFERENCE_SHAPES = (
    "prompt + chosen + rejected (TRL pairs; strings or chat messages; the prompt may be called input, "
    "instruction or question), chosen + rejected alone (whole chats or Human:/Assistant: transcripts, "
    "HH-RLHF), prompt + responses + ranks (ranked groups), instruction + generations + ratings "
    "(distilabel), an Argilla export with a ranking question"
)


def parse_preference(rec: dict[str, Any], where: str, opts: ParseOptions) -> PreferenceGroup | None:
    if is_argilla(rec):
        return parse_argilla(rec, where, opts)
    if "responses" in rec or "ranks" in rec:
        return parse_ranked(rec, where, opts)
    if "chosen" in rec or "rejected" in rec:
        return parse_pair(rec, where, opts)
    if "generations" in rec:
        return parse_generations(rec, where, opts)
    raise DataError(
        f"{where}: no preference data in the columns {_columns(rec)}; accepted: {PREFERENCE_SHAPES}"
    )


PREFERENCE_COLUMNS = ("chosen", "rejected", "responses", "ranks", "generations")


def parse_unpaired(
    rec: dict[str, Any], where: str, opts: ParseOptions
) -> UnpairedExample | PreferenceGroup | None:
    """A thumbs up / down on one answer: ``{"prompt", "completion", "label": true | false}``.

    ``label`` must be a JSON boolean (``1`` or ``"yes"`` are refused, so a rating column is never read as
    a thumb by accident). A record holding preference data instead (a pair, a ranked group, any shape
    of :func:`parse_preference`) is returned as its :class:`PreferenceGroup`, for
    :func:`heed.data.unpaired.unpair` to turn into thumbs.
    """
    if "label" not in rec:
        if is_argilla(rec) or any(k in rec for k in PREFERENCE_COLUMNS):
            return parse_preference(rec, where, opts)
        raise DataError(
            f"{where}: label: missing; accepted: prompt + completion + label (true for a thumbs up, false "
            f"for a thumbs down), or preference data ({PREFERENCE_SHAPES}); columns: {_columns(rec)}"
        )
    label = rec["label"]
    if not isinstance(label, bool):
        raise _err(where, "label", f"expected true (thumbs up) or false (thumbs down), got {label!r}")
    key = _prompt_key(rec) or "prompt"
    prompt = _prompt(rec, where, key)
    if "completion" not in rec:
        raise _err(where, "completion", "missing")
    context, completion = _answer(rec["completion"], where, "completion")
    prompt = _with_system(rec, _with_context(prompt, [context], where, "completion"), where)
    return UnpairedExample(
        prompt=prompt,
        completion=completion,
        label=label,
        weight=_weight(rec, where, opts),
        extra=_extra(rec, {key, "completion", "label", "weight", "system"}),
        where=where,
    )


Parser = Callable[[dict[str, Any], str, ParseOptions], Any]
PARSERS: dict[str, Parser] = {
    "text": parse_text,
    "sft": parse_sft,
    "prompts": parse_prompt,
    "pairs": parse_pair,
    "ranked": parse_ranked,
    "preferences": parse_preference,
    "unpaired": parse_unpaired,
}


def parse_records(
    located: list[Located], kind: Kind, source: str = "data", options: ParseOptions | None = None
) -> list[Any]:
    """Validate raw records as ``kind``; the first bad record raises a :class:`DataError`.

    Argilla records nobody has ranked yet are skipped with one counted warning.
    """
    if kind not in PARSERS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(PARSERS)}")
    if not located:
        raise DataError(f"{source}: empty dataset (no records)")
    parse, opts = PARSERS[kind], options or ParseOptions()
    out = [parse(r.data, r.where, opts) for r in located]
    kept = [r for r in out if r is not None]
    if len(kept) < len(out):
        warnings.warn(
            f"{source}: {len(out) - len(kept)} of {len(out)} Argilla records skipped: no submitted ranking",
            stacklevel=2,
        )
    if not kept:
        raise DataError(f"{source}: no record to train on (every record was skipped; see the warning)")
    return kept


# ---------------------------------------------------------------------------------------------
# long texts: cut before tokenizing, so memory follows max_length and not the longest record
# ---------------------------------------------------------------------------------------------
def max_chars_for(max_length: int) -> int:
    """Characters kept of any one text when sequences are cut at ``max_length`` tokens.

    ``max_length · CHARS_PER_TOKEN``: the first ``max_length`` tokens of a text lie in its first
    that-many characters, so cutting there changes nothing that training sees, while a 50 MB record
    is never tokenized in full.
    """
    return max_length * CHARS_PER_TOKEN


def _clip_prompt(p: Prompt, n: int) -> Prompt:
    return p[:n] if isinstance(p, str) else [{**m, "content": m["content"][:n]} for m in p]


def _longest(ex: Any) -> int:
    texts: list[str] = []
    for name in ("text", "completion"):
        v = getattr(ex, name, None)
        if isinstance(v, str):
            texts.append(v)
    texts += list(getattr(ex, "responses", []))
    for name in ("messages", "prompt"):
        v = getattr(ex, name, None)
        if isinstance(v, str):
            texts.append(v)
        elif isinstance(v, list):
            texts += [m["content"] for m in v]
    return max((len(t) for t in texts), default=0)


def clip_record(ex: Any, max_chars: int) -> Any:
    """``ex`` with every text cut to ``max_chars`` characters (the same object when none is longer)."""
    if _longest(ex) <= max_chars:
        return ex
    changes: dict[str, Any] = {}
    if isinstance(ex, TextExample):
        changes["text"] = ex.text[:max_chars]
    if (
        isinstance(ex, SFTExample | PromptExample | PreferenceGroup | UnpairedExample)
        and ex.prompt is not None
    ):
        changes["prompt"] = _clip_prompt(ex.prompt, max_chars)
    if isinstance(ex, UnpairedExample):
        changes["completion"] = ex.completion[:max_chars]
    if isinstance(ex, SFTExample):
        if ex.messages is not None:
            changes["messages"] = _clip_prompt(ex.messages, max_chars)
        if ex.completion is not None:
            changes["completion"] = ex.completion[:max_chars]
    if isinstance(ex, PreferenceGroup):
        changes["responses"] = [r[:max_chars] for r in ex.responses]
    return replace(ex, **changes)


def load_records(
    path: str | Path,
    kind: Kind,
    *,
    split: str | None = None,
    split_key: str = "data.split",
    default_split: str | None = "train",
    options: ParseOptions | None = None,
    max_length: int | None = None,
) -> list[Any]:
    """Read and validate every record of ``path`` up front.

    ``split``: the split of a ``DatasetDict`` folder (``split_key`` is the config key errors name).
    ``max_length``: texts longer than :func:`max_chars_for` of it are cut before anyone tokenizes
    them, with one counted warning (validation sees the whole record first).
    """
    records = parse_records(
        read_records(path, split, split_key=split_key, default_split=default_split), kind, str(path), options
    )
    if max_length is None:
        return records
    limit = max_chars_for(max_length)
    clipped = [clip_record(r, limit) for r in records]
    n = sum(a is not b for a, b in zip(records, clipped, strict=True))
    if n:
        warnings.warn(
            f"{path}: {n} records hold a text longer than {limit} characters; cut there before "
            f"tokenizing (data.max_length={max_length} tokens never reach further)",
            stacklevel=2,
        )
    return clipped


def prompt_text(prompt: Prompt) -> str:
    """A readable one-string form of a prompt (the last user message of a chat)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


def load_train_and_eval(
    data: Any, kind: Kind, options: ParseOptions | None = None, max_length: int | None = None
) -> tuple[list[Any], list[Any]]:
    """The records of a config's ``data.train`` and ``data.eval`` (``[]`` when unset), each from its
    split of a ``DatasetDict`` folder (``data.split``, ``data.eval_split_name``). Holding out part of
    the training records when ``data.eval`` is unset is the trainer's choice (by record or by prompt)."""
    train = load_records(data.train, kind, split=data.split, options=options, max_length=max_length)
    if not data.eval:
        return train, []
    held = load_records(
        data.eval,
        kind,
        split=data.eval_split_name,
        split_key=EVAL_SPLIT,
        default_split=None,
        options=options,
        max_length=max_length,
    )
    return train, held

"""Record schemas and up-front validation (DESIGN.md "Contracts").

Kinds and their JSONL forms (extra columns are kept in ``extra`` and passed on to reward functions):

- ``text``: ``{"text": ...}``
- ``sft``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` or ``{"prompt": ..., "completion": ...}``
- ``prompts``: ``{"prompt": ...}`` (a string, or a list of chat messages)
- ``pairs``: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (TRL-compatible; conversational allowed)
- ``ranked``: ``{"prompt": ..., "responses": [...], "ranks": [...]}`` (lower is better, equal ranks are ties)

``preferences`` accepts pairs and ranked groups in one file. Every error reads
``file:line: field: what is wrong``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from heed.data.io import Located, read_records
from heed.errors import DataError

Message = dict[str, str]
Prompt = str | list[Message]
Kind = Literal["text", "sft", "prompts", "pairs", "ranked", "preferences"]
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class TextExample:
    text: str
    where: str = ""


@dataclass(frozen=True)
class SFTExample:
    """A chat (``messages``) or a prompt/completion pair. Loss falls on assistant / completion tokens."""

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


def _err(where: str, fieldname: str, what: str) -> DataError:
    return DataError(f"{where}: {fieldname}: {what}")


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


def _prompt(rec: dict[str, Any], where: str) -> Prompt:
    if "prompt" not in rec:
        raise _err(where, "prompt", "missing")
    v = rec["prompt"]
    if isinstance(v, str):
        if not v.strip():
            raise _err(where, "prompt", "empty")
        return v
    if isinstance(v, list):
        return _messages(v, where, "prompt")
    raise _err(where, "prompt", f"expected a string or a list of messages, got {type(v).__name__}")


def _response(v: Any, where: str, key: str) -> str:
    """A response: a string, or (conversational) a list whose last message is the assistant's."""
    if isinstance(v, str):
        if not v.strip():
            raise _err(where, key, "empty response")
        return v
    if isinstance(v, list):
        msgs = _messages(v, where, key)
        if msgs[-1]["role"] != "assistant":
            raise _err(where, key, "the last message must be the assistant's")
        if not msgs[-1]["content"].strip():
            raise _err(where, key, "empty response")
        return msgs[-1]["content"]
    raise _err(where, key, f"expected a string or a list of messages, got {type(v).__name__}")


def _number(rec: dict[str, Any], key: str, where: str, default: float | None) -> float | None:
    v = rec.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)):
        raise _err(where, key, f"expected a finite number, got {v!r}")
    return float(v)


def _extra(rec: dict[str, Any], known: set[str]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in known}


def parse_text(rec: dict[str, Any], where: str) -> TextExample:
    return TextExample(_text(rec, "text", where), where)


def parse_sft(rec: dict[str, Any], where: str) -> SFTExample:
    if "messages" in rec:
        msgs = _messages(rec["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise _err(where, "messages", "no assistant message to learn from")
        return SFTExample(messages=msgs, extra=_extra(rec, {"messages"}), where=where)
    if "prompt" in rec or "completion" in rec:
        prompt = _prompt(rec, where)
        completion = _response(rec.get("completion"), where, "completion") if "completion" in rec else None
        if completion is None:
            raise _err(where, "completion", "missing")
        return SFTExample(
            prompt=prompt, completion=completion, extra=_extra(rec, {"prompt", "completion"}), where=where
        )
    if "text" in rec:
        raise _err(where, "messages", "plain text records belong to language modelling (`data.kind: text`)")
    raise _err(where, "messages", "missing (expected `messages`, or `prompt` and `completion`)")


def parse_prompt(rec: dict[str, Any], where: str) -> PromptExample:
    return PromptExample(_prompt(rec, where), _extra(rec, {"prompt"}), where)


def _implicit_prompt(rec: dict[str, Any], where: str) -> tuple[Prompt, str, str]:
    """TRL's implicit-prompt form: chosen/rejected are whole chats sharing a prefix."""
    chosen = _messages(rec["chosen"], where, "chosen")
    rejected = _messages(rec["rejected"], where, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise _err(where, "prompt", "missing, and chosen/rejected share no prompt messages")
    return chosen[:n], _response(chosen[n:], where, "chosen"), _response(rejected[n:], where, "rejected")


def parse_pair(rec: dict[str, Any], where: str) -> PreferenceGroup:
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise _err(where, key, "missing")
    if "prompt" in rec:
        prompt = _prompt(rec, where)
        chosen = _response(rec["chosen"], where, "chosen")
        rejected = _response(rec["rejected"], where, "rejected")
    else:
        prompt, chosen, rejected = _implicit_prompt(rec, where)
    if chosen == rejected:
        raise _err(where, "rejected", "identical to chosen (no preference to learn)")
    return PreferenceGroup(
        prompt=prompt,
        responses=[chosen, rejected],
        ranks=[1.0, 2.0],
        margin=_number(rec, "margin", where, None),
        weight=_number(rec, "weight", where, 1.0) or 0.0,
        extra=_extra(rec, {"prompt", "chosen", "rejected", "margin", "weight"}),
        where=where,
    )


def parse_ranked(rec: dict[str, Any], where: str) -> PreferenceGroup:
    prompt = _prompt(rec, where)
    responses = rec.get("responses")
    if not isinstance(responses, list):
        raise _err(where, "responses", "missing or not a list")
    if len(responses) < 2:
        raise _err(where, "responses", f"a ranked group needs at least 2 responses, got {len(responses)}")
    resp = [_response(r, where, f"responses[{i}]") for i, r in enumerate(responses)]
    ranks = rec.get("ranks")
    if not isinstance(ranks, list):
        raise _err(where, "ranks", "missing or not a list")
    if len(ranks) != len(resp):
        raise _err(
            where, "ranks", f"{len(ranks)} ranks for {len(resp)} responses (need one rank per response)"
        )
    for i, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(float(r)):
            raise _err(where, f"ranks[{i}]", f"expected a number, got {r!r}")
    if len(set(ranks)) == 1:
        raise _err(where, "ranks", "all responses are tied: nothing to learn")
    return PreferenceGroup(
        prompt=prompt,
        responses=resp,
        ranks=[float(r) for r in ranks],
        margin=_number(rec, "margin", where, None),
        weight=_number(rec, "weight", where, 1.0) or 0.0,
        extra=_extra(rec, {"prompt", "responses", "ranks", "margin", "weight"}),
        where=where,
    )


def parse_preference(rec: dict[str, Any], where: str) -> PreferenceGroup:
    if "responses" in rec or "ranks" in rec:
        return parse_ranked(rec, where)
    if "chosen" in rec or "rejected" in rec:
        return parse_pair(rec, where)
    raise _err(where, "chosen", "missing (expected `chosen`/`rejected`, or `responses`/`ranks`)")


PARSERS = {
    "text": parse_text,
    "sft": parse_sft,
    "prompts": parse_prompt,
    "pairs": parse_pair,
    "ranked": parse_ranked,
    "preferences": parse_preference,
}


def parse_records(located: list[Located], kind: Kind, source: str = "data") -> list[Any]:
    """Validate raw records as ``kind``; the first bad record raises a :class:`DataError`."""
    if kind not in PARSERS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(PARSERS)}")
    if not located:
        raise DataError(f"{source}: empty dataset (no records)")
    parse = PARSERS[kind]
    return [parse(r.data, r.where) for r in located]


def load_records(path: str | Path, kind: Kind) -> list[Any]:
    """Read and validate every record of ``path`` up front."""
    return parse_records(read_records(path), kind, source=str(path))


def prompt_text(prompt: Prompt) -> str:
    """A readable one-string form of a prompt (the last user message of a chat)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]

"""Records in and out: validation of imported records, and reading / writing JSONL, Parquet and
``datasets`` folders.

An imported record is ``{"prompt": str | [messages], "responses": [str, ...], "id"?: ..., "metadata"?: {...}}``;
the DESIGN.md pair form ``{"prompt", "chosen", "rejected"}`` and ranked form ``{"prompt", "responses", "ranks"}``
are accepted too (the earlier labels are kept in the metadata as ``source_ranks``). Projects that
label one answer (binary, rating, critique, edit) take ``{"prompt", "response"}``,
``{"prompt", "completion"[, "label"]}`` or a chat ``{"messages"}`` ending with the answer. Any other
column is kept in the metadata and written back on export.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from heed.errors import DataError
from heed.feedback.kinds import Kinds, parse_kinds

MAX_TEXT_CHARS = 200_000  # one prompt or response
MAX_RESPONSES = 9  # number keys 1..9 pick a response
CHAT_ROLES = ("system", "user", "assistant", "tool")
FileFormat = Literal["jsonl", "parquet", "dataset"]


def check_text(value: str, where: str, *, allow_nul: bool = True, max_chars: int = MAX_TEXT_CHARS) -> str:
    """Reject what cannot round-trip: lone surrogates (not Unicode scalar values), NUL where the
    database column is plain text, and oversize strings."""
    if len(value) > max_chars:
        raise DataError(f"{where}: {len(value)} characters; at most {max_chars} allowed")
    if not allow_nul and "\x00" in value:
        raise DataError(f"{where}: contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{where}: not valid Unicode (lone surrogate at {exc.start})") from exc
    return value


def check_json(value: Any, where: str, depth: int = 0) -> Any:
    """Check a metadata value is plain JSON: finite numbers, valid strings, nesting below 20."""
    if depth > 20:
        raise DataError(f"{where}: nested deeper than 20 levels")
    if isinstance(value, str):
        return check_text(value, where)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if abs(value) > 2**63 - 1:
            raise DataError(f"{where}: integer {value} does not fit in 64 bits")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"{where}: {value} is not a finite number")
        return value
    if isinstance(value, list | tuple):
        return [check_json(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise DataError(f"{where}: keys must be strings, got {type(k).__name__}")
            out[check_text(k, f"{where} key")] = check_json(v, f"{where}.{k}", depth + 1)
        return out
    raise DataError(f"{where}: {type(value).__name__} is not a JSON value")


def _check_prompt(prompt: Any, where: str) -> str | list[dict[str, str]]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: prompt: empty; expected text or a list of chat messages")
        return check_text(prompt, f"{where}: prompt")
    if isinstance(prompt, list) and prompt:
        messages = []
        for i, msg in enumerate(prompt):
            if not isinstance(msg, dict) or set(msg) - {"role", "content"} or "content" not in msg:
                raise DataError(f"{where}: prompt[{i}]: expected {{'role': ..., 'content': ...}}")
            role, content = msg.get("role"), msg["content"]
            if role not in CHAT_ROLES:
                raise DataError(
                    f"{where}: prompt[{i}].role: {role!r}; expected one of {', '.join(CHAT_ROLES)}"
                )
            if not isinstance(content, str):
                raise DataError(f"{where}: prompt[{i}].content: expected text, got {type(content).__name__}")
            messages.append({"role": role, "content": check_text(content, f"{where}: prompt[{i}].content")})
        return messages
    raise DataError(
        f"{where}: prompt: expected text or a non-empty list of chat messages, got {type(prompt).__name__}"
    )


def _check_response(resp: Any, where: str) -> str:
    # A conversational response is a one-message assistant list (TRL's form); keep its text.
    if isinstance(resp, list) and len(resp) == 1 and isinstance(resp[0], dict) and "content" in resp[0]:
        resp = resp[0]["content"]
    if not isinstance(resp, str):
        raise DataError(f"{where}: expected text, got {type(resp).__name__}")
    return check_text(resp, where)


@dataclass(frozen=True)
class RecordIn:
    """A validated record ready for the store."""

    prompt: str | list[dict[str, str]]
    responses: list[str]
    external_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


RESERVED = {"prompt", "responses", "chosen", "rejected", "ranks", "id", "metadata"}
SINGLE_RESERVED = RESERVED | {"response", "completion", "messages", "label"}


def parse_record(raw: Any, where: str, *, task: str | Kinds | None = None) -> RecordIn:
    """Validate one raw record (a dict from JSON) for a project asking ``task`` (see
    :mod:`heed.feedback.kinds`; ``None`` accepts 2-9 answers).

    Comparison projects (pairwise, ranking) take ``{"prompt", "responses": [...]}``, a pair
    ``{"prompt", "chosen", "rejected"}`` or a ranked group (its ranks kept as ``source_ranks``).
    Single-answer projects (binary, rating, critique, edit) take ``{"prompt", "response"}``,
    ``{"prompt", "completion"}`` (an unpaired record's ``label`` is kept as ``source_label``), a
    one-answer ``responses`` list, or a chat ``{"messages": [..., {"role": "assistant", ...}]}``
    whose last assistant turn is the answer. ``where`` prefixes every error, e.g. ``data.jsonl:12``.
    """
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    kinds = parse_kinds(task) if isinstance(task, str) else task
    if kinds is not None and not kinds.comparison:
        return _parse_single(raw, where, kinds)
    if "prompt" not in raw:
        raise DataError(f"{where}: prompt: missing")
    prompt = _check_prompt(raw["prompt"], where)
    meta: dict[str, Any] = {}
    if "responses" in raw:
        responses = raw["responses"]
        if not isinstance(responses, list):
            raise DataError(f"{where}: responses: expected a list of texts")
        if "ranks" in raw:
            meta["source_ranks"] = raw["ranks"]
    elif "chosen" in raw and "rejected" in raw:
        responses = [raw["chosen"], raw["rejected"]]
    else:
        raise DataError(f"{where}: responses: missing; give 'responses': [...] or 'chosen' and 'rejected'")
    texts = [_check_response(r, f"{where}: responses[{i}]") for i, r in enumerate(responses)]
    if kinds is not None and kinds.judgement == "pairwise" and len(texts) != 2:
        raise DataError(f"{where}: responses: {len(texts)} given; a pairwise project needs exactly 2")
    if not 2 <= len(texts) <= MAX_RESPONSES:
        raise DataError(f"{where}: responses: {len(texts)} given; expected 2 to {MAX_RESPONSES}")
    return RecordIn(
        prompt=prompt,
        responses=texts,
        external_id=_external_id(raw, where),
        meta=_meta(raw, where, meta, RESERVED),
    )


def _parse_single(raw: dict[str, Any], where: str, kinds: Kinds) -> RecordIn:
    """A record of a single-answer project: one prompt, one answer (see :func:`parse_record`)."""
    one = "one answer per record ('response', 'completion', a one-item 'responses' or chat 'messages')"
    meta: dict[str, Any] = {}
    if "chosen" in raw or "rejected" in raw:
        raise DataError(f"{where}: chosen/rejected: a preference pair; a {kinds} project takes {one}")
    if "prompt" not in raw and "messages" in raw:
        prompt, answer = _split_messages(raw["messages"], where)
    else:
        if "prompt" not in raw:
            raise DataError(f"{where}: prompt: missing")
        prompt = _check_prompt(raw["prompt"], where)
        given = [k for k in ("response", "completion", "responses") if k in raw]
        if len(given) != 1:
            what = "missing" if not given else f"both {' and '.join(given)} given"
            raise DataError(f"{where}: response: {what}; a {kinds} project takes {one}")
        field_name = given[0]
        answer = raw[field_name]
        if field_name == "responses":
            if not isinstance(answer, list):
                raise DataError(f"{where}: responses: expected a list of texts")
            if len(answer) != 1:
                raise DataError(f"{where}: responses: {len(answer)} given; a {kinds} project takes {one}")
            answer, field_name = answer[0], "responses[0]"
        answer = _check_response(answer, f"{where}: {field_name}")
        if "label" in raw:
            meta["source_label"] = raw["label"]
    if not answer.strip():
        raise DataError(f"{where}: response: empty; expected the answer to label")
    return RecordIn(prompt, [answer], _external_id(raw, where), _meta(raw, where, meta, SINGLE_RESERVED))


def _split_messages(messages: Any, where: str) -> tuple[list[dict[str, str]], str]:
    """A chat ending in an assistant turn -> (the turns before it, its text)."""
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{where}: messages: expected a chat of at least two turns ending with the assistant")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise DataError(
            f"{where}: messages[{len(messages) - 1}].role: expected 'assistant' (the answer to label)"
        )
    prompt = _check_prompt(messages[:-1], where)
    assert isinstance(prompt, list)
    return prompt, _check_response(last.get("content"), f"{where}: messages[{len(messages) - 1}].content")


def _external_id(raw: dict[str, Any], where: str) -> str | None:
    ext = raw.get("id")
    if ext is None:
        return None
    if isinstance(ext, bool) or not isinstance(ext, str | int):
        raise DataError(f"{where}: id: expected text or an integer")
    return check_text(str(ext), f"{where}: id", allow_nul=False, max_chars=200)


def _meta(raw: dict[str, Any], where: str, meta: dict[str, Any], reserved: set[str]) -> dict[str, Any]:
    extra = raw.get("metadata") or {}
    if not isinstance(extra, dict):
        raise DataError(f"{where}: metadata: expected an object")
    meta.update(extra)
    meta.update({k: v for k, v in raw.items() if k not in reserved})
    return check_json(meta, f"{where}: metadata")


def file_format(path: Path, fmt: str | None = None) -> FileFormat:
    """``jsonl`` for .jsonl/.json, ``parquet`` for .parquet, ``dataset`` for a folder (``save_to_disk``)."""
    if fmt:
        if fmt not in ("jsonl", "parquet", "dataset"):
            raise DataError(f"--file-format {fmt!r}: expected jsonl, parquet or dataset")
        return fmt  # type: ignore[return-value]
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if path.is_dir() or suffix == "":
        return "dataset"
    raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .parquet or a datasets folder")


def read_rows(path: str | Path, fmt: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, row)`` from a JSONL file, a Parquet file or a ``datasets`` folder, read by
    ``heed.data.io`` (its one-line errors for bad paths, encodings, JSON and corrupt files)."""
    from heed.data import io

    path = Path(path)
    io.check_path(path)
    kind = file_format(path, fmt)
    if kind == "jsonl":
        rows = io.read_jsonl(path)
    elif kind == "parquet":
        rows = io.read_parquet(path)
    else:
        rows = io.read_datasets_folder(path)
    for row in rows:
        yield row.where, row.data


def write_rows(rows: list[dict[str, Any]], path: str | Path, fmt: str | None = None) -> Path:
    """Write rows as JSONL (UTF-8, one object per line), Parquet or a ``datasets`` folder."""
    path = Path(path)
    kind = file_format(path, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
        return path
    from datasets import Dataset

    try:
        ds = Dataset.from_list(rows)
    except Exception as exc:  # arrow cannot hold mixed column types (e.g. text and chat prompts)
        raise DataError(
            f"{path}: cannot store these rows as {kind} ({exc}); export as .jsonl instead"
        ) from exc
    if kind == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    return path


def iter_records(
    path: str | Path, task: str | Kinds | None = None, fmt: str | None = None
) -> Iterable[RecordIn]:
    """Read and validate every record of a file (errors name file:line and field)."""
    for where, row in read_rows(path, fmt):
        yield parse_record(row, where, task=task)

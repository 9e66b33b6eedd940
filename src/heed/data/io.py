"""Reading record files: JSONL, JSON (a list of objects), Parquet, or a `datasets` folder.

Every record remembers where it came from: ``file:line`` (1-based) for JSONL and JSON
(``file:line:column`` when several records of a JSON list start on one line), ``file: row N``
(0-based, the ``datasets`` index) for tables, so validation errors can name the culprit.

Whatever is wrong with a file is one :class:`DataError` line: a path that is missing, a broken
symlink or a symlink loop, a FIFO or device (never opened: reading one would block forever), text
that is not UTF-8 (UTF-16, a Latin-1 byte, a binary file), malformed JSON, a key given twice in one
object (JSON would silently keep the last), JSON Lines in a ``.json`` file, a corrupt Parquet file.
A UTF-8 byte-order mark is accepted.
"""

from __future__ import annotations

import codecs
import errno
import json
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heed.errors import DataError


@dataclass(frozen=True)
class Located:
    """One raw record and where it was read from."""

    data: dict[str, Any]
    where: str


def read_records(
    path: str | Path,
    split: str | None = None,
    *,
    split_key: str = "data.split",
    default_split: str | None = "train",
) -> list[Located]:
    """Read every record of ``path``; the format follows the suffix (or a folder from ``save_to_disk``).

    ``split`` picks a split of a ``DatasetDict`` folder; unset, the folder's only split is used, else
    ``default_split`` when it has one. ``split_key`` is the config key named in errors.
    """
    p = Path(path)
    if check_path(p) == "folder":
        return read_datasets_folder(p, split, split_key=split_key, default_split=default_split)
    if split is not None:
        raise DataError(f"{p}: {split_key}={split!r} picks a split of a datasets folder, but this is a file")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(p)
    if suffix == ".json":
        return read_json(p)
    if suffix == ".parquet":
        return read_parquet(p)
    raise DataError(
        f"{p}: unknown data format '{suffix}'; expected .jsonl, .json, .parquet or a datasets folder"
    )


# ---------------------------------------------------------------------------------------------
# the path itself
# ---------------------------------------------------------------------------------------------
_SPECIAL = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_path(p: Path) -> str:
    """``"file"`` or ``"folder"``; anything else (missing, a broken link, a loop, a FIFO, a device) is an error.

    Special files are refused before they are opened: ``open()`` on a FIFO blocks until a writer comes.
    """
    try:
        st = p.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"{p}: a symbolic link loop (the link leads back to itself)") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            if p.is_symlink():
                raise DataError(f"{p}: a symbolic link to {os.readlink(p)}, which does not exist") from None
            raise DataError(f"{p}: no such file or folder") from None
        raise DataError(f"{p}: cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        return "folder"
    if stat.S_ISREG(st.st_mode):
        return "file"
    what = next((name for test, name in _SPECIAL if test(st.st_mode)), "a special file")
    raise DataError(f"{p}: {what}, not a regular file; give a data file or a datasets folder")


# ---------------------------------------------------------------------------------------------
# text: UTF-8 only, said in one line when it is not
# ---------------------------------------------------------------------------------------------
_UTF32 = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)
_UTF16 = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def _position(data: bytes, offset: int) -> tuple[int, int]:
    """1-based (line, column in bytes) of ``offset``."""
    line = data.count(b"\n", 0, offset) + 1
    return line, offset - (data.rfind(b"\n", 0, offset) + 1) + 1


def read_text(p: Path) -> str:
    """The file as text: UTF-8, with or without a byte-order mark; anything else is a :class:`DataError`."""
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise DataError(f"{p}: cannot be read ({exc.strerror})") from None
    convert = f"convert it, e.g. `iconv -f {{enc}} -t UTF-8 {p.name} > utf8{p.suffix}`"
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    elif data.startswith(_UTF32):  # before UTF-16: the UTF-32 LE mark starts with the UTF-16 LE one
        raise DataError(
            f"{p}: UTF-32 text (it starts with a UTF-32 byte-order mark); data files are UTF-8: "
            + convert.format(enc="UTF-32")
        )
    elif data.startswith(_UTF16):
        raise DataError(
            f"{p}: UTF-16 text (it starts with a UTF-16 byte-order mark); data files are UTF-8: "
            + convert.format(enc="UTF-16")
        )
    nul = data.find(b"\x00")
    if nul >= 0:  # JSON text never holds a raw NUL (it must be escaped as \u0000)
        head = data[:400]
        if len(head) >= 4 and head.count(b"\x00") * 3 >= len(head):  # ASCII as UTF-16: every other byte
            raise DataError(
                f"{p}: looks like UTF-16 text without a byte-order mark; data files are UTF-8: "
                + convert.format(enc="UTF-16LE")
            )
        line, col = _position(data, nul)
        raise DataError(
            f"{p}:{line}: binary data (a NUL byte at byte {col} of the line), not UTF-8 JSON text"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = _position(data, exc.start)
        raise DataError(
            f"{p}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x} at byte {col} of the line); data files "
            "are UTF-8: " + convert.format(enc="LATIN1") + " (or the file's own encoding)"
        ) from None


# ---------------------------------------------------------------------------------------------
# JSON and JSON Lines
# ---------------------------------------------------------------------------------------------
class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key
        self.offset: int | None = None  # where the record holding it starts (JSON lists)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)


def _json_problem(exc: json.JSONDecodeError) -> str:
    """``json``'s message in words that read well after a location ("Unterminated string starting at")."""
    if exc.msg == "Extra data":
        return f"more text after the end of the JSON value (column {exc.colno})"
    msg = exc.msg[: -len(" at")] if exc.msg.endswith(" at") else exc.msg
    return f"{msg} at column {exc.colno}"


def _duplicate(where: str, exc: _DuplicateKey) -> DataError:
    return DataError(f"{where}: key {exc.key!r} appears twice in one object (JSON would keep only the last)")


def read_jsonl(p: Path) -> list[Located]:
    """One JSON object per line; blank lines are skipped."""
    out = []
    for lineno, line in enumerate(read_text(p).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = _DECODER.decode(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{lineno}: malformed JSON ({_json_problem(exc)})") from None
        except _DuplicateKey as exc:
            raise _duplicate(f"{p}:{lineno}", exc) from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        out.append(Located(obj, f"{p}:{lineno}"))
    return out


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _scan_array(text: str, i: int) -> list[tuple[Any, int]]:
    """The elements of the JSON array starting at ``text[i] == "["``, each with its start offset."""
    out: list[tuple[Any, int]] = []
    i = _skip_ws(text, i + 1)
    if i < len(text) and text[i] == "]":
        return out
    while True:
        start = i
        try:
            value, i = _DECODER.raw_decode(text, i)
        except _DuplicateKey as exc:
            exc.offset = start
            raise
        out.append((value, start))
        i = _skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
            continue
        if i < len(text) and text[i] == "]":
            return out
        raise json.JSONDecodeError("Expecting ',' delimiter", text, i)


def _data_array(text: str, i: int) -> int:
    """Offset of the ``[`` of the top-level ``"data"`` key of the object at ``text[i] == "{"``."""
    i = _skip_ws(text, i + 1)
    while i < len(text) and text[i] == '"':
        key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past the ':'
        if key == "data":
            return i
        _, i = _DECODER.raw_decode(text, i)
        i = _skip_ws(text, i)
        i = _skip_ws(text, i + 1) if i < len(text) and text[i] == "," else i
    raise AssertionError("the object was parsed before; its 'data' key must be found")


def read_json(p: Path) -> list[Located]:
    """A JSON list of objects, or ``{"data": [...]}``; each record is located by the line it starts on."""
    text = read_text(p)
    i = _skip_ws(text, 0)
    if i == len(text):
        return []
    try:
        if text[i] == "[":
            items = _scan_array(text, i)
        else:
            obj, end = _DECODER.raw_decode(text, i)
            nxt = _skip_ws(text, end)
            if nxt < len(text):
                line = text.count("\n", 0, nxt) + 1
                jsonl = isinstance(obj, dict) and text[nxt] == "{" and "\n" in text[end:nxt]
                hint = (
                    "; it looks like JSON Lines (one object per line): rename it to .jsonl" if jsonl else ""
                )
                raise DataError(f"{p}:{line}: more text after the end of the first JSON value{hint}")
            if not (isinstance(obj, dict) and isinstance(obj.get("data"), list)):
                raise DataError(f'{p}: expected a JSON list of records (or {{"data": [...]}})')
            items = _scan_array(text, _data_array(text, i))
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}:{exc.lineno}: malformed JSON ({_json_problem(exc)})") from None
    except _DuplicateKey as exc:
        line = text.count("\n", 0, exc.offset) + 1 if exc.offset is not None else None
        raise _duplicate(f"{p}:{line}" if line else str(p), exc) from None
    starts: list[tuple[int, int]] = []  # (line, column) where each record starts
    line, pos = 1, 0
    for _, start in items:
        line += text.count("\n", pos, start)
        pos = start
        starts.append((line, start - (text.rfind("\n", 0, start) + 1) + 1))
    per_line = Counter(ln for ln, _ in starts)
    out = []
    for (rec, _), (ln, col) in zip(items, starts, strict=True):
        where = f"{p}:{ln}" if per_line[ln] == 1 else f"{p}:{ln}:{col}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        out.append(Located(rec, where))
    return out


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _table_rows(rows: Any, p: Path) -> list[Located]:
    # a table gives every row every column: a missing value is None, which here means "absent"
    return [
        Located({k: v for k, v in dict(r).items() if v is not None}, f"{p}: row {i}")
        for i, r in enumerate(rows)
    ]


def read_parquet(p: Path) -> list[Located]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover
        raise DataError(f"{p}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as exc:  # pyarrow raises several kinds (ArrowInvalid, OSError, ...) for a bad file
        raise DataError(f"{p}: not a readable Parquet file ({_one_line(exc)})") from None
    return _table_rows(rows, p)


def read_datasets_folder(
    p: Path, split: str | None = None, *, split_key: str = "data.split", default_split: str | None = "train"
) -> list[Located]:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (then pick ``split``)."""
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(p))
    except Exception as exc:
        raise DataError(f"{p}: not a datasets folder written by save_to_disk ({_one_line(exc)})") from None
    if isinstance(ds, DatasetDict):
        names = ", ".join(ds)
        if split is None:
            if len(ds) == 1:
                split = next(iter(ds))
            elif default_split is not None and default_split in ds:
                split = default_split
            else:
                raise DataError(f"{p}: a DatasetDict with splits {names}: set {split_key} to one of them")
        if split not in ds:
            raise DataError(f"{p}: {split_key}={split!r}: no such split (this DatasetDict has {names})")
        ds = ds[split]
        where = p / split
    else:
        if split is not None:
            raise DataError(
                f"{p}: {split_key}={split!r}, but this folder holds one Dataset, not a DatasetDict"
            )
        where = p
    assert isinstance(ds, Dataset)
    return _table_rows(ds, where)


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Write records atomically (temp file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(p)

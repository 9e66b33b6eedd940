"""User-facing errors: one line that names the culprit (file:line, config key, path) and the fix.

The command line prints a :class:`HeedError` as ``error: <message>`` and exits with its
``exit_code`` (2; 130 for an interrupted run).
"""

from __future__ import annotations

import errno
from pathlib import Path


class HeedError(Exception):
    """An error caused by the user's input. The command line prints it as one line and exits 2."""

    exit_code = 2


class DataError(HeedError):
    """A bad record or data file: the message starts with ``file:line: field:``."""


class ConfigError(HeedError):
    """A bad configuration key or value: the message names the key and what is allowed."""


class ModelLoadError(HeedError):
    """A model or tokenizer folder that cannot be loaded."""


class TrainingDivergedError(HeedError):
    """NaN/inf in a loss or reward: the message names the step and the source."""


class StorageError(HeedError):
    """A file or folder Heed must write cannot be written: no space left, read-only, not a folder."""


class RunInterrupted(HeedError):
    """A run stopped by Ctrl-C (SIGINT). The message says where it stopped and whether ``--resume``
    can continue it; ``resumable`` is True when a checkpoint to continue from exists."""

    exit_code = 130

    def __init__(self, message: str, run: Path | None = None, resumable: bool = False) -> None:
        super().__init__(message)
        self.run = run
        self.resumable = resumable


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_TEXT = (
    "No space left on device",
    "Disk quota exceeded",
    "unexpected pos",  # torch.save's zip writer when a write comes up short
    "PytorchStreamWriter failed writing",
)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the disk or quota is full.

    ``torch.save`` and ``safetensors`` do not raise ``OSError(ENOSPC)``: they raise a RuntimeError
    (``inline_container.cc: unexpected pos``) or a ``SafetensorError`` naming os error 28.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _DISK_FULL_ERRNOS:
            return True
        if any(t in str(cur) for t in _DISK_FULL_TEXT):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def describe_os_error(exc: OSError, fix: str = "choose another path") -> str:
    """One line for an ``OSError`` on a path: the path, what went wrong and ``fix``."""
    where = exc.filename if exc.filename is not None else "(unknown path)"
    if exc.errno in _DISK_FULL_ERRNOS:
        return f"no space left on {where}; free some space or {fix}"
    if exc.errno == errno.EROFS:
        return f"{where}: not writable (read-only file system); {fix}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied; fix its permissions or {fix}"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{where}: a file is in the way of a folder; {fix}"
    if exc.errno == errno.ENOENT:
        return f"{where}: no such file or folder"
    return f"{where}: {exc.strerror or exc}; {fix}"

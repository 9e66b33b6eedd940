"""The ``heed`` command line. ``main()`` turns every failure into one line on stderr.

Exit codes: 0 done; 2 a usage, config, data, model or storage error (``error: ...``, naming the
culprit and the fix); 130 interrupted (Ctrl-C: says where the run stopped and how to resume it);
1 an unexpected error inside Heed (a bug: ``--debug`` shows the traceback).
"""

from __future__ import annotations

import os
import shlex
import sys
import warnings
from typing import Any, NoReturn

# Transparent huge pages for PyTorch's CPU tensors of 2 MB and more: one page fault per 2 MB instead of
# per 4 KB wherever weights, gradients and activations are allocated afresh (a CPU RL update on a 100M
# model spends ~15% less time; docs/performance.md). PyTorch reads the variable at its first
# allocation, so it is set before anything imports torch; THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from heed.cli.app import app
from heed.errors import HeedError, RunInterrupted, describe_os_error, is_disk_full

# Each module below adds its commands to ``app``; heavy imports stay inside the commands.
from heed.cli import demo_cmds  # noqa: F401  isort: skip
from heed.cli import train_cmds  # noqa: F401  isort: skip
from heed.cli import scale_cmds  # noqa: F401  isort: skip
from heed.cli import annotate_cmds  # noqa: F401  isort: skip
from heed.cli import rm_cmds  # noqa: F401  isort: skip
from heed.cli import dpo_cmds  # noqa: F401  isort: skip
from heed.cli import online_cmds  # noqa: F401  isort: skip
from heed.cli import rs_cmds  # noqa: F401  isort: skip
from heed.cli import kto_cmds  # noqa: F401  isort: skip
from heed.cli import rl_cmds  # noqa: F401  isort: skip
from heed.cli import report_cmds  # noqa: F401  isort: skip
from heed.cli import control_cmds  # noqa: F401  isort: skip

INTERRUPTED = 130


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``heed`` script and ``python -m heed``.

    ``--debug`` (anywhere on the line) or ``HEED_DEBUG=1`` shows the full traceback of an error.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("HEED_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    if not args:  # a bare `heed` asks what Heed is: the help, exit 0
        args = ["--help"]
    if not debug:
        warnings.showwarning = _one_line_warning
    try:
        rc = app(args=args, prog_name="heed", standalone_mode=False)
    except RunInterrupted as exc:
        if debug:
            raise
        _exit(exc.exit_code, f"interrupted: {_one_line(str(exc))}{_resume_hint(exc, args)}")
    except HeedError as exc:
        if debug:
            raise
        _exit(exc.exit_code, f"error: {_one_line(str(exc)) or exc.__class__.__name__}")
    except KeyboardInterrupt:
        if debug:
            raise
        _exit(INTERRUPTED, "interrupted")
    except SystemExit:
        raise
    except Exception as exc:
        usage = _usage_error(exc, args)
        if usage is not None:
            _exit(*usage)
        if debug:
            raise
        _exit(*_unexpected(exc))
    # in non-standalone mode typer returns the code of an Exit, and 130 for a Ctrl-C it caught
    if isinstance(rc, int) and rc:
        if rc == INTERRUPTED:
            _exit(rc, "interrupted")
        sys.exit(rc)


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: Any = None,
) -> None:
    """Warnings as one line, ``warning: ...``, without the source line Python shows (``--debug`` keeps
    Python's own format, with the file and line that warned)."""
    print(f"warning: {_one_line(str(message))}", file=file or sys.stderr)


def _exit(code: int, line: str | None) -> NoReturn:
    if line is not None:
        print(line, file=sys.stderr)
    sys.exit(code)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _click_exception_classes(name: str) -> tuple[type, ...]:
    """``name`` from typer's bundled click and from click itself (either may raise)."""
    found: list[type] = []
    try:
        from typer._click import exceptions as bundled

        found.append(getattr(bundled, name))
    except (ImportError, AttributeError):  # pragma: no cover - older typer uses click itself
        pass
    try:
        import click.exceptions as plain

        found.append(getattr(plain, name))
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return tuple(found)


def _usage_error(exc: Exception, args: list[str]) -> tuple[int, str | None] | None:
    """``(exit code, line)`` for click's usage errors (unknown option or command, missing value), else None."""
    if isinstance(exc, _click_exception_classes("Abort")):
        return INTERRUPTED, "aborted"
    if not isinstance(exc, _click_exception_classes("ClickException")):
        return None
    ctx = getattr(exc, "ctx", None)
    path = ctx.command_path if ctx is not None else " ".join(["heed", *_command_names(args)])
    if type(exc).__name__ == "NoArgsIsHelpError":  # a bare command group: typer has printed its help
        text = exc.format_message()
        if text:
            print(text)
        return 0, None
    message = _one_line(exc.format_message())
    if not message.endswith((".", "?", "!")):
        message += "."
    hint = f" See '{path} --help'"
    if type(exc).__name__ == "NoSuchOption" and _accepts(_command_of(args), "--set"):
        hint += "; config keys go through --set, e.g. --set optim.lr=1e-4"
    return getattr(exc, "exit_code", 2) or 2, f"error: {path}: {message}{hint}."


def _accepts(command: Any, option: str) -> bool:
    return any(option in getattr(p, "opts", ()) for p in getattr(command, "params", ()))


def _resume_hint(exc: RunInterrupted, args: list[str]) -> str:
    """How to continue an interrupted run: the same command line plus ``--resume``."""
    if not exc.resumable:
        return ""
    if not _accepts(_command_of(args), "--resume"):
        return "; run the same command again to continue"
    again = [a for a in args if a != "--resume"]
    return f"; resume with: {shlex.join(['heed', *again, '--resume'])}"


def _command_names(args: list[str]) -> list[str]:
    """The (sub)command names at the start of ``args``: ``["rm", "train"]`` for ``rm train --set ...``."""
    import typer.main

    cmd: Any = typer.main.get_command(app)
    names = []
    for token in args:
        sub = (getattr(cmd, "commands", None) or {}).get(token)
        if sub is None:
            break
        names.append(token)
        cmd = sub
    return names


def _command_of(args: list[str]) -> Any:
    """The click command that ``args`` invoke (the innermost subcommand named on the line)."""
    import typer.main

    cmd: Any = typer.main.get_command(app)
    for name in _command_names(args):
        cmd = cmd.commands[name]
    return cmd


def _unexpected(exc: Exception) -> tuple[int, str]:
    """One line for an exception that is not a :class:`HeedError`: a full disk, an unwritable path
    and out-of-memory are the user's to fix (exit 2); anything else is a bug in Heed (exit 1)."""
    if is_disk_full(exc):
        where = getattr(exc, "filename", None)
        return (
            2,
            f"error: no space left on {where or 'the output disk'}; free some space and resume with --resume",
        )
    if isinstance(exc, OSError):
        return 2, f"error: {describe_os_error(exc)}"
    if type(exc).__name__ == "OutOfMemoryError":
        return 2, (
            "error: out of accelerator memory; lower the batch sizes (train.micro_batch_size, "
            "rollout.batch_size), use model.gradient_checkpointing or LoRA"
        )
    first = _one_line(str(exc))[:300]
    return 1, (
        f"error: unexpected {type(exc).__name__}: {first} (a bug in Heed; rerun with --debug for the "
        "traceback and report it)"
    )


__all__ = ["app", "main"]

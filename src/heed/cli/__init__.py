"""The ``heed`` command line. ``main()`` turns user errors into one line and exit code 2."""

from __future__ import annotations

import os
import sys

from heed.cli.app import app
from heed.errors import HeedError

# Each module below adds its commands to ``app``; heavy imports stay inside the commands.
from heed.cli import demo_cmds  # noqa: F401  isort: skip
from heed.cli import train_cmds  # noqa: F401  isort: skip
from heed.cli import scale_cmds  # noqa: F401  isort: skip
from heed.cli import annotate_cmds  # noqa: F401  isort: skip
from heed.cli import rm_cmds  # noqa: F401  isort: skip
from heed.cli import dpo_cmds  # noqa: F401  isort: skip
from heed.cli import rl_cmds  # noqa: F401  isort: skip
from heed.cli import report_cmds  # noqa: F401  isort: skip
from heed.cli import control_cmds  # noqa: F401  isort: skip


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``heed`` script and ``python -m heed``.

    ``--debug`` (anywhere on the line) or ``HEED_DEBUG=1`` shows the full traceback of an error.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("HEED_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name="heed", standalone_mode=False)
    except HeedError as exc:
        if debug:
            raise
        msg = str(exc).strip() or exc.__class__.__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click's usage errors and the like
        import click

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Abort):
            print("aborted", file=sys.stderr)
            sys.exit(130)
        raise


__all__ = ["app", "main"]

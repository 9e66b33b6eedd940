"""Built-in names at the command line: every command turns ``builtin...`` names into paths here,
once, before any trainer sees its config (:mod:`heed.demo.builtin` holds the names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

C = TypeVar("C", bound=BaseModel)


def _say(message: str) -> None:
    import typer

    typer.echo(message, err=True)


def load_resolved(
    cls: type[C],
    config: Path | None,
    overrides: list[str] | None,
    defaults: dict[str, Any] | None = None,
) -> C:
    """:func:`heed.config.load_config`, then every built-in name in the config replaced by its path."""
    from heed.config import load_config
    from heed.demo.builtin import resolve_config

    return resolve_config(load_config(cls, config, overrides, defaults), say=_say)


def resolve_path(value: Path, option: str) -> Path:
    """A path option (``--model builtin``, ``--prompts builtin:prompts_eval``) as a real path."""
    from heed.demo.builtin import resolve_name

    return Path(resolve_name(str(value), say=_say, where=option))


def resolve_optional(value: Path | None, option: str) -> Path | None:
    return None if value is None else resolve_path(value, option)

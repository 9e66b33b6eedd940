"""The ``heed`` Typer application and the options every trainer shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="heed",
    help="Heed: reinforcement learning from human feedback, end to end.\n\n"
    "Collect preferences, train reward models, tune policies (SFT, PPO, RLOO, GRPO, REINFORCE, DPO) "
    "and watch for reward hacking. Every trainer takes --config FILE, --set key=value and --out DIR.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from heed import __version__

        typer.echo(f"heed {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print Heed's version and exit."),
    ] = False,
) -> None:
    """Heed: reinforcement learning from human feedback, end to end."""


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file.", show_default=False)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a config key: --set optim.lr=1e-4 (repeatable).", show_default=False
    ),
]
OutOpt = Annotated[
    Path | None, typer.Option("--out", "-o", help="Run folder (overrides `out` in the config).")
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue from the last checkpoint in the run folder.")
]


def with_out(overrides: list[str] | None, out: Path | None) -> list[str]:
    """Fold ``--out DIR`` into the overrides as ``out=DIR``."""
    items = list(overrides or [])
    if out is not None:
        items.append(f"out={out}")
    return items

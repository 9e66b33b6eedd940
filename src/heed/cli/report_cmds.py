"""``heed report RUN_DIR``: write the self-contained report.html of a run or a folder of runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from heed.cli.app import app


@app.command("report")
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder, or a folder of runs (e.g. the demo's).")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Where to write the page (default RUN_DIR/report.html)."),
    ] = None,
) -> None:
    """Write report.html: headline results, policies side by side, alarms, learning curves, answers."""
    from heed.report.render import write_report

    path = write_report(run_dir, out)
    typer.echo(f"wrote {path}")

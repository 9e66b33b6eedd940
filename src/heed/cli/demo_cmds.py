"""``heed demo``: the whole human-feedback loop on the built-in model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from heed.cli.app import app


@app.command(rich_help_panel="Start here")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the demo's runs and report.")] = Path(
        "runs/demo"
    ),
    rounds: Annotated[
        int, typer.Option(min=1, max=5, help="Rounds of sample → annotate → reward model → PPO.")
    ] = 2,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Redo every stage instead of reusing finished ones.")
    ] = False,
    quick: Annotated[
        bool,
        typer.Option("--quick", help="A much smaller demo (a minute or two): the micro model, few updates."),
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Run the whole RLHF loop on the built-in world and write report.html.

    corpus → tokenizer → base model → SFT → sample 4 answers per prompt → three simulated
    annotators rank them through the annotation store → export → reward model (K-wise) →
    PPO against it (KL + PPO-ptx) → RLOO on the banana rule → DPO from the same rankings →
    evaluation → report; then a second round (sample from PPO, annotate, update the reward
    model on all labels, continue PPO). Finished stages are reused when you run it again;
    an interrupted run picks up where it stopped.
    """
    import time

    from rich.console import Console

    from heed.demo.pipeline import DemoSettings, run_demo

    console = Console(stderr=True)
    settings = DemoSettings(out=out, rounds=rounds, fresh=fresh, progress=progress)
    if quick:
        from dataclasses import replace

        from heed.demo.pipeline import QUICK

        settings = replace(settings, **QUICK)
    t0 = time.time()
    report = run_demo(settings, say=console.print)
    db = (out / "feedback.db").resolve()
    console.print(
        f"\n[bold green]Demo finished[/bold green] in {time.time() - t0:.0f}s. Report: [bold]{report.resolve()}[/bold]"
    )
    console.print(
        "Label the demo's answers yourself in the annotation app (prints a one-time password, then serves):"
    )
    console.print(
        f"  heed annotate user add me --role admin --db sqlite:///{db} && "
        f"heed annotate serve --db sqlite:///{db}"
    )

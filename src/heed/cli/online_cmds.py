"""``heed online-dpo``: online DPO (a judge labels the policy's own answers at every update) and
iterative DPO (``--rounds N``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from heed.cli.app import ConfigOpt, OutOpt, ResumeOpt, SetOpt, app, with_out

RoundsOpt = Annotated[
    int | None,
    typer.Option(
        "--rounds",
        min=0,
        help="Iterative DPO: this many rounds of sample -> label -> DPO (iterative.rounds).",
    ),
]


@app.command("online-dpo", rich_help_panel="Train")
def online_dpo(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
    rounds: RoundsOpt = None,
) -> None:
    """Online DPO: two answers per prompt from the current policy, labelled by a judge (reward model,
    rule function or classifier, as rewards: in heed rl), then a DPO / IPO / SimPO step on them.

    --rounds N: iterative DPO, N rounds of (label the whole prompt set, offline DPO), each round's
    policy in RUN/round-N/. Examples:

    heed online-dpo --config configs/online_dpo.yaml --out runs/online-dpo

    heed online-dpo --config configs/online_dpo.yaml --rounds 3 --out runs/iterative-dpo
    """
    from rich.console import Console

    from heed.cli.builtin import load_resolved
    from heed.config.online import OnlineDPOConfig
    from heed.errors import ConfigError
    from heed.train.online_dpo import train_online_dpo

    if config is None and not set_:
        raise ConfigError("heed online-dpo: give --config FILE (see configs/online_dpo.yaml)")
    overrides = with_out(set_, out) + ([f"iterative.rounds={rounds}"] if rounds is not None else [])
    cfg = load_resolved(OnlineDPOConfig, config, overrides)
    summary = train_online_dpo(cfg, resume=resume, config_dir=config.parent if config else None)
    keys = (
        "start/eval/reward",
        "eval/reward",
        "kl/k1",
        "dpo/accuracy",
        "data/ties",
        "data/unscored",
        "train_seconds",
    )
    keys += tuple(k for k in summary if k.startswith(("gold/", "start/gold/")))
    figures = "  ".join(f"{k}={summary[k]:.4g}" for k in keys if isinstance(summary.get(k), int | float))
    Console(stderr=True).print(f"[green]done[/green] {figures}\nmodel: {Path(cfg.out) / 'final'}")

"""``heed kto``: Kahneman-Tversky optimisation from thumbs up / down."""

from __future__ import annotations

from pathlib import Path

from heed.cli.app import ConfigOpt, OutOpt, ResumeOpt, SetOpt, app, with_out


@app.command(rich_help_panel="Train")
def kto(config: ConfigOpt = None, set_: SetOpt = None, out: OutOpt = None, resume: ResumeOpt = False) -> None:
    """Tune a policy on thumbs up / down (KTO): unpaired {"prompt", "completion", "label": true|false} records.

    Pairs and ranked groups in the same files become thumbs (chosen / best up, rejected / worst down).
    Example on the built-in world (the built-in SFT model, simulated thumbs on its own answers):
    heed kto --config configs/kto.yaml --out runs/kto
    """
    from rich.console import Console

    from heed.cli.builtin import load_resolved
    from heed.config.kto import KTOConfig
    from heed.train.kto import train_kto

    cfg = load_resolved(KTOConfig, config, with_out(set_, out))
    summary = train_kto(cfg, resume=resume)
    keys = (
        "loss",
        "eval/loss",
        "eval/margin",
        "eval/reward_auc",
        "kl/k1",
        "examples_per_s",
        "train_seconds",
    )
    figures = "  ".join(f"{k}={summary[k]:.4g}" for k in keys if k in summary)
    Console(stderr=True).print(f"[green]done[/green] {figures}\nmodel: {Path(cfg.out) / 'final'}")

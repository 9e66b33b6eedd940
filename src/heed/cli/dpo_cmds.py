"""``heed dpo``: offline preference optimisation straight from pairs or rankings."""

from __future__ import annotations

from pathlib import Path

from heed.cli.app import ConfigOpt, OutOpt, ResumeOpt, SetOpt, app, with_out


@app.command(rich_help_panel="Train")
def dpo(config: ConfigOpt = None, set_: SetOpt = None, out: OutOpt = None, resume: ResumeOpt = False) -> None:
    """Tune a policy directly on preferences: DPO (sigmoid, cDPO), IPO, hinge or SimPO, + optional RPO term.

    Data: {"prompt", "chosen", "rejected"} pairs and/or {"prompt", "responses", "ranks"} groups
    (expanded by data.pairs: all | best_vs_rest | best_vs_worst; ties skipped). Examples:
    heed dpo --config configs/dpo.yaml --out runs/dpo (the built-in model and rankings);
    heed dpo --set model.path=runs/sft/final --set data.train=prefs.jsonl --out runs/dpo
    """
    from rich.console import Console

    from heed.cli.builtin import load_resolved
    from heed.config.dpo import DPOConfig
    from heed.train.dpo import train_dpo

    cfg = load_resolved(DPOConfig, config, with_out(set_, out))
    summary = train_dpo(cfg, resume=resume)
    keys = (
        "loss",
        "eval/loss",
        "eval/reward_accuracy",
        "eval/margin",
        "kl/k1",
        "pairs_per_s",
        "train_seconds",
    )
    figures = "  ".join(f"{k}={summary[k]:.4g}" for k in keys if k in summary)
    Console(stderr=True).print(f"[green]done[/green] {figures}\nmodel: {Path(cfg.out) / 'final'}")

"""``heed rs``: rejection sampling (best-of-N answers, scored by a judge, become SFT data)."""

from __future__ import annotations

from pathlib import Path

from heed.cli.app import ConfigOpt, OutOpt, ResumeOpt, SetOpt, app, with_out


@app.command(rich_help_panel="Train")
def rs(config: ConfigOpt = None, set_: SetOpt = None, out: OutOpt = None, resume: ResumeOpt = False) -> None:
    """Rejection sampling (Llama 2): N answers per prompt, the judge's best one kept (RUN/rs_data.jsonl),
    then SFT on them; train.rounds repeats it with the tuned policy.

    Example: heed rs --config configs/rs.yaml --out runs/rs
    """
    from rich.console import Console

    from heed.cli.builtin import load_resolved
    from heed.config.rs import RSConfig
    from heed.errors import ConfigError
    from heed.train.rs import train_rs

    if config is None and not set_:
        raise ConfigError("heed rs: give --config FILE (see configs/rs.yaml)")
    cfg = load_resolved(RSConfig, config, with_out(set_, out))
    summary = train_rs(cfg, resume=resume, config_dir=config.parent if config else None)
    keys = ("start/eval/reward", "eval/reward", "rs/best_reward", "kl/k1", "train/loss", "train_seconds")
    keys += tuple(k for k in summary if k.startswith(("gold/", "start/gold/")))
    figures = "  ".join(f"{k}={summary[k]:.4g}" for k in keys if isinstance(summary.get(k), int | float))
    Console(stderr=True).print(
        f"[green]done[/green] {figures}\nbest-of-N records: {Path(cfg.out) / 'rs_data.jsonl'}\n"
        f"model: {Path(cfg.out) / 'final'}"
    )

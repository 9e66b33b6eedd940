"""RL commands: ``heed rl`` (PPO / RLOO / GRPO / REINFORCE) and ``heed eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from heed.cli.app import ConfigOpt, OutOpt, ResumeOpt, SetOpt, app, with_out


@app.command(rich_help_panel="Train")
def rl(config: ConfigOpt = None, set_: SetOpt = None, out: OutOpt = None, resume: ResumeOpt = False) -> None:
    """Tune a policy with on-policy RL against reward sources, with a KL penalty to the reference.

    algorithm: ppo | rloo | grpo | reinforce. Rewards: built-ins (banana_format, length_penalty),
    Python functions (module:function or file.py:function), reward models (heed rm train) and
    text-classification pipelines, summed with weights. Examples:

    heed rl --config configs/banana.yaml --out runs/rloo-banana

    heed rl --config configs/banana.yaml --set algorithm=ppo --out runs/ppo-banana
    """
    from heed.cli.builtin import load_resolved
    from heed.config.rl import RLConfig
    from heed.errors import ConfigError
    from heed.train.rl import train_rl

    if config is None and not set_:
        raise ConfigError("heed rl: give --config FILE (see configs/banana.yaml)")
    cfg = load_resolved(RLConfig, config, with_out(set_, out))
    summary = train_rl(cfg, resume=resume, config_dir=config.parent if config else None)
    _done(cfg.out, summary)


def _done(out: str, summary: dict) -> None:
    from rich.console import Console

    keys = [k for k in summary if k.startswith(("eval/", "gold/")) and "/reward/" not in k]
    keys += [
        k
        for k in ("start/eval/reward", "reward/mean", "kl/k1", "samples_per_s", "train_seconds")
        if k in summary
    ]
    figures = "  ".join(f"{k}={summary[k]:.4g}" for k in keys if isinstance(summary[k], int | float))
    Console(stderr=True).print(f"[green]done[/green] {figures}\nmodel: {Path(out) / 'final'}")


@app.command("eval", rich_help_panel="Use")
def eval_(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model folder to evaluate (or 'builtin').")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder for eval.json and samples.jsonl.")
    ] = None,
    best_of: Annotated[
        int | None,
        typer.Option(
            "--best-of",
            min=1,
            help="Evaluate the best-of-N baseline: N answers per prompt, the highest-rewarded kept; "
            "its KL to the model is log N - (N-1)/N (1: one answer per prompt, KL 0).",
        ),
    ] = None,
) -> None:
    """Evaluate any model on a config's held-out prompts: rewards per source, task and gold metrics,
    KL to the reference, entropy, length, distinct-1/2; or the model's best-of-N baseline.

    Example: heed eval --model runs/rloo-banana/final --config configs/banana.yaml
    """
    import json

    from heed.cli.builtin import load_resolved, resolve_path
    from heed.config.rl import RLConfig
    from heed.errors import ConfigError
    from heed.train.rl import evaluate_model

    if config is None:
        raise ConfigError("heed eval: give --config FILE (its rewards, eval prompts and reference are used)")
    cfg = load_resolved(RLConfig, config, list(set_ or []))
    result = evaluate_model(
        cfg, str(resolve_path(model, "--model")), out, config_dir=config.parent, best_of=best_of
    )
    typer.echo(json.dumps(result, indent=2))

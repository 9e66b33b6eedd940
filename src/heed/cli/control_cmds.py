"""Classic-control commands: ``heed control --env ENV_ID``, ``heed control --eval RUN_DIR`` and
``heed control bandit`` (a text classifier tuned by PPO from simulated feedback)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from heed.cli.app import ConfigOpt, OutOpt, ResumeOpt, SetOpt, app, with_out
from heed.errors import HeedError

control_app = typer.Typer(
    help="PPO on Gymnasium classic control (CartPole-v1, Pendulum-v1, ...) on the same math as the LM trainers.",
    no_args_is_help=True,
)
app.add_typer(control_app, name="control")

# Tuned presets, one file per env id (configs/control/CartPole-v1.yaml, ...), in a source checkout.
PRESET_DIR = Path(__file__).resolve().parents[3] / "configs" / "control"


def preset_for(env_id: str) -> Path | None:
    """The tuned preset shipped for ``env_id``, if there is one."""
    path = PRESET_DIR / f"{env_id}.yaml"
    return path if path.is_file() else None


@control_app.callback(invoke_without_command=True)
def control(
    ctx: typer.Context,
    env: Annotated[
        str | None, typer.Option("--env", help="Gymnasium environment id, e.g. Pendulum-v1.")
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Environment steps to train for.")] = None,
    eval_dir: Annotated[
        Path | None,
        typer.Option("--eval", help="Evaluate the policy saved in this run folder instead of training."),
    ] = None,
    episodes: Annotated[int, typer.Option("--episodes", help="Deterministic episodes for --eval.")] = 10,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = False,
) -> None:
    """Train PPO on ENV (tuned preset from configs/control/ENV.yaml when one exists and no --config is
    given), or evaluate a saved policy with --eval RUN_DIR."""
    if ctx.invoked_subcommand is not None:
        return
    if eval_dir is not None:
        from heed.control.ppo import evaluate_run

        result = evaluate_run(eval_dir, episodes=episodes)
        typer.echo(
            f"{result['env_id']}: return {result['mean']:.1f} ± {result['std']:.1f} over {episodes} deterministic episodes"
        )
        return
    from heed.config import load_config
    from heed.control.config import ControlConfig
    from heed.control.ppo import train

    items = with_out(overrides, out)
    if env is not None:
        items.insert(0, f"env_id={env}")
    if steps is not None:
        items.append(f"total_steps={steps}")
    if config is None and env is not None and (preset := preset_for(env)) is not None:
        typer.echo(f"using the tuned preset {preset}", err=True)
        config = preset
    if config is None and env is None:
        raise HeedError("heed control: give --env ENV_ID (e.g. CartPole-v1), --config FILE or --eval RUN_DIR")
    cfg = load_config(ControlConfig, config, items)
    summary = train(cfg, resume=resume)
    typer.echo(json.dumps(summary, indent=2))


@control_app.command("bandit")
def bandit(config: ConfigOpt = None, overrides: SetOpt = None, out: OutOpt = None) -> None:
    """Tune a text classifier with PPO as a contextual bandit from a simulated annotator's approvals,
    with a KL penalty to the starting classifier; reports held-out accuracy before and after."""
    from heed.config import load_config
    from heed.control.bandit import train_bandit
    from heed.control.config import BanditConfig
    from heed.demo.classifier import bandit_tone_data

    cfg = load_config(BanditConfig, config, with_out(overrides, out))
    summary = train_bandit(cfg, bandit_tone_data(cfg.num_texts, cfg.eval_fraction, cfg.seed))
    typer.echo(json.dumps(summary, indent=2))

"""``heed kto``: Kahneman-Tversky optimisation from thumbs up / down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from heed.cli.app import ConfigOpt, OutOpt, ResumeOpt, SetOpt, app, with_out


def resolve_kto_builtins(cfg: Any) -> Any:
    """The config with its ``builtin`` names turned into paths: ``builtin:thumbs`` /
    ``builtin:thumbs_eval`` (``builtin:micro:thumbs`` ...) are the simulated feedback of
    :mod:`heed.demo.thumbs`; every other ``builtin`` name resolves as in ``heed rl``."""
    from heed.config import config_from_dict
    from heed.train.rl import resolve_builtin

    def resolve(value: str | None) -> str | None:
        if not isinstance(value, str) or not value.startswith("builtin"):
            return value
        parts = value.split(":")
        if parts[-1] in ("thumbs", "thumbs_eval"):
            from heed.demo.assets import MICRO, BuiltinSpec
            from heed.demo.thumbs import builtin_thumbs

            spec = MICRO if "micro" in parts[1:-1] else BuiltinSpec()
            return str(builtin_thumbs(model=spec)[parts[-1]])
        return resolve_builtin(value)

    data = cfg.model_dump(mode="json")
    data["model"]["path"] = resolve(data["model"]["path"])
    data["ref_model"] = resolve(data["ref_model"])
    for key in ("train", "eval"):
        data["data"][key] = resolve(data["data"][key])
    data["sample"]["prompts"] = resolve(data["sample"]["prompts"])
    return config_from_dict(type(cfg), data, "config (builtin names resolved)")


@app.command(rich_help_panel="Train")
def kto(config: ConfigOpt = None, set_: SetOpt = None, out: OutOpt = None, resume: ResumeOpt = False) -> None:
    """Tune a policy on thumbs up / down (KTO): unpaired {"prompt", "completion", "label": true|false} records.

    Pairs and ranked groups in the same files become thumbs (chosen / best up, rejected / worst down).
    Example on the built-in world (the built-in SFT model, simulated thumbs on its own answers):
    heed kto --config configs/kto.yaml --out runs/kto
    """
    from rich.console import Console

    from heed.config import load_config
    from heed.config.kto import KTOConfig
    from heed.train.kto import train_kto

    cfg = resolve_kto_builtins(load_config(KTOConfig, config, with_out(set_, out)))
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

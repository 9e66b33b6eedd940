"""Reward-model commands: ``heed rm train`` and ``heed rm score``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from heed.cli.app import ConfigOpt, OutOpt, ResumeOpt, SetOpt, app, with_out

rm_app = typer.Typer(
    help="Reward models: train on ranked groups / preference pairs, score (prompt, response) pairs.",
    no_args_is_help=True,
)
app.add_typer(rm_app, name="rm", rich_help_panel="Train")


@rm_app.command("train")
def train(
    config: ConfigOpt = None, set_: SetOpt = None, out: OutOpt = None, resume: ResumeOpt = False
) -> None:
    """Train a reward model with the K-wise ranking loss on pairs and ranked groups.

    Starts from a causal LM folder (a score head replaces its softmax layer), an encoder folder
    (BERT-style) or an existing reward model; writes final/ as an AutoModelForSequenceClassification
    with reward_stats.json (eval mean/std) beside it.

    Examples: heed rm train --config configs/rm.yaml --out runs/rm (the built-in model and rankings);
    heed rm train --set model.path=runs/sft/final --set data.train=rankings.jsonl --out runs/rm
    """
    from rich.console import Console

    from heed.cli.builtin import load_resolved
    from heed.config.reward import RMConfig
    from heed.train.reward import train_reward

    cfg = load_resolved(RMConfig, config, with_out(set_, out))
    summary = train_reward(cfg, resume=resume)
    keys = [
        k
        for k in (
            "train/loss",
            "rm/eval_loss",
            "rm/accuracy",
            "rm/top1_accuracy",
            "rm/kendall_tau",
            "pairs_per_s",
            "train_seconds",
        )
        if k in summary
    ]
    figures = "  ".join(f"{k}={summary[k]:.4g}" for k in keys)
    Console(stderr=True).print(f"[green]done[/green] {figures}\nmodel: {Path(cfg.out) / 'final'}")


def _records_to_pairs(located: list[Any]) -> list[tuple[int, str, Any, str]]:
    """(record index, output key, prompt, response) for every response in a scoring file."""
    from heed.errors import DataError

    todo = []
    for i, item in enumerate(located):
        rec, loc = item.data, item.where
        if "prompt" not in rec:
            raise DataError(f"{loc}: prompt: missing")
        prompt = rec["prompt"]
        if isinstance(rec.get("responses"), list):
            for j, r in enumerate(rec["responses"]):
                if not isinstance(r, str):
                    raise DataError(f"{loc}: responses[{j}]: expected a string, got {type(r).__name__}")
                todo.append((i, f"scores.{j}", prompt, r))
            continue
        keys = [k for k in ("response", "completion", "chosen", "rejected") if isinstance(rec.get(k), str)]
        if not keys:
            raise DataError(
                f"{loc}: response: missing (expected `response`, `completion`, `responses` or `chosen`/`rejected`)"
            )
        for k in keys:
            todo.append((i, "score" if k in ("response", "completion") else f"{k}_score", prompt, rec[k]))
    return todo


@rm_app.command("score")
def score(
    model: Annotated[
        Path,
        typer.Option(
            "--model", "-m", help="Reward model folder (heed rm train's final/), or builtin:reward_model."
        ),
    ],
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="The prompt the responses answer.")
    ] = None,
    response: Annotated[
        list[str] | None, typer.Option("--response", "-r", help="A response to score (repeatable).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="JSONL to score: prompt + response | completion | responses | chosen/rejected."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output JSONL for --data (input records plus scores).")
    ] = None,
    normalize: Annotated[
        bool, typer.Option("--normalize", help="Subtract the saved eval mean and divide by the std.")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Responses per forward pass.")] = 32,
) -> None:
    """Score responses with a reward model: one score per line, or a whole file.

    heed rm score --model runs/rm/final --prompt "Tell me about tea." --response "Tea is lovely." --response "Tea."
    heed rm score --model runs/rm/final --data answers.jsonl --out scored.jsonl
    """
    from heed.cli.builtin import resolve_optional, resolve_path
    from heed.errors import HeedError
    from heed.models.reward import load_reward_model

    if data is None and (prompt is None or not response):
        raise HeedError(
            "rm score: give --prompt TEXT with one or more --response TEXT, or --data FILE --out FILE"
        )
    if data is not None and out is None:
        raise HeedError("rm score: --data needs --out FILE for the scored records")
    model, data = resolve_path(model, "--model"), resolve_optional(data, "--data")
    rm = load_reward_model(model)
    if data is None:
        assert prompt is not None and response
        for s in rm.score([prompt] * len(response), response, batch_size=batch_size, normalize=normalize):
            typer.echo(f"{s:.6f}")
        return

    from heed.data.io import read_records, write_jsonl
    from heed.report.progress import StepProgress

    located = read_records(data)
    records = [r.data for r in located]
    todo = _records_to_pairs(located)
    with StepProgress("score", len(todo)) as bar:
        scores = rm.score(
            [t[2] for t in todo],
            [t[3] for t in todo],
            batch_size=batch_size,
            normalize=normalize,
            progress=lambda n: bar.advance(n),
        )
    rows = [dict(r) for r in records]
    for (i, key, _, _), s in zip(todo, scores, strict=True):
        if key.startswith("scores."):
            rows[i].setdefault("scores", []).append(s)
        else:
            rows[i][key] = s
    write_jsonl(out, rows)
    typer.echo(f"scored {len(todo)} responses of {len(records)} records -> {out}")

"""Trainer commands: ``heed pretrain``, ``heed sft``, ``heed generate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from heed.cli.app import ConfigOpt, OutOpt, ResumeOpt, SetOpt, app, with_out


@app.command(rich_help_panel="Train")
def pretrain(
    config: ConfigOpt = None, set_: SetOpt = None, out: OutOpt = None, resume: ResumeOpt = False
) -> None:
    """Train a base language model from scratch on plain text ({"text": ...} records).

    Trains a byte-level BPE tokenizer on the data unless model.tokenizer is set, builds a
    Llama-style model of model.size, packs the text into full rows and writes final/ in
    Hugging Face format.

    Examples: heed pretrain --config configs/pretrain.yaml --out runs/base (the built-in corpus);
    heed pretrain --set data.train=corpus.jsonl --out runs/base
    """
    from heed.cli.builtin import load_resolved
    from heed.config.sft import PRETRAIN_DEFAULTS, SFTConfig
    from heed.train.sft import train_sft

    cfg = load_resolved(SFTConfig, config, with_out(set_, out), defaults=PRETRAIN_DEFAULTS)
    summary = train_sft(cfg, resume=resume)
    _done(cfg.out, summary)


@app.command(rich_help_panel="Train")
def sft(config: ConfigOpt = None, set_: SetOpt = None, out: OutOpt = None, resume: ResumeOpt = False) -> None:
    """Supervised fine-tuning on chats ({"messages": [...]}) or {"prompt", "completion"} records.

    The loss falls on assistant / completion tokens only. Examples:
    heed sft --config configs/sft.yaml --out runs/sft (the built-in base model and chats);
    heed sft --set model.path=runs/base/final --set data.train=chat.jsonl --out runs/sft
    """
    from heed.cli.builtin import load_resolved
    from heed.config.sft import SFTConfig
    from heed.train.sft import train_sft

    cfg = load_resolved(SFTConfig, config, with_out(set_, out))
    summary = train_sft(cfg, resume=resume)
    _done(cfg.out, summary)


def _done(out: str, summary: dict) -> None:
    from rich.console import Console

    keys = [
        k
        for k in ("train/loss", "eval/loss", "eval/perplexity", "tokens_per_s", "train_seconds")
        if k in summary
    ]
    figures = "  ".join(f"{k}={summary[k]:.4g}" for k in keys)
    Console(stderr=True).print(f"[green]done[/green] {figures}\nmodel: {Path(out) / 'final'}")


@app.command(rich_help_panel="Use")
def generate(
    model: Annotated[
        Path, typer.Option("--model", "-m", help="Local model folder (Hugging Face format), or 'builtin'.")
    ],
    prompts: Annotated[
        Path,
        typer.Option(
            "--prompts",
            "-p",
            help='Prompts file: {"prompt": ...} per record (builtin:prompts_eval: built-in).',
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help='Output JSONL: {"prompt", "responses": [...]} per prompt.')
    ],
    num_samples: Annotated[int, typer.Option("--num-samples", "-k", min=1, help="Answers per prompt.")] = 1,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer in tokens.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature (0 = greedy).")] = 1.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per generate call.")] = 64,
    chat: Annotated[str, typer.Option(help="Use the chat template: auto, true or false.")] = "auto",
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Sample K answers per prompt from any local model folder into a JSONL file.

    Example: heed generate --model builtin --prompts builtin:prompts_eval --num-samples 4 --out answers.jsonl
    """
    from heed.cli.builtin import resolve_path
    from heed.data.io import write_jsonl
    from heed.data.records import load_records
    from heed.errors import ConfigError
    from heed.rollout.generate import SamplingParams, sample_responses

    if chat not in ("auto", "true", "false"):
        raise ConfigError(f"--chat: expected auto, true or false, got {chat!r}")
    model, prompts = resolve_path(model, "--model"), resolve_path(prompts, "--prompts")
    records = load_records(prompts, "prompts")
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=max(temperature, 1e-5),
        top_p=top_p,
        do_sample=temperature > 0,
    )
    answers = sample_responses(
        str(model), [r.prompt for r in records], num_samples, params, batch_size, chat, seed
    )
    write_jsonl(
        out, [{"prompt": r.prompt, "responses": a, **r.extra} for r, a in zip(records, answers, strict=True)]
    )
    typer.echo(f"wrote {len(records)} prompts x {num_samples} answers to {out}")

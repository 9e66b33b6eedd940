"""Scale-out commands: ``heed merge`` (a LoRA adapter + its base -> a plain Hugging Face model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from heed.cli.app import app


@app.command(rich_help_panel="Train")
def merge(
    adapter: Annotated[Path, typer.Option("--adapter", help="A LoRA run's final/ (or checkpoint) folder.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the merged model.")],
    base: Annotated[
        Path | None, typer.Option("--base", help="Base model folder (default: the one the adapter names).")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")] = "float32",
) -> None:
    """Merge a LoRA adapter into its base model and write a plain Hugging Face model folder.

    Example: heed merge --adapter runs/sft-lora/final --out runs/sft-merged
    """
    from heed.cli.builtin import resolve_optional
    from heed.models.lora import merge_adapter

    written = merge_adapter(adapter, out, base=resolve_optional(base, "--base"), dtype=dtype)
    typer.echo(f"merged model: {written}")

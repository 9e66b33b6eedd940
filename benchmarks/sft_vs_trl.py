"""Heed SFT vs TRL's SFTTrainer on the same tiny model, data, batch and sequence length.

Each trainer runs in its own process (clean peak-memory figures). Prints tokens/s and peak
memory ratios, and Heed's training FLOP/s as a fraction of this machine's fp32 matmul peak.

    python benchmarks/sft_vs_trl.py [--steps 30] [--batch 16] [--max-length 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import matmul_peak_flops, ratio_line, run_isolated


def prepare(workdir: Path, size: str, n: int) -> dict[str, Any]:
    """A randomly initialised model of ``size`` + the built-in tokenizer, and conversational
    prompt/completion data (the loss on the completion only, for both trainers)."""
    import torch

    from heed.demo.assets import MICRO, builtin_sft_model
    from heed.demo.corpus import make_corpus
    from heed.models.loading import load_tokenizer
    from heed.models.tiny import build_model, tiny_llama_config

    tok = load_tokenizer(builtin_sft_model(MICRO))
    model = build_model(tiny_llama_config(tok, size=size), seed=0)
    model_dir = workdir / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = [
        {
            "prompt": [{"role": "user", "content": r.prompt}],
            "completion": [{"role": "assistant", "content": r.response}],
        }
        for r in make_corpus(n, seed=11)
    ]
    data = workdir / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # tokens per example as both trainers see them (chat template, prompt + completion)
    lengths = [
        len(
            tok(
                tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False),
                add_special_tokens=False,
            )["input_ids"]
        )
        for r in rows
    ]
    del torch
    return {
        "model": str(model_dir),
        "data": str(data),
        "mean_tokens": sum(lengths) / len(lengths),
        "params": sum(p.numel() for p in model.parameters()),
    }


def worker_heed(a: dict[str, Any]) -> dict[str, Any]:
    from heed.config import config_from_dict
    from heed.config.sft import SFTConfig
    from heed.train.common import peak_memory_mb
    from heed.train.sft import train_sft

    cfg = config_from_dict(
        SFTConfig,
        {
            "model": {"path": a["model"]},
            "data": {"train": a["data"], "max_length": a["max_length"], "eval_split": 0.0},
            "train": {"batch_size": a["batch"], "max_steps": a["steps"], "seed": 0},
            "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0},
            "log": {"log_every": a["steps"], "progress": False},
            "out": a["out"],
        },
    )
    summary = train_sft(cfg)
    return {"seconds": summary["train_seconds"], "peak_mb": peak_memory_mb(), "loss": summary["train/loss"]}


def worker_trl(a: dict[str, Any]) -> dict[str, Any]:
    import transformers
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    from heed.train.common import peak_memory_mb

    transformers.utils.logging.set_verbosity_error()
    ds = load_dataset("json", data_files=a["data"], split="train")
    args = SFTConfig(
        output_dir=a["out"],
        per_device_train_batch_size=a["batch"],
        max_length=a["max_length"],
        max_steps=a["steps"],
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=a["steps"],
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        packing=False,
        bf16=False,
        fp16=False,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=a["model"], args=args, train_dataset=ds)
    t = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_mb": peak_memory_mb(), "loss": out.training_loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--worker")
    ap.add_argument("--args")
    a = ap.parse_args()
    if a.worker:
        fn = {"heed": worker_heed, "trl": worker_trl}[a.worker]
        print(json.dumps(fn(json.loads(a.args))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        info = prepare(work, a.size, n=a.steps * a.batch)
        common = {
            "model": info["model"],
            "data": info["data"],
            "batch": a.batch,
            "steps": a.steps,
            "max_length": a.max_length,
        }
        heed = run_isolated(Path(__file__), "heed", {**common, "out": str(work / "heed")})
        trl = run_isolated(Path(__file__), "trl", {**common, "out": str(work / "trl")})
        peak = matmul_peak_flops()
    tokens = a.steps * a.batch * info["mean_tokens"]
    heed_tps, trl_tps = tokens / heed["seconds"], tokens / trl["seconds"]
    flops = 6 * info["params"] * heed_tps
    print(
        f"SFT: {info['params'] / 1e6:.2f}M-parameter model, {a.steps} steps x {a.batch} sequences, "
        f"max_length {a.max_length}, ~{info['mean_tokens']:.0f} tokens/sequence, 1 process, fp32, CPU"
    )
    print(ratio_line("tokens/s", heed_tps, trl_tps, ">= 1.3x"))
    print(ratio_line("peak memory (MiB)", heed["peak_mb"], trl["peak_mb"], "<= 1.0x"))
    print(f"{'final train loss':<28} heed={heed['loss']:.4f}  trl={trl['loss']:.4f}")
    print(
        f"heed training FLOP/s ~ 6*N*tokens/s = {flops / 1e9:.2f} GFLOP/s = "
        f"{100 * flops / peak:.1f}% of measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    )


if __name__ == "__main__":
    main()

"""Heed SFT vs TRL's SFTTrainer on the same tiny model, data, batch and sequence length.

Each trainer runs in its own process (clean peak-memory figures). Prints tokens/s and peak
memory ratios, and Heed's training FLOP/s as a fraction of this machine's fp32 matmul peak.

    python benchmarks/sft_vs_trl.py [--steps 30] [--batch 16] [--max-length 128]
    python benchmarks/sft_vs_trl.py --workload qwen2-100m --max-length 1024 --steps 2 --batch 4 --repeats 2

Throughput in examples/s and tokens/s (real tokens), the training FLOP/s of each side as a fraction
of the measured fp32 matmul peak (FLOPs as in _vs_trl.py), peak memory, and ratios (medians).
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
import _vs_trl
from _common import WORKLOADS, run_isolated


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


def prepare_workload(workdir: Path, name: str, n: int, max_length: int) -> dict[str, Any]:
    """A random-weight Qwen2 workload and ``n`` synthetic prompt / completion records whose chat
    rendering fills 50-97% of ``max_length``."""
    from heed.models.loading import load_tokenizer

    model, _ = _vs_trl.workload_models(name)
    rows = _vs_trl.synthetic_completions(load_tokenizer(model), n, max_length)
    data = workdir / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": str(model), "data": str(data)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--size", default="tiny", help="Random-weight built-in model size (without --workload).")
    ap.add_argument(
        "--workload",
        choices=_vs_trl.CHOICES,
        default=None,
        help="tiny / micro: a random-weight built-in model (as --size) on the built-in corpus; qwen2-*: a "
        "random-weight Qwen2 model on synthetic records filling --max-length.",
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="Runs of each side, alternating; medians compared."
    )
    ap.add_argument("--worker")
    ap.add_argument("--args")
    a = ap.parse_args()
    if a.worker:
        fn = {"heed": worker_heed, "trl": worker_trl}[a.worker]
        print(json.dumps(fn(json.loads(a.args))))
        return
    from heed.models.loading import load_tokenizer

    workload = a.workload or a.size
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n = a.steps * a.batch
        if workload in WORKLOADS:
            info = prepare_workload(work, workload, n, a.max_length)
        else:
            info = prepare(work, workload, n)
        common = {
            "model": info["model"],
            "data": info["data"],
            "batch": a.batch,
            "steps": a.steps,
            "max_length": a.max_length,
        }
        runs: dict[str, list[dict[str, Any]]] = {"heed": [], "trl": []}
        for r in range(a.repeats):
            for kind in ("heed", "trl") if r % 2 == 0 else ("trl", "heed"):
                runs[kind].append(run_isolated(Path(__file__), kind, {**common, "out": str(work / kind)}))
                print(f"  {kind} run {len(runs[kind])}: {runs[kind][-1]['seconds']:.2f} s", flush=True)
        peak = _vs_trl.measured_peak()
        tok, config = load_tokenizer(info["model"]), _vs_trl.load_config(info["model"])
        records = [json.loads(line) for line in Path(info["data"]).read_text().splitlines()][:n]
        tokens = [_vs_trl.rendered_length(tok, r["prompt"] + r["completion"], a.max_length) for r in records]
    # FLOPs: every real token of each sequence, trunk + LM head, 3x forward
    flops = 3 * sum(_vs_trl.sequence_flops(config, t) for t in tokens)
    print(
        f"SFT  workload: {workload} ({info['model']})  {a.steps} steps x {a.batch} sequences  max_length: "
        f"{a.max_length}  real tokens/sequence: {sum(tokens) / len(tokens):.0f}  1 process, fp32"
    )
    report = _vs_trl.report(
        "training loop",
        runs,
        [("examples/s", n), ("tokens/s", sum(tokens))],
        {"heed": flops, "trl": flops},
        peak,
    )
    del report
    print(f"{'final train loss':<22} heed={runs['heed'][-1]['loss']:.4f}  trl={runs['trl'][-1]['loss']:.4f}")


if __name__ == "__main__":
    main()

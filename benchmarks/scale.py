"""Scale-out benchmark: peak memory and samples/s of SFT, full fine-tuning vs LoRA (with and without
gradient checkpointing), on the built-in micro model and a ~100M-parameter model built from
``heed.models.tiny.SIZES['100m']`` (there also LoRA over a bf16 base and bf16 autocast, and RLOO's
peak with a reference copy vs LoRA's reference-as-base and with smaller forward micro-batches);
SFT and RLOO on 1 vs 2 processes (CPU, gloo), the RLOO pair checked to end on the same metrics.

Each configuration runs in its own process (so peak memory is its own): VmHWM on CPU (which
includes the ~0.4 GiB of the Python + torch runtime, so small models show no difference),
``torch.cuda.max_memory_allocated`` on a GPU. samples/s counts the training loop only (after
loading). A few steps only; figures are indicative.

    PYTHONPATH=src python benchmarks/scale.py                 # micro model + SFT and RLOO on 1 vs 2 processes
    PYTHONPATH=src python benchmarks/scale.py --with-100m     # also the ~100M model (minutes on a CPU)
    PYTHONPATH=src python benchmarks/scale.py --rl-only       # RLOO on 1 vs 2 processes only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 16, "alpha": 32, "target_modules": "all-linear"}


def build_100m(out: Path, tokenizer_dir: Path) -> Path:
    """A randomly initialised ~100M-parameter Llama-style model with the micro model's tokenizer."""
    if (out / "config.json").exists():
        return out
    from heed.models.loading import load_tokenizer, save_pretrained
    from heed.models.tiny import build_model, tiny_llama_config

    tok = load_tokenizer(tokenizer_dir)
    model = build_model(tiny_llama_config(tok, size="100m", max_position_embeddings=256), seed=0)
    save_pretrained(model, tok, out)
    return out


def sft_config(model: Path, data: Path, out: Path, steps: int, batch: int, **model_extra: object) -> Path:
    cfg = {
        "model": {"path": str(model), **model_extra},
        "data": {"train": str(data), "max_length": 128, "eval_split": 0.0},
        "train": {"batch_size": batch, "max_steps": steps, "seed": 0},
        "optim": {"lr": 1e-4},
        "log": {"log_every": steps, "progress": False},
        "out": str(out),
        "overwrite": True,
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def rl_config(
    model: Path,
    prompts: Path,
    out: Path,
    updates: int,
    prompts_per_step: int,
    k: int,
    max_new_tokens: int = 32,
    micro_batch_size: int = 16,
    **model_extra: object,
) -> Path:
    """RLOO on a length reward (a task the micro model learns), one minibatch per update."""
    cfg = {
        "algorithm": "rloo",
        "model": {"path": str(model), **model_extra},
        "update": {"micro_batch_size": micro_batch_size},
        "data": {"prompts": str(prompts)},
        "rewards": [{"function": "length_penalty", "args": {"per_word": 0.1}}],
        "rollout": {"prompts_per_step": prompts_per_step, "k": k, "max_new_tokens": max_new_tokens},
        "optim": {"lr": 5e-4},
        "train": {"updates": updates, "seed": 0},
        "log": {"log_every": 1, "progress": False},
        "out": str(out),
        "overwrite": True,
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(
    config: Path, processes: int = 1, threads: int = 1, command: tuple[str, ...] = ("sft",)
) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    if processes == 1:
        cmd = [sys.executable, "-m", "heed", *command, "--config", str(config)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            "29577",
            "-m",
            "heed",
            *command,
            "--config",
            str(config),
        ]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    out = Path(yaml.safe_load(config.read_text())["out"])
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--with-100m", action="store_true", help="also the ~100M-parameter model (a few steps)"
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--no-rl", action="store_true", help="skip RLOO on 1 vs 2 processes")
    parser.add_argument("--rl-only", action="store_true", help="only RLOO on 1 vs 2 processes")
    parser.add_argument(
        "--rl-updates", type=int, default=4, help="RLOO updates (16 prompts x 4 answers each)"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from heed.demo.assets import MICRO, builtin_sft_model

    micro = builtin_sft_model(MICRO)
    data = micro.parent.parent / "data" / "chat.jsonl"
    tmp = Path(tempfile.mkdtemp(prefix="heed-scale-"))
    rows = []
    if args.rl_only:
        rl_one_vs_two(micro, tmp, args)
        return

    def bench(name: str, model: Path, steps: int, batch: int, processes: int = 1, **extra: object) -> dict:
        s = run(
            sft_config(model, data, tmp / name.replace(" ", "_").replace(",", ""), steps, batch, **extra),
            processes,
            args.threads,
        )
        seqs = steps * batch
        rows.append((name, s["peak_memory_mb"], seqs / s["train_seconds"], s["tokens_per_s"]))
        print(
            f"{name:34s} peak {s['peak_memory_mb']:8.0f} MiB   {seqs / s['train_seconds']:8.1f} samples/s   "
            f"{s['tokens_per_s']:9.0f} tokens/s   loss {s['train/loss']:.5f}",
            flush=True,
        )
        return s

    one = bench("micro full", micro, args.steps, 32)
    bench("micro lora", micro, args.steps, 32, lora=LORA)
    bench("micro lora + checkpointing", micro, args.steps, 32, lora=LORA, gradient_checkpointing=True)
    two = bench("micro full, 2 processes", micro, args.steps, 32, processes=2)
    print(
        f"sft 2 processes / 1 process: {two['tokens_per_s'] / one['tokens_per_s']:.2f}x tokens/s; "
        f"final train loss differs by {abs(two['train/loss'] - one['train/loss']):.1e}",
        flush=True,
    )
    if not args.no_rl:
        rl_one_vs_two(micro, tmp, args)
    if args.with_100m:
        big = build_100m(tmp / "m100", micro)
        bench("100m full", big, 2, 8)
        bench("100m lora", big, 2, 8, lora=LORA)
        bench("100m lora + checkpointing", big, 2, 8, lora=LORA, gradient_checkpointing=True)
        bench("100m lora, base weights bf16", big, 2, 8, lora=LORA, dtype="bfloat16")
        bench("100m full, bf16 autocast", big, 2, 8, mixed_precision="bf16")
        rl_memory(big, micro, tmp, args)
    print("peak memory of the 2-process run is that of rank 0 (the main process)")


def rl_memory(big: Path, micro: Path, tmp: Path, args: argparse.Namespace) -> None:
    """RLOO on the ~100M model, one update of 8 prompts x 4 answers: peak memory with a separate
    reference copy (full fine-tuning) vs LoRA (the reference is the base with the adapter off), and
    with smaller forward micro-batches (update.micro_batch_size)."""
    prompts = micro.parent.parent / "data" / "prompts_train.jsonl"
    for name, extra in (
        ("full, reference copy, micro-batch 32", {"micro_batch_size": 32}),
        ("full, reference copy, micro-batch 4", {"micro_batch_size": 4}),
        ("lora, reference = base, micro-batch 32", {"micro_batch_size": 32, "lora": LORA}),
    ):
        cfg = rl_config(big, prompts, tmp / f"rl100m_{len(name)}", 1, 8, 4, max_new_tokens=16, **extra)
        s = run(cfg, 1, args.threads, ("rl",))
        print(
            f"{'100m rloo ' + name:44s} peak {s['peak_memory_mb']:8.0f} MiB   {s['samples_per_s']:8.1f} samples/s",
            flush=True,
        )


def rl_one_vs_two(model: Path, tmp: Path, args: argparse.Namespace) -> None:
    """RLOO, the same global batch on 1 and 2 processes: the same final metrics, and the samples/s ratio."""
    prompts = model.parent.parent / "data" / "prompts_train.jsonl"
    summaries = {}
    for processes in (1, 2):
        cfg = rl_config(model, prompts, tmp / f"rloo_{processes}p", args.rl_updates, 16, 4)
        s = run(cfg, processes, args.threads, ("rl",))
        summaries[processes] = s
        print(
            f"{f'micro rloo, {processes} process' + ('es' if processes > 1 else ''):34s} "
            f"peak {s['peak_memory_mb']:8.0f} MiB   {s['samples_per_s']:8.1f} samples/s   "
            f"reward {s['reward/mean']:+.4f}  kl {s['kl/k1']:.4f}  loss {s['loss']:+.5f}",
            flush=True,
        )
    one, two = summaries[1], summaries[2]
    diff = max(abs(one[k] - two[k]) for k in ("reward/mean", "kl/k1", "loss"))
    print(
        f"rloo 2 processes / 1 process: {two['samples_per_s'] / one['samples_per_s']:.2f}x samples/s; "
        f"final reward/kl/loss differ by at most {diff:.1e}"
    )


if __name__ == "__main__":
    main()

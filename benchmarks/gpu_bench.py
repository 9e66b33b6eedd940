"""The Python side of ``benchmarks/gpu.sh``: one part of the GPU benchmark per call, each in its own
process (so each part's peak memory is its own), each appending one row to ``WORK/results.jsonl``.

    python benchmarks/gpu_bench.py build --work DIR              # the qwen2-0.5b workload (random weights)
    python benchmarks/gpu_bench.py rl --engine vllm --work DIR   # heed rl, vLLM rollouts
    python benchmarks/gpu_bench.py rl --engine hf --work DIR     # heed rl, transformers generate
    python benchmarks/gpu_bench.py qlora --work DIR              # heed sft, 4-bit base + LoRA
    python benchmarks/gpu_bench.py fsdp --work DIR               # heed sft under accelerate launch (FSDP2)
    python benchmarks/gpu_bench.py summary --work DIR            # the table of every row

Every part runs the ``heed`` command itself (``python -m heed``; the RL parts under torchrun with one
process, the FSDP part under ``accelerate launch``) on files written here, reads the run's
``summary.json`` and ``metrics.jsonl``, and samples the GPU's used memory with ``nvidia-smi`` while it
runs (the device's peak above what was in use before, which also counts vLLM's pool and the CUDA
contexts that ``torch.cuda.max_memory_allocated`` misses). A part whose optional package (vllm,
bitsandbytes, peft) is missing is a ``skipped`` row with the reason; a part that fails is a
``failed`` row with the last line of its error, and ``summary`` then exits 1.

``HEED_GPU_WORKLOAD=qwen2-4k`` runs the same parts on a small workload (the RL part runs on a CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_workload, parameter_count, synthetic_texts, workload_config

WORKLOAD = os.environ.get("HEED_GPU_WORKLOAD", "qwen2-0.5b")  # another workload name checks the parts on CPU
REPO = Path(__file__).resolve().parent.parent

# RL: 16 prompts x 4 answers of 256 tokens per update. The weights are random and EOS is one token
# in 151936, so every answer runs to max_new_tokens: tokens/s counts full-length answers.
RL_SETTINGS = {"prompts_per_step": 16, "k": 4, "max_new_tokens": 256, "updates": 3}
# SFT parts: prompt + completion records of ~200 tokens, cut at 256.
SFT_SETTINGS = {"records": 512, "batch_size": 16, "max_length": 256, "max_steps": 10}


def gpu_memory_used_mib() -> list[int]:
    """Used memory of each GPU in MiB, from ``nvidia-smi`` (empty when it cannot be read)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(x) for x in out.split() if x.strip().isdigit()]


class MemorySampler:
    """Peak GPU memory in use (all GPUs summed, MiB) above the level before ``start``, polled twice a second."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak, self.stop_event = interval, 0, threading.Event()
        self.base = sum(gpu_memory_used_mib())
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop_event.is_set():
            self.peak = max(self.peak, sum(gpu_memory_used_mib()) - self.base)
            self.stop_event.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join()


def record(work: Path, row: dict[str, Any]) -> None:
    """Append one part's row to ``WORK/results.jsonl`` and print it."""
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def last_line(text: str) -> str:
    """The last line of a failed command's output that says what went wrong."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or "Error" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def run_heed(
    command: list[str], log: Path, timeout: int, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run a command (a ``heed`` run) with its output in ``log``; (exit code, reason when it failed)."""
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    full_env.update(env or {})
    with open(log, "w") as f:
        try:
            proc = subprocess.run(
                command, stdout=f, stderr=subprocess.STDOUT, env=full_env, timeout=timeout, cwd=REPO
            )
        except subprocess.TimeoutExpired:
            return 124, f"timed out after {timeout} s (log: {log})"
    if proc.returncode != 0:
        return proc.returncode, f"{last_line(log.read_text())} (log: {log})"
    return 0, ""


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def model_dir(work: Path) -> Path:
    return work / WORKLOAD


def missing(*modules: str) -> str | None:
    """'needs X (not installed)' for the first of ``modules`` that cannot be imported, else None."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            return f"needs {m} (not installed)"
    return None


# ---------------------------------------------------------------------------------------------
# the parts


def part_build(work: Path) -> None:
    t = time.time()
    path = build_workload(WORKLOAD, work)
    cfg = workload_config(WORKLOAD)
    record(
        work,
        {
            "part": "build",
            "status": "ok",
            "seconds": round(time.time() - t, 1),
            "parameters": parameter_count(cfg),
            "vocab": cfg.vocab_size,
            "path": str(path),
        },
    )


def write_prompts(work: Path) -> Path:
    path = work / "prompts.jsonl"
    if not path.exists():
        texts = synthetic_texts(256, 12, seed=2)
        path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


def write_sft_data(work: Path) -> Path:
    path = work / "sft.jsonl"
    if not path.exists():
        n = SFT_SETTINGS["records"]
        prompts, answers = synthetic_texts(n, 20, seed=3), synthetic_texts(n, 140, seed=4)
        path.write_text(
            "".join(
                json.dumps({"prompt": p, "completion": a}) + "\n"
                for p, a in zip(prompts, answers, strict=True)
            )
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rl_config(work: Path, engine: str) -> dict[str, Any]:
    """heed rl's config for one engine: RLOO on the prompts file, a rule reward, a tiny learning rate."""
    s = RL_SETTINGS
    return {
        "algorithm": "rloo",
        "model": {"path": str(model_dir(work)), "dtype": "bfloat16"},
        "data": {"prompts": str(write_prompts(work))},
        "rewards": [{"function": "banana_format"}],
        "rollout": {
            "prompts_per_step": s["prompts_per_step"],
            "k": s["k"],
            "max_new_tokens": s["max_new_tokens"],
            "temperature": 1.0,
            "engine": engine,
            "batch_size": s["prompts_per_step"] * s["k"],
            # both engines the same way: the trainer recomputes the behaviour log-probs with its own
            # forward, and logs their difference from the engine's where it reports them (vLLM)
            "reuse_logprobs": False,
        },
        "update": {"micro_batch_size": 16},
        "kl": {"beta": 0.05},
        "optim": {"lr": 1.0e-6},
        "train": {"updates": s["updates"], "seed": 0},
        "eval": {"at_start": False},
        "log": {"progress": False, "log_every": 1},
        "overwrite": True,
    }


def part_rl(work: Path, engine: str, timeout: int) -> None:
    part = f"rl ({engine})"
    if engine == "vllm" and (why := missing("vllm")):
        record(work, {"part": part, "status": "skipped", "reason": why})
        return
    out = work / f"rl-{engine}"
    cfg_path = work / f"rl-{engine}.json"
    cfg_path.write_text(json.dumps(rl_config(work, engine)))
    # vLLM's in-process engine joins the training processes' torch.distributed group (its external
    # launcher reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE / MASTER_*), so both engines run under
    # torchrun with one process, so the two timings compare like with like
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_port",
        str(free_port()),
        "-m",
        "heed",
        "rl",
        "--config",
        str(cfg_path),
        "--out",
        str(out),
    ]
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if engine == "vllm" else {}
    t = time.time()
    with MemorySampler() as mem:
        code, why = run_heed(command, work / f"rl-{engine}.log", timeout, env)
    if code:
        record(work, {"part": part, "status": "failed", "reason": why})
        return
    summary = json.loads((out / "summary.json").read_text())
    metrics = [m for m in read_metrics(out) if "length/mean" in m]
    samples = summary["samples"]
    mean_len = (
        sum(m["length/mean"] for m in metrics) / len(metrics)
        if metrics
        else float(RL_SETTINGS["max_new_tokens"])
    )
    diffs = [m["rollout/logprob_diff"] for m in metrics if "rollout/logprob_diff" in m]
    record(
        work,
        {
            "part": part,
            "status": "ok",
            "seconds": round(time.time() - t, 1),
            "samples": samples,
            "mean_answer_tokens": round(mean_len, 1),
            "gen_tokens_per_s": round(samples * mean_len / max(summary["generation_seconds"], 1e-9), 1),
            "samples_per_s": round(summary["samples_per_s"], 2),
            "peak_allocated_mib": round(summary["peak_memory_mb"]),
            "peak_gpu_mib": mem.peak,
            "logprob_diff": round(sum(diffs) / len(diffs), 5) if diffs else None,
        },
    )


def sft_config(work: Path, lora: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
    s = SFT_SETTINGS
    return {
        "model": {"path": str(model_dir(work)), "dtype": dtype, "lora": lora},
        "data": {"train": str(write_sft_data(work)), "eval_split": 0.05, "max_length": s["max_length"]},
        "train": {
            "batch_size": s["batch_size"],
            "micro_batch_size": 8,
            "max_steps": s["max_steps"],
            "seed": 0,
        },
        "optim": {"lr": 1.0e-4, "warmup_steps": 0},
        "log": {"progress": False, "log_every": 1, "eval_every": 0, "save_every": 0},
        "overwrite": True,
    }


def sft_row(work: Path, part: str, out: Path, t: float, mem: MemorySampler) -> None:
    summary = json.loads((out / "summary.json").read_text())
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    record(
        work,
        {
            "part": part,
            "status": "ok",
            "seconds": round(time.time() - t, 1),
            "steps": summary["steps"],
            "tokens_per_s": round(summary["tokens_per_s"], 1),
            "peak_allocated_mib": round(summary["peak_memory_mb"]),
            "peak_gpu_mib": mem.peak,
            "loss_first": round(losses[0], 3) if losses else None,
            "loss_last": round(losses[-1], 3) if losses else None,
        },
    )


def part_qlora(work: Path, timeout: int) -> None:
    part = "sft (QLoRA 4-bit)"
    if why := missing("peft", "bitsandbytes"):
        record(work, {"part": part, "status": "skipped", "reason": why})
        return
    out = work / "qlora"
    cfg_path = work / "qlora.json"
    lora = {"r": 16, "alpha": 32, "quantize": "4bit"}
    cfg_path.write_text(json.dumps(sft_config(work, lora, "bfloat16")))
    t = time.time()
    with MemorySampler() as mem:
        code, why = run_heed(
            [sys.executable, "-m", "heed", "sft", "--config", str(cfg_path), "--out", str(out)],
            work / "qlora.log",
            timeout,
        )
    if code:
        record(work, {"part": part, "status": "failed", "reason": why})
        return
    sft_row(work, part, out, t, mem)


def part_fsdp(work: Path, timeout: int) -> None:
    import torch

    gpus = max(torch.cuda.device_count(), 1)
    part = f"sft (FSDP2, {gpus} GPU{'s' if gpus > 1 else ''})"
    out = work / "fsdp"
    cfg_path = work / "fsdp.json"
    cfg_path.write_text(json.dumps(sft_config(work, None, "float32")))
    # accelerate launch starts FSDP runs with torchrun, even on one GPU
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs" / "accelerate" / "fsdp.yaml"),
        "--num_processes",
        str(gpus),
        "--main_process_port",
        str(free_port()),
        "-m",
        "heed",
        "sft",
        "--config",
        str(cfg_path),
        "--out",
        str(out),
    ]
    t = time.time()
    with MemorySampler() as mem:
        code, why = run_heed(command, work / "fsdp.log", timeout)
    if code:
        record(work, {"part": part, "status": "failed", "reason": why})
        return
    sft_row(work, part, out, t, mem)


def summary(work: Path) -> int:
    """Print the table of every part's row; 1 when a part failed (or none ran), else 0."""
    path = work / "results.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    columns = [
        ("part", "part", 22),
        ("status", "status", 8),
        ("s", "seconds", 7),
        ("gen tok/s", "gen_tokens_per_s", 10),
        ("samples/s", "samples_per_s", 10),
        ("train tok/s", "tokens_per_s", 12),
        ("peak GPU MiB", "peak_gpu_mib", 13),
        ("alloc MiB", "peak_allocated_mib", 10),
        ("logprob diff", "logprob_diff", 13),
        ("loss", "loss_last", 6),
    ]
    print(
        f"\nGPU benchmark: workload {WORKLOAD} ({parameter_count(workload_config(WORKLOAD)) / 1e6:.0f}M parameters)"
    )
    print("  ".join(f"{h:<{w}}" for h, _, w in columns))
    for row in rows:
        cells = []
        for _, key, w in columns:
            v = row.get(key)
            cells.append(f"{'-' if v is None else v!s:<{w}}")
        line = "  ".join(cells)
        if row.get("reason"):
            line += f"  {row['reason']}"
        print(line)
    failed = [r["part"] for r in rows if r.get("status") == "failed"]
    if failed or not rows:
        print(f"failed: {', '.join(failed) or 'no part ran'}")
        return 1
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["build", "rl", "qlora", "fsdp", "summary"])
    p.add_argument(
        "--work", required=True, type=Path, help="folder for the model, data, runs and results.jsonl"
    )
    p.add_argument("--engine", choices=["vllm", "hf"], default="hf", help="rl: the rollout engine")
    p.add_argument("--timeout", type=int, default=300, help="seconds a part's heed run may take")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.part == "summary":
        sys.exit(summary(args.work))
    if args.part == "build":
        part_build(args.work)
        return
    if not (model_dir(args.work) / "config.json").exists():
        record(
            args.work,
            {"part": args.part, "status": "failed", "reason": "the model was not built (run build first)"},
        )
        return
    if args.part == "rl":
        part_rl(args.work, args.engine, args.timeout)
    elif args.part == "qlora":
        part_qlora(args.work, args.timeout)
    else:
        part_fsdp(args.work, args.timeout)


if __name__ == "__main__":
    main()

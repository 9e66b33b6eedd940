"""Heed's K-wise reward-model training vs TRL's RewardTrainer on the same groups expanded into pairs.

The same ranked groups (built-in world, K responses per prompt) train the same model twice:

- Heed: ``heed.train.reward.train_reward``, each group's K responses in one forward, the loss
  over its C(K, 2) pairs;
- TRL: ``trl.RewardTrainer`` (conversational pairs ``{"prompt", "chosen", "rejected"}``, every
  pair of the groups with different ranks), 2 forwards per pair.

Both use the same sequences per forward (Heed ``groups_per_step`` · K = TRL 2 · ``pairs_per_step``),
float32, no gradient checkpointing, the same learning rate, and run a fixed number of steps.
The figure is preference pairs learned per second of the training loop (model loading and
tokenisation excluded on both sides), and the ratio Heed / TRL. After one untimed warm-up run,
Heed and TRL alternate ``--repeats`` times. The headline compares the best run of each side
(other jobs on a shared machine only ever add time, so the fastest run is the least disturbed,
as ``timeit`` reports); medians are printed too, with the load average.

    python benchmarks/rm_vs_trl.py --threads 2 --k 4 9
    python benchmarks/rm_vs_trl.py --workload qwen2-100m --max-length 1024 --batch 4 --steps 2 --repeats 2

``--workload`` (``--share-prompt``: Heed runs each prompt once) compares pairs (Heed: groups of K = 2, so both sides forward the same sequences) whose
prompt + answer fill 50-97% of ``--max-length``, each side in its own process, and prints pairs/s,
examples/s, tokens/s, the fraction of the measured fp32 matmul peak (FLOPs as in _vs_trl.py: the
trunk on every real token of both sequences, 3x forward) and peak memory, with ratios (medians).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import _vs_trl


def expand_pairs(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (better, worse) pair of each group, in TRL's conversational format."""
    out = []
    for g in groups:
        k = len(g["responses"])
        for i in range(k):
            for j in range(k):
                if g["ranks"][i] < g["ranks"][j]:
                    out.append(
                        {
                            "prompt": [{"role": "user", "content": g["prompt"]}],
                            "chosen": [{"role": "assistant", "content": g["responses"][i]}],
                            "rejected": [{"role": "assistant", "content": g["responses"][j]}],
                        }
                    )
    return out


def run_heed(
    model: Path,
    groups_file: Path,
    out: Path,
    k: int,
    seqs: int,
    steps: int,
    lr: float,
    max_length: int = 256,
    share_prompt: bool = False,
) -> dict[str, Any]:
    from heed.config import config_from_dict
    from heed.config.reward import RMConfig
    from heed.train.reward import train_reward

    cfg = config_from_dict(
        RMConfig,
        {
            "model": {"path": str(model)},
            "data": {"train": str(groups_file), "eval_split": 0, "max_length": max_length},
            "train": {"batch_size": max(1, seqs // k), "max_steps": steps, "share_prompt": share_prompt},
            "optim": {"lr": lr, "warmup_steps": 0, "schedule": "constant"},
            "log": {"progress": False, "log_every": 1000},
            "out": str(out),
            "overwrite": True,
        },
    )
    s = train_reward(cfg)
    return {
        "pairs_per_s": s["pairs_per_s"],
        "seconds": s["train_seconds"],
        "steps": steps,
        "pairs_per_cpu_s": s["pairs_per_s"] * s["train_seconds"] / s["train_cpu_seconds"],
        "sequences_per_forward": max(1, seqs // k) * k,
        "final_loss": s["train/loss"],
    }


def run_trl(
    model: Path,
    pairs: list[dict[str, Any]],
    out: Path,
    seqs: int,
    steps: int,
    lr: float,
    max_length: int = 256,
) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from heed.models.loading import load_tokenizer, quiet_transformers

    quiet_transformers()
    tok = load_tokenizer(model)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(str(model), num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    per_step = max(1, seqs // 2)
    args = RewardConfig(
        output_dir=str(out),
        per_device_train_batch_size=per_step,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        max_length=max_length,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = RewardTrainer(model=rm, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok)
    t0, cpu0 = time.time(), time.process_time()
    result = trainer.train()
    seconds = result.metrics.get("train_runtime", time.time() - t0)
    cpu_seconds = time.process_time() - cpu0
    return {
        "pairs_per_s": per_step * steps / seconds,
        "seconds": seconds,
        "steps": steps,
        "pairs_per_cpu_s": per_step * steps / cpu_seconds,
        "sequences_per_forward": 2 * per_step,
        "final_loss": result.metrics.get("train_loss"),
    }


def worker(kind: str, a: dict[str, Any]) -> None:
    """One side of a ``--workload`` comparison in this process; prints ``RESULT {json}``."""
    from heed.models.loading import quiet_transformers
    from heed.train.common import peak_memory_mb

    quiet_transformers()
    torch.set_num_threads(a["threads"])
    out = Path(a["work"]) / kind
    if kind == "heed":
        r = run_heed(
            Path(a["model"]),
            Path(a["groups"]),
            out,
            2,
            2 * a["batch"],
            a["steps"],
            a["lr"],
            a["max_length"],
            a["share_prompt"],
        )
    else:
        pairs = [json.loads(line) for line in Path(a["pairs"]).read_text().splitlines()]
        r = run_trl(Path(a["model"]), pairs, out, 2 * a["batch"], a["steps"], a["lr"], a["max_length"])
    print("RESULT " + json.dumps({**r, "peak_mb": peak_memory_mb()}), flush=True)


def compare_workload(args: argparse.Namespace) -> None:
    """``--workload``: pairs (K = 2 groups for Heed, the same pairs for TRL) whose sequences fill
    ``--max-length``; each side in its own process, alternating; the table of ``_vs_trl.report``."""
    from heed.models.loading import load_tokenizer

    if args.workload in _vs_trl.BUILTIN:
        from heed.demo.assets import MICRO, BuiltinSpec, builtin_sft_model

        model = builtin_sft_model(MICRO if args.workload == "micro" else BuiltinSpec())
    else:
        model, _ = _vs_trl.workload_models(args.workload)
    tok, config = load_tokenizer(model), _vs_trl.load_config(model)
    n = args.steps * args.batch
    rows = _vs_trl.synthetic_pairs(tok, n, args.max_length)
    tokens = [
        [
            _vs_trl.rendered_length(tok, r["prompt"] + r[side], args.max_length)
            for side in ("chosen", "rejected")
        ]
        for r in rows
    ]
    flops = 3 * sum(_vs_trl.sequence_flops(config, t, head=False) for pair in tokens for t in pair)
    with tempfile.TemporaryDirectory(prefix="heed-rm-bench-") as tmp:
        groups = [
            {
                "prompt": r["prompt"][0]["content"],
                "responses": [r["chosen"][0]["content"], r["rejected"][0]["content"]],
                "ranks": [1, 2],
            }
            for r in rows
        ]
        (Path(tmp) / "groups.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
        (Path(tmp) / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        a = {
            "model": str(model),
            "groups": str(Path(tmp) / "groups.jsonl"),
            "pairs": str(Path(tmp) / "pairs.jsonl"),
            "work": tmp,
            "batch": args.batch,
            "steps": args.steps,
            "lr": args.lr,
            "max_length": args.max_length,
            "threads": args.threads,
            "share_prompt": args.share_prompt,
        }
        runs = _vs_trl.alternate(lambda kind: _vs_trl.spawn(__file__, kind, a), args.repeats)
        peak = _vs_trl.measured_peak()
    print(
        f"RM  workload: {args.workload} ({model})  pairs: {n}  batch: {args.batch} pairs  max_length: "
        f"{args.max_length}  steps: {args.steps}  real tokens/pair: {sum(map(sum, tokens)) / n:.0f}  "
        f"share_prompt: {a['share_prompt']}"
    )
    _vs_trl.report(
        "training loop (Heed: K = 2 groups; TRL: the same pairs)",
        runs,
        [("pairs/s", n), ("examples/s", 2 * n), ("tokens/s", sum(map(sum, tokens)))],
        {"heed": flops, "trl": flops},
        peak,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--workload",
        choices=_vs_trl.CHOICES,
        default=None,
        help="Compare on synthetic pairs filling --max-length (each side in its own process, peak memory, "
        "matmul-peak fraction): tiny / micro built-in SFT model or a random-weight qwen2-* model.",
    )
    ap.add_argument("--max-length", type=int, default=512, help="With --workload: sequence length to fill.")
    ap.add_argument("--batch", type=int, default=8, help="With --workload: pairs per optimizer step.")
    ap.add_argument(
        "--share-prompt",
        action="store_true",
        help="With --workload: Heed runs each pair's prompt once (block mask).",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-args", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="causal LM folder (default: the built-in tiny SFT model)")
    ap.add_argument("--k", type=int, nargs="+", default=[4, 9])
    ap.add_argument("--groups", type=int, default=300)
    ap.add_argument("--seqs", type=int, default=36, help="sequences per forward on both sides")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument(
        "--repeats", type=int, default=3, help="alternating Heed/TRL runs per K (medians compared)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.worker_args))
        return
    torch.set_num_threads(args.threads)
    if args.workload:
        compare_workload(args)
        return

    from heed.data.io import write_jsonl
    from heed.demo.assets import builtin_sft_model
    from heed.demo.preferences import make_ranked_groups

    model = Path(args.model) if args.model else builtin_sft_model()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{args.threads} threads"
    results: dict[str, Any] = {
        "model": str(model),
        "device": device,
        "load_avg_start": os.getloadavg(),
        "runs": {},
    }
    print(f"model {model}\ndevice {device}  load average {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.k:
            groups = make_ranked_groups(args.groups, k=k, seed=0)
            write_jsonl(Path(tmp) / f"groups{k}.jsonl", groups)
            pairs = expand_pairs(groups)
            groups_file = Path(tmp) / f"groups{k}.jsonl"
            run_heed(
                model, groups_file, Path(tmp) / "warmup", k, args.seqs, 2, args.lr
            )  # untimed: process warm-up
            heeds, trls = [], []
            for _ in range(args.repeats):
                heeds.append(
                    run_heed(model, groups_file, Path(tmp) / f"heed{k}", k, args.seqs, args.steps, args.lr)
                )
                trls.append(run_trl(model, pairs, Path(tmp) / f"trl{k}", args.seqs, args.steps, args.lr))
            heed_rate = max(h["pairs_per_s"] for h in heeds)
            trl_rate = max(t["pairs_per_s"] for t in trls)
            ratio = heed_rate / trl_rate
            median_ratio = statistics.median(h["pairs_per_s"] for h in heeds) / statistics.median(
                t["pairs_per_s"] for t in trls
            )
            results["runs"][f"k{k}"] = {
                "heed_pairs_per_s": heed_rate,
                "trl_pairs_per_s": trl_rate,
                "ratio": ratio,
                "median_ratio": median_ratio,
                "pairs": len(pairs),
                "heed": heeds,
                "trl": trls,
            }
            print(
                f"K={k}: heed {heed_rate:.1f} pairs/s  trl {trl_rate:.1f} pairs/s  ratio {ratio:.2f}x  "
                f"(best of {args.repeats} each; ratio of medians {median_ratio:.2f}x; load average "
                f"{os.getloadavg()[0]:.1f})",
                flush=True,
            )
    results["load_avg_end"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

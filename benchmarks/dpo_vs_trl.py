"""Heed DPO against TRL's ``DPOTrainer`` on identical data, model, batch and max length.

    PYTHONPATH=src .venv/bin/python benchmarks/dpo_vs_trl.py                 # built-in tiny SFT model
    PYTHONPATH=src .venv/bin/python benchmarks/dpo_vs_trl.py --size micro --pairs 128
    PYTHONPATH=src .venv/bin/python benchmarks/dpo_vs_trl.py --workload qwen2-100m --max-length 1024 \
        --pairs 8 --batch-size 4 --repeats 2 --no-check

``--workload qwen2-4k | qwen2-32k | qwen2-100m`` trains a random-weight Qwen2 model (benchmarks/_common.py)
on synthetic pairs whose prompt + answer fill 50-97% of ``--max-length`` (so padding matters), with
a second random model as the reference of the loss check.

Prints, in one run:

- training throughput (pairs/s, examples/s, tokens/s: the training loop only, tokenization and
  reference precompute excluded on both sides) and its ratio Heed / TRL, and the training FLOP/s
  as a fraction of this machine's measured fp32 matmul peak (FLOPs counted as in _vs_trl.py);
- peak memory of each side (CUDA: peak allocated; CPU: peak RSS of the whole process, imports
  included) and the ratio Heed / TRL;
- the loss of the first batch from both, on the same token ids, with a reference model that
  differs from the policy (the built-in base model), so the number is not the trivial log 2;
  they must agree to 1e-4 for ``sigmoid``. Also how many pairs Heed tokenizes exactly as TRL.

Each side runs in its own process (clean memory figures). Both precompute reference log-probs,
use float32, no gradient checkpointing, AdamW with the same learning rate and schedule, no
evaluation or checkpoints during the timed loop. The machine may be shared: each side runs
``--repeats`` times in alternating order and the medians are compared; the script prints every run
and the load average; compare ratios, not absolute speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import _vs_trl


def make_data(folder: Path, n: int, seed: int) -> Path:
    from heed.data.io import write_jsonl
    from heed.demo.preferences import make_pairs

    # conversational (TRL's format too), so both sides render the chat template the SFT model was trained on
    path = folder / "pairs.jsonl"
    write_jsonl(
        path,
        [
            {
                "prompt": [{"role": "user", "content": p["prompt"]}],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}],
            }
            for p in make_pairs(n, seed=seed)
        ],
    )
    return path


# ------------------------------------------------------------------------------------------------
def run_heed(a: dict[str, Any]) -> dict[str, Any]:
    from heed.config import config_from_dict
    from heed.config.dpo import DPOConfig
    from heed.train.common import peak_memory_mb
    from heed.train.dpo import train_dpo

    cfg = config_from_dict(
        DPOConfig,
        {
            "model": {"path": a["model"]},
            "data": {"train": a["data"], "eval_split": 0.0, "max_length": a["max_length"], "chat": "true"},
            "loss": {"type": "sigmoid", "beta": a["beta"]},
            "train": {
                "batch_size": a["batch_size"],
                "max_steps": a["steps"],
                "seed": 0,
                "precompute_ref": True,
                "eval_batch_size": a["batch_size"],
            },
            "optim": {
                "lr": a["lr"],
                "warmup_steps": 0,
                "schedule": "linear",
                "min_lr_ratio": 0.0,
                "max_grad_norm": 1.0,
                "betas": [0.9, 0.999],
            },
            "log": {"log_every": 10, "progress": False},
            "sample": {"num_prompts": 0},
            "out": str(Path(a["work"]) / "heed-run"),
            "overwrite": True,
        },
    )
    s = train_dpo(cfg)
    return {
        "pairs_per_s": s["pairs_per_s"],
        "train_seconds": s["train_seconds"],
        "ref_seconds": s["ref_seconds"],
        "peak_mb": peak_memory_mb(),
        "seconds": s["train_seconds"],
    }


class _Clock:
    """Times ``train()`` from its first to its last step (filled by a TrainerCallback)."""

    def __init__(self) -> None:
        self.begin = self.end = 0.0


def run_trl(a: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from heed.models.loading import load_causal_lm, load_tokenizer
    from heed.train.common import peak_memory_mb

    clock = _Clock()

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.begin = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            clock.end = time.perf_counter()

    tok = load_tokenizer(a["model"])
    model = load_causal_lm(a["model"])
    ds = load_dataset("json", data_files=a["data"], split="train")
    args = DPOConfig(
        output_dir=str(Path(a["work"]) / "trl-run"),
        per_device_train_batch_size=a["batch_size"],
        max_steps=a["steps"],
        learning_rate=a["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=a["beta"],
        loss_type=["sigmoid"],
        max_length=a["max_length"],
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        precompute_ref_log_probs=True,
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        use_cpu=not torch.cuda.is_available(),
    )
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    setup = time.perf_counter() - t0
    trainer.train()
    seconds = clock.end - clock.begin
    return {
        "pairs_per_s": a["steps"] * a["batch_size"] / seconds,
        "train_seconds": seconds,
        "ref_seconds": setup,
        "peak_mb": peak_memory_mb(),
        "seconds": seconds,
    }


def first_batch_losses(a: dict[str, Any]) -> dict[str, Any]:
    """The first batch of TRL's (unshuffled) dataset through both implementations, same ids, same models."""
    import torch
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    from heed.config.dpo import DPOLossConfig
    from heed.data.pairs import PairCounts, encode_pairs, expand_pairs
    from heed.data.records import load_records
    from heed.models.forward import pair_logps
    from heed.models.loading import load_causal_lm, load_tokenizer
    from heed.train.dpo import preference_losses

    tok = load_tokenizer(a["model"])
    policy, ref = load_causal_lm(a["model"]), load_causal_lm(a["ref"])
    b = a["batch_size"]
    ds = load_dataset("json", data_files=a["data"], split=f"train[:{b}]")
    args = DPOConfig(
        output_dir=str(Path(a["work"]) / "trl-check"),
        per_device_train_batch_size=b,
        beta=a["beta"],
        max_length=a["max_length"],
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(b)]
    inputs = trainer.data_collator(rows)
    device = trainer.accelerator.device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    policy.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, inputs).item()
        # Heed on TRL's own token ids: completion_mask is Heed's response mask
        ids, att, mask = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"].bool()
        pol = pair_logps(trainer.model, ids, att, mask)
        ref_lp = pair_logps(ref.to(device), ids, att, mask)
        losses, _ = preference_losses(DPOLossConfig(beta=a["beta"]), pol, ref_lp.logps, ref_lp.avg_logps)
        heed_loss = losses.mean().item()
    # how many pairs Heed's own tokenization gives exactly TRL's ids
    pairs, _ = expand_pairs(load_records(a["data"], "pairs")[:b])
    mine = encode_pairs(tok, pairs, True, a["max_length"], PairCounts())
    same = sum(
        mine.chosen[i][0] == r["prompt_ids"] + r["chosen_ids"]
        and mine.rejected[i][0] == r["prompt_ids"] + r["rejected_ids"]
        for i, r in enumerate(rows)
    )
    return {
        "trl_first_loss": trl_loss,
        "heed_first_loss": heed_loss,
        "same_ids": same,
        "batch": b,
        "cuda": torch.cuda.is_available(),
    }


# ------------------------------------------------------------------------------------------------
def worker(kind: str, a: dict[str, Any]) -> None:
    from heed.models.loading import quiet_transformers

    quiet_transformers()
    os.environ.setdefault("TQDM_DISABLE", "1")
    fn = {"heed": run_heed, "trl": run_trl, "check": first_batch_losses}[kind]
    print("RESULT " + json.dumps(fn(a)), flush=True)


def spawn(kind: str, a: dict[str, Any]) -> dict[str, Any]:
    return _vs_trl.spawn(__file__, kind, a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "micro"], default="tiny", help="Built-in SFT model to use.")
    p.add_argument(
        "--workload",
        choices=_vs_trl.CHOICES,
        default=None,
        help="tiny / micro: the built-in SFT model (as --size) on the built-in pairs; qwen2-*: a random-weight "
        "Qwen2 model on synthetic pairs filling --max-length (lengths uniform in 50-97%%).",
    )
    p.add_argument("--pairs", type=int, default=1024, help="Training pairs (steps = pairs / batch size).")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument(
        "--repeats", type=int, default=2, help="Runs of each side, alternating; medians are compared."
    )
    p.add_argument("--no-check", action="store_true", help="Skip the first-batch loss comparison.")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-args", help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.worker:
        worker(ns.worker, json.loads(ns.worker_args))
        return
    workload = ns.workload or ns.size

    from heed.models.loading import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="heed-dpo-bench-") as tmp:
        if workload in _vs_trl.BUILTIN:
            from heed.demo.assets import MICRO, BuiltinSpec, builtin_sft_model

            sft = builtin_sft_model(MICRO if workload == "micro" else BuiltinSpec())
            model, ref = sft, sft.parent.parent / "base" / "final"  # a reference unlike the policy
            data = make_data(Path(tmp), ns.pairs, 0)
        else:
            model, ref = _vs_trl.workload_models(workload)
            data = Path(tmp) / "pairs.jsonl"
            rows = _vs_trl.synthetic_pairs(load_tokenizer(model), ns.pairs, ns.max_length)
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        a = {
            "model": str(model),
            "ref": str(ref),
            "data": str(data),
            "work": tmp,
            "batch_size": ns.batch_size,
            "max_length": ns.max_length,
            "beta": ns.beta,
            "lr": ns.lr,
            "steps": ns.pairs // ns.batch_size,
        }
        # FLOPs of the trained pairs: both sequences of each, policy 3x forward (reference precomputed)
        tok, config = load_tokenizer(model), _vs_trl.load_config(model)
        records = [json.loads(line) for line in Path(a["data"]).read_text().splitlines()][
            : a["steps"] * ns.batch_size
        ]
        tokens = [
            [
                _vs_trl.rendered_length(tok, r["prompt"] + r[side], ns.max_length)
                for side in ("chosen", "rejected")
            ]
            for r in records
        ]
        flops = 3 * sum(_vs_trl.sequence_flops(config, n) for pair in tokens for n in pair)
        check = None if ns.no_check else spawn("check", a)
        runs = _vs_trl.alternate(lambda kind: spawn(kind, a), ns.repeats)
        peak = _vs_trl.measured_peak()

    n_pairs = len(records)
    print(
        f"DPO  workload: {workload} ({model})  pairs: {n_pairs}  batch: {ns.batch_size}  max_length: "
        f"{ns.max_length}  steps: {a['steps']}  real tokens/pair: {sum(map(sum, tokens)) / n_pairs:.0f}  beta: {ns.beta}"
    )
    _vs_trl.report(
        "training loop (reference log-probs precomputed on both sides, outside the timed loop)",
        runs,
        [("pairs/s", n_pairs), ("examples/s", 2 * n_pairs), ("tokens/s", sum(map(sum, tokens)))],
        {"heed": flops, "trl": flops},
        peak,
    )
    if check is not None:
        diff = abs(check["heed_first_loss"] - check["trl_first_loss"])
        print(
            f"first batch loss (sigmoid, ref differs from policy): Heed {check['heed_first_loss']:.6f}  "
            f"TRL {check['trl_first_loss']:.6f}  |diff| {diff:.2e}  {'OK' if diff < 1e-4 else 'MISMATCH'} (tol 1e-4)"
        )
        print(f"tokenization: {check['same_ids']}/{check['batch']} pairs get identical ids from Heed and TRL")


if __name__ == "__main__":
    main()

"""Heed KTO against TRL's ``KTOTrainer`` on identical data, model, batch and max length.

    PYTHONPATH=src .venv/bin/python benchmarks/kto_vs_trl.py                 # built-in tiny SFT model
    PYTHONPATH=src .venv/bin/python benchmarks/kto_vs_trl.py --size micro --examples 256
    PYTHONPATH=src .venv/bin/python benchmarks/kto_vs_trl.py --workload qwen2-100m --max-length 1024 \
        --examples 8 --batch-size 4 --no-check

``--workload qwen2-*``: a random-weight Qwen2 model (benchmarks/_common.py) on synthetic examples whose
prompt + completion fill 50-97% of ``--max-length``, labels at random; a second random model is the
reference of the loss check. Throughput also in tokens/s, and the training FLOP/s as a fraction of
the measured fp32 matmul peak (FLOPs as in _vs_trl.py; each example 3x forward, its KL row 1x).

Data: the built-in world's simulated thumbs (``builtin:thumbs``, :mod:`heed.demo.thumbs`: the SFT
model's own answers, thumbs up mostly for positive, concise ones), conversational
``{"prompt": [user], "completion": [assistant], "label"}`` records, TRL's unpaired format.

Prints, in one run:

- training throughput (examples/s, the training loop only: tokenization and reference precompute
  excluded on both sides) and its ratio Heed / TRL;
- peak memory of each side (CUDA: peak allocated; CPU: peak RSS of the whole process, imports
  included) and the ratio Heed / TRL;
- the loss of the first batch from both (Heed: its own tokenization, KL rows and trainer functions),
  on the same batch (the file's first ``--batch-size``
  examples, TRL's sequential order) with the same KL pairing (each prompt with the previous
  example's answer, the first with the last), with a reference model that differs from the policy
  (the built-in base model), so neither the rewards nor the KL estimate are 0. They must agree to
  1e-4. Also whether Heed builds exactly TRL's token ids for the examples and for their KL rows.

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


def make_data(folder: Path, n: int, size: str) -> Path:
    from heed.data.io import write_jsonl
    from heed.demo.assets import MICRO, BuiltinSpec
    from heed.demo.thumbs import builtin_thumbs

    source = builtin_thumbs(model=MICRO if size == "micro" else BuiltinSpec())["thumbs"]
    rows = [json.loads(line) for line in source.read_text().splitlines()][:n]
    # conversational (TRL's format too), so both sides render the chat template the SFT model was trained on
    path = folder / "thumbs.jsonl"
    write_jsonl(
        path,
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
                "label": r["label"],
            }
            for r in rows
        ],
    )
    return path


# ------------------------------------------------------------------------------------------------
def run_heed(a: dict[str, Any]) -> dict[str, Any]:
    from heed.config import config_from_dict
    from heed.config.kto import KTOConfig
    from heed.train.common import peak_memory_mb
    from heed.train.kto import train_kto

    cfg = config_from_dict(
        KTOConfig,
        {
            "model": {"path": a["model"]},
            "data": {"train": a["data"], "eval_split": 0.0, "max_length": a["max_length"], "chat": "true"},
            "loss": {"beta": a["beta"], "desirable_weight": a["desirable_weight"]},
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
    s = train_kto(cfg)
    return {
        "examples_per_s": s["examples_per_s"],
        "train_seconds": s["train_seconds"],
        "ref_seconds": s["ref_seconds"],
        "peak_mb": peak_memory_mb(),
        "seconds": s["train_seconds"],
    }


class _Clock:
    """Times ``train()`` from its first to its last step (filled by a TrainerCallback)."""

    def __init__(self) -> None:
        self.begin = self.end = 0.0


def trl_args(a: dict[str, Any], out: str, **over: Any) -> Any:
    import torch
    from trl import KTOConfig

    args = {
        "output_dir": out,
        "per_device_train_batch_size": a["batch_size"],
        "learning_rate": a["lr"],
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "beta": a["beta"],
        "desirable_weight": a["desirable_weight"],
        "undesirable_weight": 1.0,
        "max_length": a["max_length"],
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "logging_steps": 10,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "use_cpu": not torch.cuda.is_available(),
        **over,
    }
    return KTOConfig(**args)


def run_trl(a: dict[str, Any]) -> dict[str, Any]:
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import KTOTrainer

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
    args = trl_args(a, str(Path(a["work"]) / "trl-run"), max_steps=a["steps"], precompute_ref_log_probs=True)
    t0 = time.perf_counter()
    trainer = KTOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()])
    setup = time.perf_counter() - t0
    trainer.train()
    seconds = clock.end - clock.begin
    return {
        "examples_per_s": a["steps"] * a["batch_size"] / seconds,
        "train_seconds": seconds,
        "ref_seconds": setup,
        "peak_mb": peak_memory_mb(),
        "seconds": seconds,
    }


def first_batch_losses(a: dict[str, Any]) -> dict[str, Any]:
    """The first batch of TRL's (sequential) dataset through both implementations, same ids, same models."""
    import torch
    from datasets import load_dataset
    from trl import KTOTrainer

    from heed.config.kto import KTOLossConfig
    from heed.data.records import load_records
    from heed.data.unpaired import UnpairedCounts, encode_unpaired, kl_partners, unpair
    from heed.models.loading import load_causal_lm, load_tokenizer
    from heed.train.kto import kto_terms, row_logps

    tok = load_tokenizer(a["model"])
    policy, ref = load_causal_lm(a["model"]), load_causal_lm(a["ref"])
    b = a["batch_size"]
    ds = load_dataset("json", data_files=a["data"], split=f"train[:{b}]")
    args = trl_args(a, str(Path(a["work"]) / "trl-check"), precompute_ref_log_probs=False)
    trainer = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(b)]
    inputs = trainer.data_collator(rows)
    device = trainer.accelerator.device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    policy.eval()
    # Heed's own tokenization and KL pairing of the same batch (the file's first b examples, one batch)
    examples, _ = unpair(load_records(a["data"], "unpaired")[:b])
    mine = encode_unpaired(tok, examples, True, a["max_length"], UnpairedCounts())
    partners = kl_partners([list(range(b))], b)
    idx = list(range(b))
    kl_rows = [mine.row(i, partners[i]) for i in idx]
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, inputs).item()
        # Heed's trainer functions on Heed's rows: the batch's reference point, then the loss
        ref_model = ref.to(device)
        kl = (
            row_logps(trainer.model, kl_rows, tok.pad_token_id, device)
            - row_logps(ref_model, kl_rows, tok.pad_token_id, device)
        ).mean()
        labels = torch.tensor(mine.labels, device=device)
        losses, _ = kto_terms(
            KTOLossConfig(beta=a["beta"], desirable_weight=a["desirable_weight"]),
            row_logps(trainer.model, mine.rows(idx), tok.pad_token_id, device),
            row_logps(ref_model, mine.rows(idx), tok.pad_token_id, device),
            labels,
            kl,
        )
        heed_loss = losses.mean().item()
    same = same_kl = 0
    for i, r in enumerate(rows):
        same += mine.row(i, i)[0] == (r["prompt_ids"] + r["completion_ids"])[: a["max_length"]]
        same_kl += kl_rows[i][0] == (r["prompt_ids"] + r["KL_completion_ids"])[: a["max_length"]]
    return {
        "trl_first_loss": trl_loss,
        "heed_first_loss": heed_loss,
        "kl": kl.item(),
        "same_ids": same,
        "same_kl_ids": same_kl,
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
        help="tiny / micro: the built-in SFT model (as --size) on the built-in thumbs; qwen2-*: a random-weight "
        "Qwen2 model on synthetic examples filling --max-length (lengths uniform in 50-97%%).",
    )
    p.add_argument("--examples", type=int, default=1024, help="Training examples (steps = examples / batch).")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--desirable-weight", type=float, default=2.5)
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

    with tempfile.TemporaryDirectory(prefix="heed-kto-bench-") as tmp:
        if workload in _vs_trl.BUILTIN:
            from heed.demo.assets import MICRO, BuiltinSpec, builtin_sft_model

            model = builtin_sft_model(MICRO if workload == "micro" else BuiltinSpec())
            ref = (
                model.parent.parent / "base" / "final"
            )  # the built-in base model: a reference unlike the policy
            data = make_data(Path(tmp), ns.examples, workload)
        else:
            import random

            model, ref = _vs_trl.workload_models(workload)
            rows = _vs_trl.synthetic_completions(load_tokenizer(model), ns.examples, ns.max_length)
            rng = random.Random(0)
            data = Path(tmp) / "thumbs.jsonl"
            data.write_text("".join(json.dumps({**r, "label": rng.random() < 0.5}) + "\n" for r in rows))
        a = {
            "model": str(model),
            "ref": str(ref),
            "data": str(data),
            "work": tmp,
            "batch_size": ns.batch_size,
            "max_length": ns.max_length,
            "beta": ns.beta,
            "desirable_weight": ns.desirable_weight,
            "lr": ns.lr,
            "steps": ns.examples // ns.batch_size,
        }
        # FLOPs: each example 3x forward (trained), its KL row (its prompt with the batch's previous
        # answer) 1x forward (no gradient); reference log-probs precomputed outside the loop
        tok, config = load_tokenizer(model), _vs_trl.load_config(model)
        records = [json.loads(line) for line in data.read_text().splitlines()][: a["steps"] * ns.batch_size]
        tokens = [_vs_trl.rendered_length(tok, r["prompt"] + r["completion"], ns.max_length) for r in records]
        kl_tokens = [
            _vs_trl.rendered_length(
                tok,
                r["prompt"] + records[i - 1 if i % ns.batch_size else i + ns.batch_size - 1]["completion"],
                ns.max_length,
            )
            for i, r in enumerate(records)
        ]
        flops = 3 * sum(_vs_trl.sequence_flops(config, n) for n in tokens) + sum(
            _vs_trl.sequence_flops(config, n) for n in kl_tokens
        )
        check = None if ns.no_check else spawn("check", a)
        runs = _vs_trl.alternate(lambda kind: spawn(kind, a), ns.repeats)
        peak = _vs_trl.measured_peak()

    n = len(records)
    print(
        f"KTO  workload: {workload} ({model})  examples: {n}  batch: {ns.batch_size}  max_length: {ns.max_length}  "
        f"steps: {a['steps']}  real tokens/example: {sum(tokens) / n:.0f}  beta: {ns.beta}  λ_D: {ns.desirable_weight}"
    )
    _vs_trl.report(
        "training loop (reference log-probs precomputed on both sides, outside the timed loop)",
        runs,
        [("examples/s", n), ("tokens/s", sum(tokens))],
        {"heed": flops, "trl": flops},
        peak,
    )
    if check is not None:
        diff = abs(check["heed_first_loss"] - check["trl_first_loss"])
        print(
            f"first batch loss (ref differs from policy, batch KL {check['kl']:.4f}): Heed {check['heed_first_loss']:.6f}  "
            f"TRL {check['trl_first_loss']:.6f}  |diff| {diff:.2e}  {'OK' if diff < 1e-4 else 'MISMATCH'} (tol 1e-4)"
        )
        print(
            f"tokenization: {check['same_ids']}/{check['batch']} examples and {check['same_kl_ids']}/{check['batch']} "
            "KL rows get identical ids from Heed and TRL"
        )


if __name__ == "__main__":
    main()

"""DPO on the built-in world: does tuning on "prefer the more positive answer" make answers positive?

    PYTHONPATH=src .venv/bin/python benchmarks/dpo_builtin.py            # built-in tiny SFT model
    PYTHONPATH=src .venv/bin/python benchmarks/dpo_builtin.py --size micro

Preferences come from the built-in world's hidden utility (positivity − 0.15·(sentences − 1),
``heed.demo.preferences.make_pairs``); DPO starts from the built-in SFT model. Printed:

- held-out reward accuracy and margin (pairs on held-out prompt templates/topics);
- positive rate of sampled answers (share with gold ``tone_of > 0``) on the held-out prompts
  (``make_prompts(200, heldout=True)``, the corpus's ``prompts_eval``), SFT model vs DPO model,
  same prompts, same seed, temperature 0.8 (``--temperature``);
- KL(DPO ‖ SFT): mean over sampled answers of Σ_t (log π − log π_ref) (``kl/k1``), and k3;
- wall time of the run (data, reference precompute, training, evaluation, sampling).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "micro"], default="tiny")
    p.add_argument("--pairs", type=int, default=1024, help="Training pairs.")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--sft-coef", type=float, default=0.3, help="RPO's NLL weight on the chosen answer.")
    p.add_argument("--temperature", type=float, default=0.8, help="Sampling temperature of the answers.")
    p.add_argument("--prompts", type=int, default=200, help="Held-out prompts answered by both models.")
    p.add_argument("--out", default=None, help="Run folder (default: a temporary one).")
    ns = p.parse_args()

    from heed.config import config_from_dict
    from heed.config.dpo import DPOConfig
    from heed.data.io import write_jsonl
    from heed.demo.assets import MICRO, BuiltinSpec, builtin_sft_model
    from heed.demo.corpus import make_prompts, tone_of
    from heed.demo.preferences import make_pairs
    from heed.train.dpo import train_dpo

    sft = builtin_sft_model(MICRO if ns.size == "micro" else BuiltinSpec())
    tmp = tempfile.TemporaryDirectory(prefix="heed-dpo-builtin-")
    root = Path(tmp.name)
    load0 = os.getloadavg()
    t0 = time.time()
    write_jsonl(root / "train.jsonl", make_pairs(ns.pairs, seed=0))
    write_jsonl(root / "eval.jsonl", make_pairs(200, seed=1, heldout=True))
    write_jsonl(root / "prompts.jsonl", make_prompts(ns.prompts, seed=0, heldout=True))
    run = Path(ns.out) if ns.out else root / "run"
    cfg = config_from_dict(
        DPOConfig,
        {
            "model": {"path": str(sft)},
            "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_length": 128},
            "loss": {"type": "sigmoid", "beta": ns.beta, "sft_coef": ns.sft_coef},
            "train": {"batch_size": ns.batch_size, "max_steps": ns.steps, "eval_batch_size": 100},
            "optim": {"lr": ns.lr, "warmup_steps": 4},
            "log": {"log_every": 4, "eval_every": 16, "progress": False},
            "sample": {
                "prompts": str(root / "prompts.jsonl"),
                "num_prompts": ns.prompts,
                "temperature": ns.temperature,
                "max_new_tokens": 64,
            },
            "out": str(run),
            "overwrite": True,
        },
    )
    summary = train_dpo(cfg)
    seconds = time.time() - t0
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    rate = {}
    for policy in ("sft", "dpo"):
        tones = [tone_of(s["completion"]) for s in samples if s["policy"] == policy]
        rate[policy] = sum(t > 0 for t in tones) / len(tones)
        rate[policy + "_tone"] = sum(tones) / len(tones)
    print(
        f"model: built-in {ns.size} SFT   pairs: {summary['train_pairs']}   steps: {ns.steps} x {ns.batch_size}   "
        f"beta: {ns.beta}   lr: {ns.lr}   sft_coef: {ns.sft_coef}   temperature: {ns.temperature}"
    )
    print(
        f"held-out reward accuracy: {summary['eval/reward_accuracy']:.3f}   margin: {summary['eval/margin']:.3f}   "
        f"eval loss: {summary['eval/loss']:.3f}"
    )
    print(
        f"positive rate on {ns.prompts} held-out prompts: SFT {rate['sft']:.3f} -> DPO {rate['dpo']:.3f}   "
        f"(mean gold tone {rate['sft_tone']:+.3f} -> {rate['dpo_tone']:+.3f})"
    )
    print(
        f"KL(DPO || SFT) per answer: k1 {summary['kl/k1']:.3f}  k3 {summary['kl/k3']:.3f} nats   "
        f"answer length {summary['length/mean']:.1f} tokens"
    )
    cpu = os.times()
    print(
        f"CPU time of this process: {cpu.user + cpu.system:.0f} s   wall time: {seconds:.0f} s (training loop {summary['train_seconds']:.0f} s, "
        f"{summary['pairs_per_s']:.1f} pairs/s)   load average {load0[0]:.1f} -> {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores"
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()

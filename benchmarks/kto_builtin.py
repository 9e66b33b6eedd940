"""KTO on the built-in world: do thumbs up / down on the SFT model's own answers make answers positive?

    PYTHONPATH=src .venv/bin/python benchmarks/kto_builtin.py            # built-in tiny SFT model
    PYTHONPATH=src .venv/bin/python benchmarks/kto_builtin.py --size micro

Feedback is ``builtin:thumbs`` (:mod:`heed.demo.thumbs`): the built-in SFT model's answers to 1024
training prompts (2 each, temperature 1), thumbs up with probability σ((u − 0.25) / 0.2) where u is
the world's hidden utility (positivity − 0.15·(sentences − 1)); held-out feedback on 128 held-out
prompts (``builtin:thumbs_eval``). KTO starts from the built-in SFT model. Printed:

- held-out implicit rewards of thumbs-up vs thumbs-down answers, their margin and AUC, eval loss, KL estimate;
- positive rate of sampled answers (share with gold ``tone_of > 0``) on the held-out prompts
  (``make_prompts(200, heldout=True)``), SFT model vs KTO model, same prompts, same seed,
  temperature 0.8 (``--temperature``);
- KL(KTO ‖ SFT): mean over sampled answers of Σ_t (log π − log π_ref) (``kl/k1``), and k3;
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
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument(
        "--desirable-weight", type=float, default=2.5, help="λ_D (about 30%% of the thumbs are up)."
    )
    p.add_argument("--temperature", type=float, default=0.8, help="Sampling temperature of the answers.")
    p.add_argument("--prompts", type=int, default=200, help="Held-out prompts answered by both models.")
    p.add_argument("--out", default=None, help="Run folder (default: a temporary one).")
    ns = p.parse_args()

    from heed.config import config_from_dict
    from heed.config.kto import KTOConfig
    from heed.data.io import write_jsonl
    from heed.demo.assets import MICRO, BuiltinSpec, builtin_sft_model
    from heed.demo.corpus import make_prompts, tone_of
    from heed.demo.thumbs import builtin_thumbs
    from heed.train.kto import train_kto

    spec = MICRO if ns.size == "micro" else BuiltinSpec()
    sft = builtin_sft_model(spec)
    tmp = tempfile.TemporaryDirectory(prefix="heed-kto-builtin-")
    root = Path(tmp.name)
    load0 = os.getloadavg()
    t0 = time.time()
    thumbs = builtin_thumbs(model=spec)
    write_jsonl(root / "prompts.jsonl", make_prompts(ns.prompts, seed=0, heldout=True))
    run = Path(ns.out) if ns.out else root / "run"
    cfg = config_from_dict(
        KTOConfig,
        {
            "model": {"path": str(sft)},
            "data": {"train": str(thumbs["thumbs"]), "eval": str(thumbs["thumbs_eval"]), "max_length": 128},
            "loss": {"beta": ns.beta, "desirable_weight": ns.desirable_weight},
            "train": {"batch_size": ns.batch_size, "max_steps": ns.steps, "eval_batch_size": 100},
            "optim": {"lr": ns.lr, "warmup_steps": 4},
            "log": {"log_every": 4, "eval_every": 20, "progress": False},
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
    summary = train_kto(cfg)
    seconds = time.time() - t0
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    rate = {}
    for policy in ("sft", "kto"):
        tones = [tone_of(s["completion"]) for s in samples if s["policy"] == policy]
        rate[policy] = sum(t > 0 for t in tones) / len(tones)
        rate[policy + "_tone"] = sum(tones) / len(tones)
    print(
        f"model: built-in {ns.size} SFT   thumbs: {summary['data/train/desirable']} up / "
        f"{summary['data/train/undesirable']} down   steps: {ns.steps} x {ns.batch_size}   beta: {ns.beta}   "
        f"lr: {ns.lr}   λ_D: {ns.desirable_weight}   temperature: {ns.temperature}"
    )
    print(
        f"held-out implicit reward: up {summary['eval/reward_desirable']:.3f}  down "
        f"{summary['eval/reward_undesirable']:.3f}  margin {summary['eval/margin']:.3f}  AUC "
        f"{summary['eval/reward_auc']:.3f}   eval loss {summary['eval/loss']:.3f}   batch KL estimate "
        f"{summary['eval/kl']:.3f}"
    )
    print(
        f"positive rate on {ns.prompts} held-out prompts: SFT {rate['sft']:.3f} -> KTO {rate['kto']:.3f}   "
        f"(mean gold tone {rate['sft_tone']:+.3f} -> {rate['kto_tone']:+.3f})"
    )
    print(
        f"KL(KTO || SFT) per answer: k1 {summary['kl/k1']:.3f}  k3 {summary['kl/k3']:.3f} nats   "
        f"answer length {summary['length/mean']:.1f} tokens"
    )
    cpu = os.times()
    print(
        f"CPU time of this process: {cpu.user + cpu.system:.0f} s   wall time: {seconds:.0f} s (training loop "
        f"{summary['train_seconds']:.0f} s, {summary['examples_per_s']:.1f} examples/s)   load average "
        f"{load0[0]:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    tmp.cleanup()


if __name__ == "__main__":
    main()

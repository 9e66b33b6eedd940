"""Online DPO, iterative DPO and rejection sampling against offline DPO on the built-in world.

    PYTHONPATH=src .venv/bin/python benchmarks/online_builtin.py              # built-in tiny SFT model
    PYTHONPATH=src .venv/bin/python benchmarks/online_builtin.py --size micro # seconds, for a smoke run
    PYTHONPATH=src .venv/bin/python benchmarks/online_builtin.py --only online,rs

Every method starts from the built-in SFT model. The judge of the online methods is the built-in
tone classifier (``builtin:tone_classifier``, P(POSITIVE) − P(NEGATIVE) of the answer; ``--judge
reward_model``: the built-in reward model trained with ``heed rm train`` on ``builtin:rankings``);
offline DPO learns from the world's labelled pairs
(``heed.demo.preferences.make_pairs``, as ``benchmarks/dpo_builtin.py``). Nobody trains on the gold.

Every final policy is evaluated the same way: the SFT model and the policy answer the same 200
held-out prompts (``make_prompts(200, heldout=True)``) with the same seed at temperature 0.8
(:func:`heed.train.reference.sample_and_kl`); printed per method: gold positivity (share of answers
with ``tone_of > 0``, and the mean tone in [−1, 1]), KL(policy ‖ SFT) per answer (k1), the judge's
mean reward, answer length, and the method's wall time (data, sampling, labelling, training).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def evaluate(
    model_dir: Path, sft: Path, prompts: list[str], judge: Any, temperature: float
) -> dict[str, float]:
    import torch

    from heed.data.templating import use_chat
    from heed.demo.corpus import tone_of
    from heed.models.loading import load_causal_lm, load_tokenizer
    from heed.train.reference import SampleSpec, sample_and_kl

    tok = load_tokenizer(model_dir, padding_side="left")
    policy, ref = load_causal_lm(model_dir).eval(), load_causal_lm(sft).eval()
    with torch.no_grad():
        spec = SampleSpec(1, temperature, 64, 0, 100)
        res = sample_and_kl(policy, ref, tok, prompts, use_chat(tok, "auto"), spec, "sft", "policy")
    out = {}
    for name in ("sft", "policy"):
        tones = [tone_of(t) for t in res.texts[name]]
        scores = judge(prompts, res.texts[name]).total
        out[f"{name}/positive_rate"] = sum(t > 0 for t in tones) / len(tones)
        out[f"{name}/tone"] = sum(tones) / len(tones)
        out[f"{name}/judge"] = sum(scores) / len(scores)
    return {**out, "kl": res.metrics["kl/k1"], "length": res.metrics["length/mean"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "micro"], default="tiny")
    p.add_argument("--only", default="offline,online,iterative,rs", help="Methods to run, comma-separated.")
    p.add_argument("--pairs", type=int, default=1280, help="Pair budget of offline / online / iterative DPO.")
    p.add_argument("--batch-size", type=int, default=32, help="Pairs per DPO step.")
    p.add_argument("--lr", type=float, default=3e-4, help="Learning rate of offline DPO and the SFT of rs.")
    p.add_argument("--online-lr", type=float, default=1e-4, help="Learning rate of online / iterative DPO.")
    p.add_argument(
        "--judge",
        choices=["tone_classifier", "reward_model"],
        default="tone_classifier",
        help="Judge of the online methods: the built-in tone classifier (P(POSITIVE) - P(NEGATIVE)) or "
        "the built-in reward model (which online DPO at lr 3e-4 hacks: short, toneless answers).",
    )
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument(
        "--num-samples",
        type=int,
        default=2,
        help="Answers per prompt of online / iterative DPO; the best- and worst-scored form the pair.",
    )
    p.add_argument("--rounds", type=int, default=2, help="Rounds of iterative DPO and rejection sampling.")
    p.add_argument("--rs-n", type=int, default=8, help="Answers per prompt in rejection sampling.")
    p.add_argument("--rs-prompts", type=int, default=256, help="Prompts per rejection-sampling round.")
    p.add_argument("--temperature", type=float, default=0.8, help="Temperature of the evaluation answers.")
    p.add_argument("--prompts", type=int, default=200, help="Held-out prompts answered by every model.")
    p.add_argument("--out", default=None, help="Folder for the runs (default: a temporary one).")
    ns = p.parse_args()

    from heed.config import config_from_dict
    from heed.config.dpo import DPOConfig
    from heed.config.online import OnlineDPOConfig
    from heed.config.rl import RewardSpec
    from heed.config.rs import RSConfig
    from heed.data.io import write_jsonl
    from heed.demo.builtin import resolve_name
    from heed.demo.corpus import make_prompts
    from heed.demo.preferences import make_pairs
    from heed.rewards.combine import build_rewards
    from heed.train.dpo import train_dpo
    from heed.train.online_dpo import train_online_dpo
    from heed.train.rs import train_rs

    size = "builtin" if ns.size == "tiny" else "builtin:micro"
    sft = Path(resolve_name(size))
    judge_path = resolve_name(f"{size}:{ns.judge}")
    prompts_train = resolve_name(f"{size}:prompts_train")
    tmp = tempfile.TemporaryDirectory(prefix="heed-online-builtin-")
    root = Path(ns.out or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    eval_prompts = [r["prompt"] for r in make_prompts(ns.prompts, seed=0, heldout=True)]
    judge_specs = [
        {"name": "judge", "model": judge_path}
        if ns.judge == "reward_model"
        else {"name": "judge", "pipeline": judge_path, "labels": {"POSITIVE": 1.0, "NEGATIVE": -1.0}}
    ]
    judge = build_rewards([RewardSpec(**judge_specs[0])])
    common = {"log": {"progress": False}, "overwrite": True}
    steps = ns.pairs // ns.batch_size

    def offline() -> Path:
        write_jsonl(root / "pairs.jsonl", make_pairs(ns.pairs, seed=0))
        cfg = config_from_dict(
            DPOConfig,
            {
                "model": {"path": str(sft)},
                "data": {"train": str(root / "pairs.jsonl"), "eval_split": 0.05, "max_length": 128},
                "loss": {"beta": ns.beta, "sft_coef": 0.3},
                "train": {"batch_size": ns.batch_size, "max_steps": steps},
                "optim": {"lr": ns.lr, "warmup_steps": 4},
                "sample": {"num_prompts": 0},
                "out": str(root / "offline"),
                **common,
            },
        )
        train_dpo(cfg)
        return root / "offline" / "final"

    def online(rounds: int) -> Path:
        name = "iterative" if rounds else "online"
        cfg = config_from_dict(
            OnlineDPOConfig,
            {
                "model": {"path": str(sft)},
                "data": {"prompts": prompts_train},
                "rewards": judge_specs,
                "loss": {"beta": ns.beta, "sft_coef": 0.3},
                "rollout": {"max_new_tokens": 64, "temperature": 1.0, "num_samples": ns.num_samples},
                "train": {"updates": steps, "prompts_per_step": ns.batch_size},
                "iterative": {
                    "rounds": rounds,
                    "prompts_per_round": ns.pairs // max(rounds, 1),
                    "batch_size": ns.batch_size,
                },
                "optim": {"lr": ns.online_lr, "warmup_steps": 4},
                "eval": {"num_prompts": 0},
                "out": str(root / name),
                **common,
            },
        )
        train_online_dpo(cfg)
        return root / name / "final"

    def rs() -> Path:
        cfg = config_from_dict(
            RSConfig,
            {
                "model": {"path": str(sft)},
                "data": {"prompts": prompts_train},
                "rewards": judge_specs,
                "rollout": {"num_samples": ns.rs_n, "max_new_tokens": 64, "temperature": 1.0},
                "train": {
                    "rounds": ns.rounds,
                    "prompts_per_round": ns.rs_prompts,
                    "batch_size": ns.batch_size,
                    "epochs": 2,
                },
                "optim": {"lr": ns.lr, "warmup_steps": 4},
                "eval": {"num_prompts": 0},
                "out": str(root / "rs"),
                **common,
            },
        )
        train_rs(cfg)
        return root / "rs" / "final"

    methods = {
        "offline": ("offline DPO (labelled pairs)", offline),
        "online": (f"online DPO (judge: {ns.judge})", lambda: online(0)),
        "iterative": (f"iterative DPO, {ns.rounds} rounds", lambda: online(ns.rounds)),
        "rs": (f"rejection sampling, best of {ns.rs_n}, {ns.rounds} rounds", rs),
    }
    rows = []
    base: dict[str, float] | None = None
    for key in ns.only.split(","):
        label, run = methods[key]
        t0 = time.time()
        final = run()
        seconds = time.time() - t0
        ev = evaluate(final, sft, eval_prompts, judge, ns.temperature)
        base = base or ev
        rows.append({"method": label, "seconds": seconds, **ev})
        print(json.dumps(rows[-1]), flush=True)
    cpu = os.cpu_count()
    print(
        f"\nbuilt-in {ns.size} SFT model; {ns.prompts} held-out prompts, temperature {ns.temperature}, seed 0; "
        f"pair budget {ns.pairs} ({steps} steps x {ns.batch_size}), lr {ns.lr} (online: {ns.online_lr}), beta {ns.beta}, judge {ns.judge}; {cpu} CPU cores"
    )
    print(
        f"{'method':<44} {'positive rate':>13} {'mean tone':>9} {'KL k1':>7} {'judge':>7} {'length':>6} {'wall s':>7}"
    )
    if base is not None:
        print(
            f"{'SFT model (start)':<44} {base['sft/positive_rate']:>13.3f} {base['sft/tone']:>+9.3f} {0.0:>7.2f} "
            f"{base['sft/judge']:>7.3f} {'':>6} {'':>7}"
        )
    for r in rows:
        print(
            f"{r['method']:<44} {r['policy/positive_rate']:>13.3f} {r['policy/tone']:>+9.3f} {r['kl']:>7.2f} "
            f"{r['policy/judge']:>7.3f} {r['length']:>6.1f} {r['seconds']:>7.0f}"
        )
    tmp.cleanup()


if __name__ == "__main__":
    main()

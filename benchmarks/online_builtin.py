"""Online DPO, iterative DPO and rejection sampling against offline DPO on the built-in world.

    PYTHONPATH=src .venv/bin/python benchmarks/online_builtin.py              # built-in tiny SFT model
    PYTHONPATH=src .venv/bin/python benchmarks/online_builtin.py --size micro # seconds, for a smoke run
    PYTHONPATH=src .venv/bin/python benchmarks/online_builtin.py --only online,rs
    PYTHONPATH=src .venv/bin/python benchmarks/online_builtin.py --only offline,online \
        --pairs 640,1280 --num-samples 2,4 --report runs/online-frontier   # frontiers + report.html

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

``--pairs`` and ``--num-samples`` take lists: every DPO method runs at each pair budget (its strength:
more steps, more KL) and online / iterative DPO with each number of answers per prompt (best vs worst
paired), so each method gives a frontier of (KL, positive rate) points; the printout compares them at
equal KL (piecewise-linear in KL between a method's own points). ``--report DIR`` also writes each
run's evaluation into ``DIR/<run>/`` (``eval.json``: ``eval/kl``, ``gold/positive_rate``,
``gold/positivity``, ``eval/reward``), the best-of-N baseline of the SFT model on the same prompts
(``heed eval --best-of N``, :func:`heed.train.rl.evaluate_model`) into ``DIR/best-of-N/``, and
``DIR/report.html`` (``heed report DIR``) with its score-vs-KL plot.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any


def positive_rate(prompts: list[Any], completions: list[str], **columns: Any) -> list[float]:
    """Gold metric of the report: 1 when the answer's hidden tone is positive, else 0."""
    from heed.demo.corpus import tone_of

    return [float(tone_of(t) > 0) for t in completions]


def interpolate(points: list[tuple[float, float]], kl: float) -> float | None:
    """y at ``kl`` on the piecewise-linear curve through ``points`` (x = KL); None outside them."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in pairwise(pts):
        if x0 <= kl <= x1:
            return y0 + (kl - x0) / (x1 - x0) * (y1 - y0) if x1 > x0 else y0
    return pts[0][1] if len(pts) == 1 and abs(pts[0][0] - kl) < 1e-9 else None


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
    p.add_argument(
        "--pairs", default="1280", help="Pair budgets of offline / online / iterative DPO, comma-separated."
    )
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
        default="2",
        help="Answers per prompt of online / iterative DPO (best vs worst paired), comma-separated.",
    )
    p.add_argument("--rounds", type=int, default=2, help="Rounds of iterative DPO and rejection sampling.")
    p.add_argument("--rs-n", type=int, default=8, help="Answers per prompt in rejection sampling.")
    p.add_argument("--rs-prompts", type=int, default=256, help="Prompts per rejection-sampling round.")
    p.add_argument("--temperature", type=float, default=0.8, help="Temperature of the evaluation answers.")
    p.add_argument("--prompts", type=int, default=200, help="Held-out prompts answered by every model.")
    p.add_argument("--out", default=None, help="Folder for the runs (default: a temporary one).")
    p.add_argument(
        "--report", default=None, help="Folder of the score-vs-KL report (runs' evaluations, best-of-N)."
    )
    p.add_argument(
        "--best-of", default="1,2,4,8,16", help="N of the best-of-N frontier of --report ('' for none)."
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="Evaluate a run already in --out (its final/ folder) instead of training it again.",
    )
    ns = p.parse_args()

    from heed.config import config_from_dict
    from heed.config.dpo import DPOConfig
    from heed.config.online import OnlineDPOConfig
    from heed.config.rl import RewardSpec, RLConfig
    from heed.config.rs import RSConfig
    from heed.data.io import write_jsonl
    from heed.demo.builtin import FUNCTIONS, resolve_name
    from heed.demo.corpus import make_prompts
    from heed.demo.preferences import make_pairs
    from heed.rewards.combine import build_rewards
    from heed.train.common import write_json
    from heed.train.dpo import train_dpo
    from heed.train.online_dpo import train_online_dpo
    from heed.train.rl import evaluate_model
    from heed.train.rs import train_rs

    size = "builtin" if ns.size == "tiny" else "builtin:micro"
    sft = Path(resolve_name(size))
    judge_path = resolve_name(f"{size}:{ns.judge}")
    prompts_train = resolve_name(f"{size}:prompts_train")
    tmp = tempfile.TemporaryDirectory(prefix="heed-online-builtin-")
    root = Path(ns.out or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    eval_records = make_prompts(ns.prompts, seed=0, heldout=True)
    eval_prompts = [r["prompt"] for r in eval_records]
    judge_specs = [
        {"name": "judge", "model": judge_path}
        if ns.judge == "reward_model"
        else {"name": "judge", "pipeline": judge_path, "labels": {"POSITIVE": 1.0, "NEGATIVE": -1.0}}
    ]
    judge = build_rewards([RewardSpec(**judge_specs[0])])
    common = {"log": {"progress": False}, "overwrite": True}

    def offline(pairs: int, out: Path) -> None:
        write_jsonl(root / "pairs.jsonl", make_pairs(pairs, seed=0))
        cfg = config_from_dict(
            DPOConfig,
            {
                "model": {"path": str(sft)},
                "data": {"train": str(root / "pairs.jsonl"), "eval_split": 0.05, "max_length": 128},
                "loss": {"beta": ns.beta, "sft_coef": 0.3},
                "train": {"batch_size": ns.batch_size, "max_steps": pairs // ns.batch_size},
                "optim": {"lr": ns.lr, "warmup_steps": 4},
                "sample": {"num_prompts": 0},
                "out": str(out),
                **common,
            },
        )
        train_dpo(cfg)

    def online(rounds: int, pairs: int, k: int, out: Path) -> None:
        cfg = config_from_dict(
            OnlineDPOConfig,
            {
                "model": {"path": str(sft)},
                "data": {"prompts": prompts_train},
                "rewards": judge_specs,
                "loss": {"beta": ns.beta, "sft_coef": 0.3},
                "rollout": {"max_new_tokens": 64, "temperature": 1.0, "num_samples": k},
                "train": {"updates": pairs // ns.batch_size, "prompts_per_step": ns.batch_size},
                "iterative": {
                    "rounds": rounds,
                    "prompts_per_round": pairs // max(rounds, 1),
                    "batch_size": ns.batch_size,
                },
                "optim": {"lr": ns.online_lr, "warmup_steps": 4},
                "eval": {"num_prompts": 0},
                "out": str(out),
                **common,
            },
        )
        train_online_dpo(cfg)

    def rs(out: Path) -> None:
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
                "out": str(out),
                **common,
            },
        )
        train_rs(cfg)

    budgets = [int(x) for x in ns.pairs.split(",")]
    ks = [int(x) for x in ns.num_samples.split(",")]
    # (family, label, setting, algo, folder name, run): a family is one method whose settings form
    # its frontier
    plan: list[tuple[str, str, str, str, str, Any]] = []
    for key in ns.only.split(","):
        if key == "offline":
            for n in budgets:
                label = f"offline DPO, {n} pairs"
                plan.append(("offline DPO", label, f"{n} pairs", "dpo", f"offline-p{n}", partial(offline, n)))
        elif key in ("online", "iterative"):
            rounds = 0 if key == "online" else ns.rounds
            method = "online DPO" if key == "online" else f"iterative DPO, {ns.rounds} rounds"
            for k in ks:
                for n in budgets:
                    plan.append(
                        (
                            f"{method}, best/worst of {k}",
                            f"{method}, best/worst of {k}, {n} pairs",
                            f"{n} pairs",
                            "online_dpo" if key == "online" else "iterative_dpo",
                            f"{key}-k{k}-p{n}",
                            partial(online, rounds, n, k),
                        )
                    )
        elif key == "rs":
            label = f"rejection sampling, best of {ns.rs_n}, {ns.rounds} rounds"
            plan.append((label, label, f"{ns.rounds} x {ns.rs_prompts} prompts", "rs", f"rs-n{ns.rs_n}", rs))
        else:
            raise SystemExit(f"--only: unknown method {key!r} (offline, online, iterative, rs)")

    report = Path(ns.report) if ns.report else None
    rows = []
    base: dict[str, float] | None = None
    for family, label, setting, algo, name, run in plan:
        t0 = time.time()
        folder = root / name
        reused = ns.reuse and (folder / "final").is_dir()
        if not reused:
            run(folder)
        seconds = float("nan") if reused else time.time() - t0  # nan: trained by an earlier call
        ev = evaluate(folder / "final", sft, eval_prompts, judge, ns.temperature)
        base = base or ev
        rows.append({"family": family, "method": label, "setting": setting, "seconds": seconds, **ev})
        print(json.dumps(rows[-1]), flush=True)
        if report is not None:
            (report / folder.name).mkdir(parents=True, exist_ok=True)
            write_json(report / folder.name / "summary.json", {"algo": algo, "method": label})
            write_json(
                report / folder.name / "eval.json",
                {
                    "eval/kl": ev["kl"],
                    "gold/positive_rate": ev["policy/positive_rate"],
                    "gold/positivity": ev["policy/tone"],
                    "eval/reward": ev["policy/judge"],
                    "eval/length": ev["length"],
                    "eval/num_prompts": len(eval_prompts),
                },
            )

    if report is not None:
        # best-of-N of the SFT model on the same prompts, as heed eval --best-of N writes it
        write_jsonl(report / "prompts_eval.jsonl", eval_records)
        rl_cfg = config_from_dict(
            RLConfig,
            {
                "model": {"path": str(sft)},
                "data": {"prompts": prompts_train, "eval_prompts": str(report / "prompts_eval.jsonl")},
                "rewards": judge_specs,
                "rollout": {"max_new_tokens": 64},
                "eval": {
                    "num_prompts": len(eval_prompts),
                    "temperature": ns.temperature,
                    "gold": [
                        {"name": "positive_rate", "function": f"{Path(__file__).resolve()}:positive_rate"},
                        {"name": "positivity", "function": FUNCTIONS["gold_positivity"]},
                    ],
                },
                "out": str(report / "best-of"),
            },
        )
        for n in (int(x) for x in ns.best_of.split(",") if x):
            t0 = time.time()
            res = evaluate_model(rl_cfg, sft, report / f"best-of-{n}", best_of=n)
            print(
                f"best-of-{n}: KL {res['eval/kl']:.3f}, positive rate {res['gold/positive_rate']:.3f} "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
        from heed.report.render import write_report

        print(f"report: {write_report(report)}")

    cpu = os.cpu_count()
    print(
        f"\nbuilt-in {ns.size} SFT model; {ns.prompts} held-out prompts, temperature {ns.temperature}, seed 0; "
        f"pair budgets {ns.pairs} (steps of {ns.batch_size}), lr {ns.lr} (online: {ns.online_lr}), beta {ns.beta}, "
        f"judge {ns.judge}; {cpu} CPU cores"
    )
    print(
        f"{'method':<58} {'positive rate':>13} {'mean tone':>9} {'KL k1':>7} {'judge':>7} {'length':>6} {'wall s':>7}"
    )
    if base is not None:
        print(
            f"{'SFT model (start)':<58} {base['sft/positive_rate']:>13.3f} {base['sft/tone']:>+9.3f} {0.0:>7.2f} "
            f"{base['sft/judge']:>7.3f} {'':>6} {'':>7}"
        )
    for r in rows:
        print(
            f"{r['method']:<58} {r['policy/positive_rate']:>13.3f} {r['policy/tone']:>+9.3f} {r['kl']:>7.2f} "
            f"{r['policy/judge']:>7.3f} {r['length']:>6.1f} {r['seconds']:>7.0f}"
        )
    # at equal KL: each family's positive rate interpolated at the KL of every other family's points
    families: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        families.setdefault(r["family"], []).append((r["kl"], r["policy/positive_rate"]))
    if len(families) > 1:
        print("\nat equal KL (positive rate; '-' outside a family's measured KL range):")
        names = list(families)
        kls = sorted({round(kl, 3) for pts in families.values() for kl, _ in pts})
        print(f"{'KL':>7} " + " ".join(f"{n[:30]:>30}" for n in names))
        for kl in kls:
            cells = [interpolate(families[n], kl) for n in names]
            print(f"{kl:>7.3f} " + " ".join(f"{'-' if c is None else f'{c:.3f}':>30}" for c in cells))
    tmp.cleanup()


if __name__ == "__main__":
    main()

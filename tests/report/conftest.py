"""A synthetic demo folder with realistic keys, written the way trainers and the demo write them."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from heed.config import save_config
from heed.report.diversity import diversity_metrics
from heed.report.metrics import MetricsLogger
from heed.report.monitors import Monitor, MonitorConfig, append_alarms

EVIL = (
    '<script>window.__pwned = 1</script><img src="http://example.invalid/x.png" onerror="window.__pwned=2">'
)
PROMPTS = [
    "Write a review of the new cafe.",
    "How was the weather on your trip?",
    "Describe your morning commute.",
    "What do you think of the film?",
]


def _rl_run(run: Path, algo: str, steps: int, hack: bool, write_alarms: bool, seed: int) -> None:
    """An RL run: proxy reward climbs; with ``hack`` the gold metric peaks then falls while answers
    get longer and collapse onto one phrase (what the monitors must catch)."""
    rng = random.Random(seed)
    cfg = MonitorConfig(gold_key="gold/positivity", kl_budget=8.0)
    (run / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "monitor.yaml")
    (run / "config.yaml").write_text(
        f"algo: {algo}\nmodel: tiny\nmonitor:\n  gold_key: gold/positivity\n  kl_budget: 8.0\n",
        encoding="utf-8",
    )
    log = MetricsLogger(run)
    monitor = Monitor(cfg)
    alarms = []
    for step in range(0, steps + 1, 5):
        t = step / steps
        proxy = 0.1 + 0.9 * t + rng.gauss(0, 0.02)
        gold = 0.31 + (0.6 * t if not hack or t < 0.6 else 0.36 - 0.9 * (t - 0.6)) + rng.gauss(0, 0.01)
        if hack and t > 0.6:
            completions = ["great great great wonderful day"] * 12 + ["great great wonderful"] * 4
        else:
            completions = [
                f"answer {i} about the {rng.choice(['cafe', 'film', 'trip'])} it was ok" for i in range(16)
            ]
        metrics = {
            "reward/mean": proxy,
            "reward/std": 0.3 - 0.1 * t,
            "reward/sentiment_rm": proxy * 0.8,
            "reward/format": 0.2 * t,
            "gold/positivity": gold,
            "kl/k1": 10 * t**2 if hack else 3 * t,
            "kl/k3": 9 * t**2 if hack else 2.8 * t,
            "kl/beta": 0.05,
            "entropy": 2.5 * (1 - 0.85 * t) if hack else 2.5 * (1 - 0.3 * t),
            "length/mean": 12 + (20 * t if hack else 1 * math.sin(step)),
            "loss": 0.5 - 0.3 * t,
            "policy_loss": -0.02 * t,
            "value_loss": 0.4 * (1 - t) + 0.05,
            "clipfrac": 0.1 + 0.05 * rng.random(),
            "approx_kl/k1": 0.01 + 0.005 * rng.random(),
            "approx_kl/k3": 0.008 + 0.005 * rng.random(),
            "explained_variance": min(0.9, t * 1.5),
            "lr": 1e-5,
            **diversity_metrics(completions),
        }
        log.log(step, metrics)
        if step % 20 == 0:
            log.log(step, {"gold/positivity": gold, "reward/mean": proxy}, split="eval")
        alarms += monitor.update(step, metrics, completions, [proxy] * len(completions))
    log.close()
    if write_alarms:
        append_alarms(run, alarms)
    final = {
        "algo": algo,
        "reward/mean": 0.95 if hack else 0.8,
        "gold/positivity": 0.5 if hack else 0.82,
        "eval/success": 0.6 if hack else 0.9,
        "kl/k1": 10.0 if hack else 3.0,
        "diversity/distinct_2": 0.12 if hack else 0.55,
        "length/mean": 32 if hack else 12.5,
    }
    (run / "summary.json").write_text(json.dumps(final), encoding="utf-8")
    rows = []
    for step, policy in ((0, "sft"), (steps, algo)):
        for i, p in enumerate(PROMPTS):
            text = f"{policy} says: it was fine {i}" if step == 0 else f"{algo} says: it was wonderful {i}"
            if i == 0 and step == steps:
                text = EVIL
            rows.append(
                {"step": step, "prompt": p, "completion": text, "reward": 0.1 + i / 10, "policy": policy}
            )
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_demo_folder(root: Path) -> Path:
    """``root/runs/{sft,rm,ppo,grpo,dpo}`` + ``agreement.json`` + ``stages.json``, as the demo writes."""
    runs = root / "runs"
    sft = runs / "sft"
    log = MetricsLogger(sft)
    for step in range(0, 101, 10):
        log.log(step, {"loss": 3.0 * math.exp(-step / 40) + 0.8, "lr": 3e-4})
    (sft / "summary.json").write_text(
        json.dumps(
            {
                "algo": "sft",
                "loss": 0.9,
                "reward/mean": 0.1,
                "gold/positivity": 0.31,
                "eval/success": 0.2,
                "kl/k1": 0.0,
                "diversity/distinct_2": 0.6,
                "length/mean": 12.0,
            }
        ),
        encoding="utf-8",
    )
    rm = runs / "rm"
    log = MetricsLogger(rm)
    for step in range(0, 51, 10):
        log.log(step, {"loss": 0.69 - step / 200})
        log.log(step, {"rm/accuracy": 0.5 + step / 150, "rm/eval_loss": 0.69 - step / 250}, split="eval")
    (rm / "summary.json").write_text(
        json.dumps({"rm/accuracy": 0.83, "rm/eval_loss": 0.49}), encoding="utf-8"
    )
    _rl_run(runs / "ppo", "ppo", 200, hack=True, write_alarms=True, seed=1)
    _rl_run(runs / "grpo", "grpo", 200, hack=False, write_alarms=False, seed=2)
    dpo = runs / "dpo"
    log = MetricsLogger(dpo)
    for step in range(0, 61, 10):
        log.log(
            step, {"loss": 0.69 - step / 150, "reward/margin": step / 30, "rm/accuracy": 0.5 + step / 200}
        )
    (dpo / "summary.json").write_text(
        json.dumps({"algo": "dpo", "gold/positivity": 0.7, "eval/success": 0.8, "kl/k1": 1.5}),
        encoding="utf-8",
    )
    (root / "agreement.json").write_text(
        json.dumps(
            {
                "n_items": 40,
                "n_annotators": 3,
                "pairwise_agreement": 0.78,
                "kendall_tau_mean": 0.61,
                "per_annotator": [
                    {"annotator": "sim-1", "n": 40, "agreement_with_majority": 0.85},
                    {"annotator": "<b>sim-2</b>", "n": 40, "agreement_with_majority": 0.72},
                ],
            }
        ),
        encoding="utf-8",
    )
    (root / "stages.json").write_text(
        json.dumps(
            {
                "stages": [
                    {"name": "sft", "seconds": 42.0},
                    {"name": "rm", "seconds": 12.5},
                    {"name": "ppo", "seconds": 150.0},
                    {"name": "grpo", "seconds": 130.0},
                    {"name": "dpo", "seconds": 30.0},
                ]
            }
        ),
        encoding="utf-8",
    )
    return root


@pytest.fixture
def demo_folder(tmp_path: Path) -> Path:
    return make_demo_folder(tmp_path / "demo")


@pytest.fixture
def evil() -> str:
    """The hostile model answer planted in the demo folder's samples."""
    return EVIL

"""Classic-control PPO figures: return vs env steps, deterministic evaluation and env steps/s.

    PYTHONPATH=src python benchmarks/control.py                       # CartPole-v1 + Pendulum-v1, 3 seeds, 100k steps
    PYTHONPATH=src python benchmarks/control.py --env Pendulum-v1 --seeds 1 2 3 --steps 100000
    PYTHONPATH=src python benchmarks/control.py --bandit              # the bandit classifier instead

Each run uses the tuned preset in ``configs/control/ENV.yaml``. Printed per env: the mean
training-episode return (last 20 episodes) at every ~10% of the budget for each seed, the final
deterministic return (mean ± std over 10 episodes) per seed and over seeds, wall time and env
steps/s (rollout + updates, one torch thread). Anchors: Stable-Baselines3 zoo PPO reaches
CartPole-v1 500 ± 0 and Pendulum-v1 −172 ± 104 at 100k steps (the latter with gSDE).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from heed.config import load_config  # noqa: E402
from heed.control.config import BanditConfig, ControlConfig  # noqa: E402
from heed.report.metrics import read_metrics, series  # noqa: E402


def run_env(env_id: str, seeds: list[int], steps: int, out: Path) -> dict[str, float]:
    from heed.control.ppo import train

    preset = ROOT / "configs" / "control" / f"{env_id}.yaml"
    finals, walls, sps = [], [], []
    curves: dict[int, list[tuple[int, float]]] = {}
    for seed in seeds:
        overrides = [
            f"env_id={env_id}",
            f"seed={seed}",
            f"total_steps={steps}",
            f"out={out / f'{env_id}-{seed}'}",
        ]
        overrides.append("progress=false")
        cfg = load_config(ControlConfig, preset if preset.is_file() else None, overrides)
        t0 = time.time()
        summary = train(cfg)
        walls.append(time.time() - t0)
        finals.append(summary["eval_return_mean"])
        sps.append(summary["steps_per_s"])
        curves[seed] = list(series(read_metrics(cfg.out), "episode_return"))
        print(
            f"  seed {seed}: deterministic return {summary['eval_return_mean']:.1f} ± {summary['eval_return_std']:.1f}"
            f"  wall {walls[-1]:.1f}s  {summary['steps_per_s']:.0f} env steps/s",
            flush=True,
        )
    print(f"\n{env_id}: training-episode return (mean of the last 20 episodes) vs env steps")
    marks = [int(steps * k / 10) for k in range(1, 11)]
    print("  steps    " + "".join(f"seed {s:<6}" for s in seeds))
    for mark in marks:
        row = []
        for seed in seeds:
            past = [r for st, r in curves[seed] if st <= mark]
            row.append(f"{past[-1]:<11.1f}" if past else f"{'-':<11}")
        print(f"  {mark:<8} " + "".join(row))
    mean = statistics.mean(finals)
    spread = statistics.pstdev(finals) if len(finals) > 1 else 0.0
    print(
        f"{env_id}: deterministic return over {len(seeds)} seeds: {mean:.1f} ± {spread:.1f} "
        f"(per seed {', '.join(f'{f:.1f}' for f in finals)}); wall {statistics.mean(walls):.1f}s/seed; "
        f"{statistics.mean(sps):.0f} env steps/s\n",
        flush=True,
    )
    return {"mean": mean, "std": spread, "wall": statistics.mean(walls)}


def run_bandit(seeds: list[int], out: Path) -> None:
    from heed.control.bandit import train_bandit
    from heed.demo.classifier import bandit_tone_data

    gains = []
    for seed in seeds:
        cfg = load_config(
            BanditConfig, None, [f"seed={seed}", f"out={out / f'bandit-{seed}'}", "progress=false"]
        )
        s = train_bandit(cfg, bandit_tone_data(cfg.num_texts, cfg.eval_fraction, cfg.seed))
        curve = [(st, a) for st, a in series(read_metrics(cfg.out), "accuracy", split="eval")]
        gains.append(s["accuracy_gain"])
        print(f"  seed {seed}: held-out accuracy vs rounds: " + ", ".join(f"{st}:{a:.2f}" for st, a in curve))
        print(
            f"  seed {seed}: {s['start_accuracy']:.3f} -> {s['final_accuracy']:.3f} in {s['train_time_s']:.0f}s"
        )
    print(
        f"bandit classifier: accuracy gain {statistics.mean(gains) * 100:.1f} points (mean over {len(seeds)} seeds)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", nargs="+", default=["CartPole-v1", "Pendulum-v1"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--bandit", action="store_true", help="Benchmark the bandit classifier instead.")
    parser.add_argument("--out", type=Path, default=None, help="Keep the run folders here.")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"cpus {os.cpu_count()}, load average {load:.2f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        if args.bandit:
            run_bandit(args.seeds, out)
            return
        for env_id in args.env:
            print(f"{env_id}: {len(args.seeds)} seeds x {args.steps} env steps")
            run_env(env_id, args.seeds, args.steps, out)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.2f} at the end")


if __name__ == "__main__":
    main()

"""DAPO's dynamic sampling on the banana task: updates to 95% success with and without it.

Both arms train GRPO from the built-in tiny SFT model on ``configs/banana.yaml`` with the same seed;
the training reward is the binary task metric ``banana_success`` (DAPO's setting: an accuracy reward,
so a group whose K answers all fail, or all succeed, has no variance and no GRPO advantage). The only
difference is ``rollout.dynamic_sampling``: with it, such groups are dropped and new prompts sampled
(up to ``rollout.dynamic_sampling_rounds`` extra rounds) until the batch holds ``prompts_per_step``
informative groups. Success is ``eval/banana_success`` on the 100 held-out prompts every 5 updates.

    python benchmarks/rl_stabilizers.py                    # 60 updates per arm
    python benchmarks/rl_stabilizers.py --updates 20 --out runs/bench-stab

Prints one line per evaluation, then the updates to 95% of each arm (None if never reached), the
prompts each arm sampled and its wall time; writes ``results.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "banana.yaml"


def run_arm(name: str, dynamic: bool, args: argparse.Namespace) -> dict:
    from heed.config import load_config
    from heed.config.rl import RLConfig
    from heed.demo.builtin import resolve_config
    from heed.train.rl import train_rl

    out = Path(args.out) / name
    overrides = [
        "algorithm=grpo",
        "rewards=[{function: banana_success}]",
        f"train.updates={args.updates}",
        f"train.seed={args.seed}",
        "log.eval_every=5",
        "log.progress=false",
        f"rollout.dynamic_sampling={str(dynamic).lower()}",
        f"rollout.dynamic_sampling_rounds={args.rounds}",
        f"out={out}",
        "overwrite=true",
    ]
    cfg = resolve_config(load_config(RLConfig, CONFIG, overrides))
    t0 = time.time()
    train_rl(cfg)
    wall = time.time() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["eval/banana_success"]) for r in rows if r.get("split") == "eval"]
    train = [r for r in rows if r.get("split") == "train"]
    prompts = sum(cfg.rollout.prompts_per_step + r.get("dynamic/extra_prompts", 0) for r in train)
    reached = next((step for step, success in curve if success >= 0.95), None)
    return {"arm": name, "curve": curve, "updates_to_95": reached, "prompts_sampled": prompts, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3, help="rollout.dynamic_sampling_rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-rl-stabilizers")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    results = [run_arm("grpo", False, args), run_arm("grpo-dynamic", True, args)]
    for r in results:
        print(f"{r['arm']:>13}: " + "  ".join(f"{s}:{v:.2f}" for s, v in r["curve"]))
    for r in results:
        print(
            f"{r['arm']:>13}: updates to 95% = {r['updates_to_95']}, prompts sampled {r['prompts_sampled']:.0f}, "
            f"wall {r['wall_s']:.0f} s"
        )
    print(f"load average {os.getloadavg()[0]:.1f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

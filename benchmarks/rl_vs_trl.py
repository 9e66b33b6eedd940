"""Heed RLOO vs TRL's RLOOTrainer on the same model, prompts, K, completion length and update settings.

Each trainer runs in its own subprocess (so peak memory is each one's own), for the same number of
updates, ``--repeats`` times in alternating order (the fastest run of each side is reported); both
final policies are then evaluated by the same code (``heed.train.rl.evaluate_model``: banana
success on the held-out prompts, sampled at temperature 0.7). Heed optimises TRL's RLOO objective
(``update.loss_aggregation: seq_mean_token_sum``). Prints samples/s, peak memory and success side by
side, with ratios, and the machine's load average (the figures are only as quiet as the machine).

    python benchmarks/rl_vs_trl.py                       # built-in tiny model, 30 updates
    python benchmarks/rl_vs_trl.py --model micro --updates 5

TRL 1.16 has no PPO trainer (neither ``trl.PPOTrainer`` nor ``trl.experimental``), so only RLOO is
compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def settings(args: argparse.Namespace) -> dict:
    return {
        "prompts_per_step": args.prompts,
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "lr": args.lr,
        "beta": args.beta,
        "updates": args.updates,
        "temperature": 1.0,
    }


def model_dir(name: str) -> str:
    from heed.demo.builtin import resolve_name

    return resolve_name("builtin" if name == "tiny" else "builtin:micro")


def data_file(name: str, which: str) -> str:
    from heed.demo.builtin import resolve_name

    return resolve_name(("builtin:" if name == "tiny" else "builtin:micro:") + which)


def run_heed(args: argparse.Namespace, out: Path) -> dict:
    from heed.config import config_from_dict
    from heed.config.rl import RLConfig
    from heed.train.rl import train_rl

    s = settings(args)
    cfg = config_from_dict(
        RLConfig,
        {
            "algorithm": "rloo",
            "model": {"path": model_dir(args.model)},
            "data": {"prompts": data_file(args.model, "prompts_train")},
            "rewards": [{"function": "banana_format"}],
            "rollout": {
                "prompts_per_step": s["prompts_per_step"],
                "k": s["k"],
                "max_new_tokens": s["max_new_tokens"],
                "temperature": s["temperature"],
            },
            "kl": {"beta": s["beta"]},
            # TRL's RLOOTrainer: -mean over answers of A * ratio(answer), the ratio of the summed token
            # log-probs: per answer, the sum of its tokens' terms (Heed's default is the token mean)
            "update": {"loss_aggregation": "seq_mean_token_sum"},
            "optim": {"lr": s["lr"], "max_grad_norm": 1.0},
            "train": {"updates": s["updates"], "seed": 0},
            "eval": {"at_start": False},
            "log": {"progress": False},
            "out": str(out / "heed"),
            "overwrite": True,
        },
    )
    t = time.time()
    summary = train_rl(cfg)
    wall = time.time() - t
    return {
        "train_seconds": summary["train_seconds"],
        "wall_seconds": wall,
        "samples": summary["samples"],
        "generation_seconds": summary["generation_seconds"],
        "final": str(out / "heed" / "final"),
    }


def run_trl(args: argparse.Namespace, out: Path) -> dict:
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    from heed.data.records import load_records
    from heed.models.loading import load_causal_lm, load_tokenizer
    from heed.rewards.builtin import banana_format

    s = settings(args)
    path = model_dir(args.model)
    tok = load_tokenizer(path, padding_side="left")
    model = load_causal_lm(path)
    prompts = [
        {"prompt": [{"role": "user", "content": r.prompt}]}
        for r in load_records(data_file(args.model, "prompts_train"), "prompts")
    ]
    batch = s["prompts_per_step"] * s["k"]
    cfg = RLOOConfig(
        output_dir=str(out / "trl"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=s["k"],
        max_completion_length=s["max_new_tokens"],
        temperature=s["temperature"],
        learning_rate=s["lr"],
        lr_scheduler_type="constant",
        beta=s["beta"],
        num_iterations=1,
        max_grad_norm=1.0,
        max_steps=s["updates"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        disable_dropout=True,
        seed=0,
        log_completions=False,
    )

    def banana(prompts: list, completions: list, **kw: object) -> list[float]:
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return banana_format(prompts, [t.strip() for t in texts])

    trainer = RLOOTrainer(
        model=model,
        reward_funcs=[banana],
        args=cfg,
        train_dataset=Dataset.from_list(prompts),
        processing_class=tok,
    )
    t = time.time()
    trainer.train()
    wall = time.time() - t
    trainer.save_model(str(out / "trl" / "final"))
    tok.save_pretrained(str(out / "trl" / "final"))
    return {
        "train_seconds": wall,
        "wall_seconds": wall,
        "samples": s["updates"] * batch,
        "final": str(out / "trl" / "final"),
    }


def evaluate(args: argparse.Namespace, final: str) -> float:
    from heed.config import config_from_dict
    from heed.config.rl import RLConfig
    from heed.train.rl import evaluate_model

    cfg = config_from_dict(
        RLConfig,
        {
            "model": {"path": model_dir(args.model)},
            "data": {
                "prompts": data_file(args.model, "prompts_train"),
                "eval_prompts": data_file(args.model, "prompts_eval"),
            },
            "rewards": [{"function": "banana_format"}],
            "eval": {
                "num_prompts": args.eval_prompts,
                "temperature": 0.7,
                "metrics": [{"function": "banana_success"}],
            },
            "rollout": {"max_new_tokens": args.max_new_tokens},
        },
    )
    return evaluate_model(cfg, final)["eval/banana_success"]


def child(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    out = Path(args.workdir)
    result = run_heed(args, out) if args.child == "heed" else run_trl(args, out)
    from heed.train.common import peak_memory_mb

    result["peak_rss_mb"] = peak_memory_mb()
    result["banana_success"] = evaluate(args, result["final"])
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["tiny", "micro"], default="tiny")
    p.add_argument("--updates", type=int, default=30)
    p.add_argument("--prompts", type=int, default=16, help="prompts per update")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--lr", type=float, default=2e-4, help="as in configs/banana.yaml")
    p.add_argument("--beta", type=float, default=0.05, help="as in configs/banana.yaml")
    p.add_argument(
        "--repeats", type=int, default=2, help="runs of each side, alternating; the fastest is reported"
    )
    p.add_argument("--eval-prompts", type=int, default=100)
    p.add_argument("--child", choices=["heed", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    model_dir(args.model)  # build the asset once, before timing anything
    runs: dict[str, list[dict]] = {"heed": [], "trl": []}
    with tempfile.TemporaryDirectory() as work:
        for r in range(
            args.repeats
        ):  # alternate the order (heed, trl, trl, heed, ...) so load drifts hit both
            for name in ("heed", "trl") if r % 2 == 0 else ("trl", "heed"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    name,
                    "--workdir",
                    str(Path(work) / f"{name}{r}"),
                    *sys.argv[1:],
                ]
                load = os.getloadavg()[0]
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
                )
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                    return
                res = json.loads(line[7:])
                runs[name].append({**res, "load_before": load, "sps": res["samples"] / res["train_seconds"]})
    # the fastest run of each side: on a shared machine it is the least disturbed one
    results = {name: max(rs, key=lambda x: x["sps"]) for name, rs in runs.items()}
    for name, rs in runs.items():
        print(
            f"  {name} samples/s per run: "
            + ", ".join(f"{x['sps']:.1f} (load {x['load_before']:.1f})" for x in rs)
        )
    h, t = results["heed"], results["trl"]
    sps_h, sps_t = h["samples"] / h["train_seconds"], t["samples"] / t["train_seconds"]
    print(
        f"RLOO, model={args.model}, updates={args.updates}, {args.prompts} prompts x K={args.k}, "
        f"max_new_tokens={args.max_new_tokens}, lr={args.lr}, beta={args.beta}; "
        f"load average before runs: heed {h['load_before']:.1f}, trl {t['load_before']:.1f} on {os.cpu_count()} cores"
    )
    print(f"{'':18}{'heed':>12}{'trl':>12}{'ratio':>10}")
    print(f"{'samples/s':18}{sps_h:12.2f}{sps_t:12.2f}{sps_h / sps_t:10.2f}x")
    print(f"{'train seconds':18}{h['train_seconds']:12.1f}{t['train_seconds']:12.1f}")
    print(
        f"{'peak RSS (MiB)':18}{h['peak_rss_mb']:12.0f}{t['peak_rss_mb']:12.0f}{h['peak_rss_mb'] / t['peak_rss_mb']:10.2f}"
    )
    print(f"{'banana success':18}{h['banana_success']:12.2f}{t['banana_success']:12.2f}")
    print(f"(Heed: {h['generation_seconds']:.1f} s of its {h['train_seconds']:.1f} s sampling)")
    print(
        "PPO: TRL 1.16 ships no PPO trainer (trl.PPOTrainer / trl.experimental.ppo are absent); not compared."
    )


if __name__ == "__main__":
    main()

"""RL throughput on random-weight workloads: Heed RLOO / GRPO vs TRL's RLOOTrainer / GRPOTrainer, and Heed PPO.

Every run is its own subprocess (peak memory is each one's own), on the same model, synthetic prompts,
K, completion length, learning rate and β, with one cheap rule reward shared by both sides
(:func:`vowel_share`). Heed runs through ``heed.train.rl.train_rl`` (what ``heed rl`` calls); TRL
through its trainers' ``train()``. On the random-weight ``qwen2-*`` workloads EOS is one token in V,
so answers run to ``--max-new-tokens`` (the mean lengths are printed). Runs alternate sides
(``--repeats`` each) and the median is reported.

Figures per run: samples/s (per wall second and per CPU second of the process, which barely depends
on the load of a shared machine) over the updates after the first (the first pays one-time costs on both
sides: allocator warm-up, the probes), the whole run's too, peak RSS, and the fraction of this
machine's measured fp32 matmul peak that the model's FLOPs reach. FLOPs come from the shapes
(``_common.forward_flops_per_token``): per group, one pass = the prompt once (P tokens at mean
context P/2) + K answers of C tokens at mean context P + C/2; an update costs sampling (one pass),
the reference (one pass) and the update (3 passes: forward + backward), the same count on both sides
(work either side does beyond that, such as recomputed log-probs, is not counted as useful).
Heed's time per step comes from its own ``time/*`` metrics.

    python benchmarks/rl_workloads.py --workload qwen2-4k --prompts 1 16 --algos rloo grpo ppo
    python benchmarks/rl_workloads.py --workload qwen2-100m --prompts 16 --updates 3 --repeats 1

TRL 1.16 has no PPO trainer, so Heed's PPO is measured alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

VOWELS = frozenset("aeiou")


def vowel_share(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
    """The rule reward both sides train on: the share of vowels among an answer's letters (0 if none)."""
    out = []
    for c in completions:
        text = c[0]["content"] if isinstance(c, list) else str(c)
        letters = [ch for ch in text.lower() if ch.isalpha()]
        out.append(sum(ch in VOWELS for ch in letters) / len(letters) if letters else 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# the model and prompts of a workload


def model_path(workload: str, root: str) -> str:
    """The workload's model folder: a random-weight ``qwen2-*`` (built once under ``root``) or ``tiny``,
    Heed's built-in trained model."""
    if workload == "tiny":
        from heed.demo.builtin import resolve_name

        return resolve_name("builtin")
    from _common import build_workload

    return str(build_workload(workload, root))


def prompts_file(root: str, words: int, n: int = 512) -> str:
    """``n`` synthetic prompts of ``words`` random words, as ``{"prompt": ...}`` JSONL under ``root``."""
    from _common import synthetic_texts

    path = Path(root) / f"prompts-{words}w-{n}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in synthetic_texts(n, words, seed=3)))
        tmp.replace(path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# the two sides, each in its own process


def run_heed(a: dict[str, Any]) -> dict[str, Any]:
    from heed.config import config_from_dict
    from heed.config.rl import RLConfig
    from heed.report.metrics import read_metrics
    from heed.train.rl import train_rl

    algo = a["algo"]
    update: dict[str, Any] = {}
    if algo == "rloo":  # TRL's RLOO objective: the ratio of summed token log-probs per answer
        update["loss_aggregation"] = "seq_mean_token_sum"
    out = Path(a["workdir"]) / "heed"
    cfg = config_from_dict(
        RLConfig,
        {
            "algorithm": algo,
            "model": {"path": a["model"]},
            "data": {"prompts": a["prompts_file"]},
            "rewards": [{"function": f"{Path(__file__).resolve()}:vowel_share"}],
            "rollout": {
                "prompts_per_step": a["prompts"],
                "k": a["k"],
                "max_new_tokens": a["max_new_tokens"],
                "temperature": 1.0,
            },
            "kl": {"beta": a["beta"]},
            "update": update,
            "optim": {"lr": a["lr"], "max_grad_norm": 1.0},
            "train": {"updates": a["updates"], "seed": 0},
            "eval": {"at_start": False},
            "log": {"progress": False},
            "out": str(out),
            "overwrite": True,
        },
    )
    summary = with_cpu_stamps(lambda: train_rl(cfg), stamps := [])
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "train"]
    phases = {k[5:]: sum(r[k] for r in rows[1:]) for k in rows[0] if k.startswith("time/")} if rows else {}
    return {
        "train_seconds": summary["train_seconds"],
        # between the first and the last update's log lines: whole updates, logging included (as TRL's)
        "steady_seconds": rows[-1]["time"] - rows[0]["time"],
        "steady_cpu_seconds": stamps[-1] - stamps[0],
        "phases": phases,
        "length": statistics.mean(r["length/mean"] for r in rows),
    }


def with_cpu_stamps(run: Any, stamps: list[float]) -> Any:
    """``run()`` with this process's CPU time appended to ``stamps`` at every train log line of Heed's
    metrics log (once per update): CPU seconds, unlike wall seconds, barely depend on how busy a
    shared machine is (each side runs one thread)."""
    from heed.report.metrics import MetricsLogger

    log = MetricsLogger.log

    def stamped(self: Any, step: int, metrics: Any, split: str = "train") -> dict[str, Any]:
        if split == "train":
            stamps.append(time.process_time())
        return log(self, step, metrics, split)

    MetricsLogger.log = stamped  # type: ignore[method-assign]
    try:
        return run()
    finally:
        MetricsLogger.log = log  # type: ignore[method-assign]


def run_trl(a: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from heed.data.records import load_records
    from heed.models.loading import load_causal_lm, load_tokenizer

    algo = a["algo"]
    tok = load_tokenizer(a["model"], padding_side="left")
    model = load_causal_lm(a["model"])
    prompts = [
        {"prompt": [{"role": "user", "content": r.prompt}]}
        for r in load_records(a["prompts_file"], "prompts")
    ]
    batch = a["prompts"] * a["k"]
    common = dict(
        output_dir=str(Path(a["workdir"]) / "trl"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=a["k"],
        max_completion_length=a["max_new_tokens"],
        temperature=1.0,
        learning_rate=a["lr"],
        lr_scheduler_type="constant",
        beta=a["beta"],
        num_iterations=1,
        max_grad_norm=1.0,
        max_steps=a["updates"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        disable_dropout=True,
        seed=0,
        log_completions=False,
    )
    if algo == "rloo":
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    else:
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

    stamps: list[float] = []
    cpu: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())

    trainer = Trainer(
        model=model,
        reward_funcs=[vowel_share],
        args=Config(**common),
        train_dataset=Dataset.from_list(prompts),
        processing_class=tok,
        callbacks=[Stamp()],
    )
    t = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t
    lengths = [
        h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h
    ]
    return {
        "train_seconds": wall,
        "steady_seconds": stamps[-1] - stamps[0],
        "steady_cpu_seconds": cpu[-1] - cpu[0],
        "phases": {},
        "length": statistics.mean(lengths) if lengths else float("nan"),
    }


def worker(name: str, a: dict[str, Any]) -> None:
    if name.startswith("heed"):
        import heed.cli  # noqa: F401  the ``heed`` command's process setup (huge pages), before torch
    import torch

    torch.manual_seed(0)
    side = name.split("-")[0]
    result = run_heed(a) if side == "heed" else run_trl(a)
    from heed.train.common import peak_memory_mb

    result["peak_rss_mb"] = peak_memory_mb()
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# FLOPs from the shapes


def prompt_tokens(model: str, prompts: str, n: int = 64) -> float:
    """Mean prompt length in tokens as both sides encode it (the chat template applied)."""
    from heed.data.records import load_records
    from heed.models.loading import load_tokenizer

    tok = load_tokenizer(model, padding_side="left")
    recs = load_records(prompts, "prompts")[:n]
    ids = [
        tok.apply_chat_template(
            [{"role": "user", "content": r.prompt}], add_generation_prompt=True, tokenize=True
        )
        for r in recs
    ]
    return statistics.mean(len(x if isinstance(x, list) else x["input_ids"]) for x in ids)


def update_flops(config: Any, prompts: int, k: int, p: float, c: float) -> float:
    """Useful FLOPs of one update: sampling (1 pass), reference (1 pass), update (3 passes), where one
    pass over a group is its prompt once (P tokens, mean context P/2) + K answers of C tokens (mean
    context P + C/2)."""
    from _common import forward_flops_per_token

    one_pass = p * forward_flops_per_token(config, p / 2) + k * c * forward_flops_per_token(config, p + c / 2)
    return prompts * 5 * one_pass


def model_config(model: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=["qwen2-4k", "qwen2-32k", "qwen2-100m", "tiny"], default="qwen2-4k")
    p.add_argument("--algos", nargs="+", choices=["rloo", "grpo", "ppo"], default=["rloo", "grpo", "ppo"])
    p.add_argument("--prompts", nargs="+", type=int, default=[1, 16], help="prompts per update (each a run)")
    p.add_argument("--k", type=int, default=4, help="answers per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--words", type=int, default=12, help="words per synthetic prompt")
    p.add_argument("--updates", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating; medians reported")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument(
        "--beta", type=float, default=0.05, help="KL coefficient (both sides compute the reference)"
    )
    p.add_argument(
        "--root",
        default=str(Path(os.environ.get("HEED_CACHE", Path.home() / ".cache" / "heed")) / "workloads"),
        help="where the workload models and prompts are built (once)",
    )
    p.add_argument(
        "--peer-huge-pages",
        action="store_true",
        help="give TRL's process the transparent huge pages that the heed command turns on "
        "(THP_MEM_ALLOC_ENABLE=1; default: TRL as shipped, without them)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--args", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, json.loads(args.args))
        return
    if args.updates < 2:
        raise SystemExit("error: --updates must be at least 2 (the first update is left out of samples/s)")
    from _common import matmul_peak_flops, run_isolated

    model = model_path(args.workload, args.root)
    prompts = prompts_file(args.root, args.words)
    config = model_config(model)
    p_len = prompt_tokens(model, prompts)
    peak = matmul_peak_flops()
    print(
        f"workload {args.workload} ({model}), K={args.k}, max_new_tokens={args.max_new_tokens}, "
        f"prompt ~{p_len:.0f} tokens, {args.updates} updates, lr {args.lr}, beta {args.beta}; "
        f"matmul peak {peak / 1e9:.1f} GFLOP/s on {os.cpu_count()} cores",
        flush=True,
    )
    rows = []
    for n_prompts in args.prompts:
        for algo in args.algos:
            sides = ["heed"] if algo == "ppo" else ["heed", "trl"]
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
            with tempfile.TemporaryDirectory() as work:
                for r in range(args.repeats):
                    for side in sides if r % 2 == 0 else sides[::-1]:
                        a = {
                            "algo": algo,
                            "model": model,
                            "prompts_file": prompts,
                            "prompts": n_prompts,
                            "k": args.k,
                            "max_new_tokens": args.max_new_tokens,
                            "updates": args.updates,
                            "lr": args.lr,
                            "beta": args.beta,
                            "workdir": str(Path(work) / f"{side}{r}"),
                        }
                        load = os.getloadavg()[0]
                        # huge pages: Heed's process turns them on as the ``heed`` command does; TRL's
                        # gets them only with --peer-huge-pages
                        env = (
                            None
                            if side == "heed"
                            else {"THP_MEM_ALLOC_ENABLE": str(int(args.peer_huge_pages))}
                        )
                        res = run_isolated(Path(__file__), f"{side}-{algo}", a, env=env)
                        res["load"] = load
                        runs[side].append(res)
            batch = n_prompts * args.k
            out: dict[str, dict[str, float]] = {}
            for side, rs in runs.items():
                sps = statistics.median(batch * (args.updates - 1) / x["steady_seconds"] for x in rs)
                sps_cpu = statistics.median(batch * (args.updates - 1) / x["steady_cpu_seconds"] for x in rs)
                sps_all = statistics.median(batch * args.updates / x["train_seconds"] for x in rs)
                length = statistics.median(x["length"] for x in rs)
                flops = update_flops(config, n_prompts, args.k, p_len, length)
                out[side] = {
                    "sps": sps,
                    "sps_cpu": sps_cpu,
                    "sps_all": sps_all,
                    "rss": statistics.median(x["peak_rss_mb"] for x in rs),
                    "length": length,
                    "peak_frac": flops * sps / batch / peak,
                    "peak_frac_cpu": flops * sps_cpu / batch / peak,  # while the process ran
                    "load": statistics.median(x["load"] for x in rs),
                }
                if side == "heed":
                    phases = {k: statistics.median(x["phases"][k] for x in rs) for k in rs[0]["phases"]}
                    out[side]["phases"] = phases  # type: ignore[assignment]
                    # the update step alone (3 of the 5 passes), over the updates after the first
                    out[side]["update_frac"] = (
                        flops * 3 / 5 * (args.updates - 1) / max(phases.get("update", 0.0), 1e-9) / peak
                    )
            rows.append((n_prompts, algo, out))
            print_row(n_prompts, args.k, algo, out)
    print(
        "\nsummary: samples/s after the first update, per wall second and per CPU second of the process "
        "(one thread each; the CPU figure barely depends on the machine's load); median of runs"
    )
    print(
        f"{'run':<14}{'heed':>8}{'trl':>8}{'ratio':>8}{'heed/cpu':>10}{'trl/cpu':>9}{'ratio':>8}"
        f"{'heed MiB':>10}{'trl MiB':>9}{'mem':>7}{'heed %pk':>10}{'trl %pk':>9}{'%pk/cpu':>9}{'trl':>8}"
    )
    for n_prompts, algo, out in rows:
        h, t = out["heed"], out.get("trl")
        label = f"{algo} {n_prompts}x{args.k}"
        if t is None:
            print(
                f"{label:<14}{h['sps']:8.2f}{'-':>8}{'-':>8}{h['sps_cpu']:10.2f}{'-':>9}{'-':>8}"
                f"{h['rss']:10.0f}{'-':>9}{'-':>7}{100 * h['peak_frac']:9.2f}%{'-':>9}"
                f"{100 * h['peak_frac_cpu']:8.2f}%{'-':>8}"
            )
        else:
            print(
                f"{label:<14}{h['sps']:8.2f}{t['sps']:8.2f}{h['sps'] / t['sps']:7.2f}x"
                f"{h['sps_cpu']:10.2f}{t['sps_cpu']:9.2f}{h['sps_cpu'] / t['sps_cpu']:7.2f}x"
                f"{h['rss']:10.0f}{t['rss']:9.0f}{h['rss'] / t['rss']:6.2f}x"
                f"{100 * h['peak_frac']:9.2f}%{100 * t['peak_frac']:8.2f}%"
                f"{100 * h['peak_frac_cpu']:8.2f}%{100 * t['peak_frac_cpu']:7.2f}%"
            )
    print(f"uptime: {os.popen('uptime').read().strip()}")


def print_row(n_prompts: int, k: int, algo: str, out: dict[str, dict[str, Any]]) -> None:
    h = out["heed"]
    head = f"{algo} {n_prompts} prompts x K={k}:"
    parts = [
        f"heed {h['sps']:.2f} samples/s ({h['sps_cpu']:.2f} per CPU s, whole run {h['sps_all']:.2f}), "
        f"{h['rss']:.0f} MiB, length {h['length']:.1f}"
    ]
    if "trl" in out:
        t = out["trl"]
        parts.append(
            f"trl {t['sps']:.2f} samples/s ({t['sps_cpu']:.2f} per CPU s, whole run {t['sps_all']:.2f}), "
            f"{t['rss']:.0f} MiB, length {t['length']:.1f}"
        )
        parts.append(
            f"ratio {h['sps'] / t['sps']:.2f}x speed ({h['sps_cpu'] / t['sps_cpu']:.2f}x per CPU s), "
            f"{h['rss'] / t['rss']:.2f}x memory"
        )
    print(head, "; ".join(parts), f"(load {h['load']:.1f})")
    total = sum(v for k2, v in h["phases"].items() if k2 != "step") or 1.0
    step = h["phases"].get("step", total)
    print(
        "  heed time after the first update: "
        + ", ".join(f"{k2} {v:.2f}s ({100 * v / step:.0f}%)" for k2, v in h["phases"].items() if k2 != "step")
        + f"; step {step:.2f}s; the update step reaches {100 * h['update_frac']:.1f}% of the matmul peak",
        flush=True,
    )


if __name__ == "__main__":
    main()

"""What the offline ``*_vs_trl.py`` harnesses share: workload models, synthetic records that fill a
``--max-length``, FLOP counts from the model's shapes, alternating runs and the result table.

Throughput is counted on the records each side trains on (the whole synthetic set, one epoch:
``steps x batch`` records, the same on both sides). FLOPs are counted from the model's shapes on
the real (non-padding) tokens of every sequence as a plain forward sees it (a DPO pair is
``prompt + chosen`` and ``prompt + rejected``; a reward-model pair the same two sequences): the
trunk's matmuls and attention (:func:`_common.forward_flops_per_token`, each token attending to its
own prefix) plus the ``V x d`` LM head on every token of a causal LM (none for a reward model,
whose score head is ``d x 1``). A trained model costs 3x its forward, a frozen one (a reference or
KL pass inside the timed loop) 1x. Work a side skips (Heed runs a pair's prompt once and the LM
head only on answer tokens; padding) is not counted, so both sides are measured against the same
number of FLOPs and their peak fractions stand in the ratio of their throughputs.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import WORKLOADS, build_workload, forward_flops_per_token, matmul_peak_flops, synthetic_texts

BUILTIN = ("tiny", "micro")
CHOICES = (*BUILTIN, *WORKLOADS)


def workload_root() -> Path:
    """Where the random-weight workloads are saved (``$HEED_CACHE/workloads``)."""
    return Path(os.environ.get("HEED_CACHE", Path.home() / ".cache" / "heed")) / "workloads"


def workload_models(name: str) -> tuple[Path, Path]:
    """Policy and a different reference (same shapes and tokenizer, other random weights) of a
    Qwen2 workload, built once and reused."""
    policy = build_workload(name, workload_root())
    ref = build_workload(name, workload_root() / "ref-seed1", seed=1)
    # the reference must read the policy's token ids: one tokenizer for both
    for f in policy.glob("*token*"):
        (ref / f.name).write_bytes(f.read_bytes())
    return policy, ref


# ---------------------------------------------------------------------------------------------
# synthetic records whose chat-rendered length is a chosen number of tokens


class Filler:
    """Random-word texts of an exact token count under ``tokenizer`` (cut at a token boundary of a
    long random text), and the chat template's own tokens around a user/assistant exchange."""

    def __init__(self, tokenizer: Any, seed: int) -> None:
        self.tok = tokenizer
        self.rng = random.Random(seed)
        self.pool = synthetic_texts(64, 400, seed=seed + 7)
        probe = self.render("a", "b")
        self.overhead = probe - self.count("a") - self.count("b")

    def count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def render(self, prompt: str, answer: str) -> int:
        """Tokens of [user: prompt, assistant: answer] through the chat template."""
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return len(
            self.tok(self.tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)[
                "input_ids"
            ]
        )

    def text(self, tokens: int) -> str:
        tokens = max(1, tokens)
        base = " ".join(self.rng.sample(self.pool, len(self.pool)))
        while True:
            enc = self.tok(base, add_special_tokens=False, return_offsets_mapping=True)
            if len(enc["input_ids"]) >= tokens:
                return base[: enc["offset_mapping"][tokens - 1][1]].strip()
            base = base + " " + base


def target_lengths(n: int, max_length: int, seed: int, low: float = 0.5) -> list[int]:
    """``n`` sequence lengths uniform in [low, 0.97] x ``max_length`` (a margin for the template)."""
    rng = random.Random(seed)
    return [int(rng.uniform(low, 0.97) * max_length) for _ in range(n)]


def split_lengths(total: int, prompt: int, overhead: int) -> int:
    """Answer tokens so that prompt + answer + template tokens make ``total``."""
    return max(4, total - prompt - overhead)


# ---------------------------------------------------------------------------------------------
# FLOPs


def sequence_flops(config: Any, n: int, head: bool = True) -> float:
    """Forward FLOPs of one sequence of ``n`` real tokens: token t attends to t + 1 positions, so
    the mean context is (n + 1) / 2; ``head=False`` drops the ``V x d`` LM head (a reward model)."""
    per = forward_flops_per_token(config, (n + 1) / 2)
    if not head:
        per -= 2.0 * config.vocab_size * config.hidden_size
    return n * per


def load_config(path: str | Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path))


# ---------------------------------------------------------------------------------------------
# running both sides, alternating, and the table


def spawn(script: str, kind: str, a: dict[str, Any]) -> dict[str, Any]:
    """Run ``script --worker kind --worker-args JSON`` in a fresh process; it prints ``RESULT {json}``."""
    import json

    proc = subprocess.run(
        [sys.executable, script, "--worker", kind, "--worker-args", json.dumps(a)],
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"error: the {kind} worker failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def alternate(run: Callable[[str], dict[str, Any]], repeats: int) -> dict[str, list[dict[str, Any]]]:
    """``repeats`` runs of each side, alternating the order (heed, trl, trl, heed, ...)."""
    runs: dict[str, list[dict[str, Any]]] = {"heed": [], "trl": []}
    for r in range(repeats):
        for kind in ("heed", "trl") if r % 2 == 0 else ("trl", "heed"):
            runs[kind].append(run(kind))
            print(f"  {kind} run {len(runs[kind])}: {runs[kind][-1]['seconds']:.2f} s", flush=True)
    return runs


def measured_peak() -> float:
    """The best of two matmul peak measurements (fp32, FLOP/s): the machine may be shared."""
    return max(matmul_peak_flops(), matmul_peak_flops())


def report(
    title: str,
    runs: dict[str, list[dict[str, Any]]],
    units: Sequence[tuple[str, float]],
    flops: dict[str, float],
    peak: float,
) -> dict[str, Any]:
    """Print the table: per side the median time, throughput in each of ``units`` (name, count per
    run), training FLOP/s as a fraction of ``peak`` (``flops``: per side, per run), peak memory;
    returns the figures. Medians over the repeats; every run is listed."""
    med = {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()}
    mem = {k: max(x["peak_mb"] for x in v) for k, v in runs.items()}
    print(title)
    print(
        f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; medians of {len(runs['heed'])} runs"
    )
    for kind in ("heed", "trl"):
        print(f"  {kind} seconds per run: " + ", ".join(f"{x['seconds']:.2f}" for x in runs[kind]))
    print(f"{'':22}{'Heed':>12}{'TRL':>12}{'Heed/TRL':>10}")
    out: dict[str, Any] = {}
    for name, count in units:
        h, t = count / med["heed"], count / med["trl"]
        out[name] = (h, t)
        print(f"{name:22}{h:12.4g}{t:12.4g}{h / t:10.2f}")
    frac = {k: flops[k] / med[k] / peak for k in ("heed", "trl")}
    out["peak_fraction"] = (frac["heed"], frac["trl"])
    print(
        f"{'% of matmul peak':22}{100 * frac['heed']:11.1f}%{100 * frac['trl']:11.1f}%{frac['heed'] / frac['trl']:10.2f}"
    )
    out["peak_mb"] = (mem["heed"], mem["trl"])
    print(f"{'peak memory MiB':22}{mem['heed']:12.0f}{mem['trl']:12.0f}{mem['heed'] / mem['trl']:10.2f}")
    print(
        f"(matmul peak {peak / 1e9:.1f} GFLOP/s fp32, measured here; CPU memory is the peak RSS of each process)"
    )
    return out


def rendered_length(tok: Any, messages: list[dict[str, str]], max_length: int) -> int:
    """Tokens of ``messages`` through the chat template, capped at ``max_length`` (both sides cut there)."""
    text = tok.apply_chat_template(messages, tokenize=False)
    return min(max_length, len(tok(text, add_special_tokens=False)["input_ids"]))


def synthetic_pairs(tok: Any, n: int, max_length: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` conversational preference pairs whose prompt + chosen and prompt + rejected each fill
    a length uniform in [0.5, 0.97] x ``max_length``; the prompt takes 20-50% of the shorter one."""
    fill, rng = Filler(tok, seed), random.Random(seed + 1)
    rows = []
    for lc, lr in zip(
        target_lengths(n, max_length, seed), target_lengths(n, max_length, seed + 2), strict=True
    ):
        p = int(rng.uniform(0.2, 0.5) * min(lc, lr))
        rows.append(
            {
                "prompt": [{"role": "user", "content": fill.text(p)}],
                "chosen": [{"role": "assistant", "content": fill.text(split_lengths(lc, p, fill.overhead))}],
                "rejected": [
                    {"role": "assistant", "content": fill.text(split_lengths(lr, p, fill.overhead))}
                ],
            }
        )
    return rows


def synthetic_completions(tok: Any, n: int, max_length: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` conversational prompt / completion records of a length uniform in [0.5, 0.97] x
    ``max_length``, the prompt 20-50% of it."""
    fill, rng = Filler(tok, seed), random.Random(seed + 1)
    rows = []
    for total in target_lengths(n, max_length, seed):
        p = int(rng.uniform(0.2, 0.5) * total)
        rows.append(
            {
                "prompt": [{"role": "user", "content": fill.text(p)}],
                "completion": [
                    {"role": "assistant", "content": fill.text(split_lengths(total, p, fill.overhead))}
                ],
            }
        )
    return rows

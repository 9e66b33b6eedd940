"""Helpers shared by the benchmark scripts: subprocess isolation, peak memory, machine peak FLOP/s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run_isolated(
    script: Path, name: str, args: dict[str, Any], timeout: int = 3600, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``script --worker name --args JSON`` in a fresh process (``env``: variables set on top of
    this one's environment); it prints one JSON line last."""
    proc = subprocess.run(
        [sys.executable, str(script), "--worker", name, "--args", json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env} if env else None,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matmul_peak_flops(n: int = 1536, repeats: int = 10) -> float:
    """Measured fp32 matmul FLOP/s of this machine (best of ``repeats``), the roofline for training."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def ratio_line(label: str, heed: float, peer: float, target: str) -> str:
    r = heed / peer if peer else float("inf")
    return f"{label:<28} heed={heed:>10.2f}  trl={peer:>10.2f}  ratio={r:6.2f}x  (target {target})"


# ---------------------------------------------------------------------------------------------
# Workloads Heed was not tuned for: random-weight Qwen2-architecture models built from a config
# (nothing downloaded), so every sampled answer runs to ``max_new_tokens`` (EOS is one token in V).
WORKLOADS: dict[str, dict[str, int]] = {
    # 5.2M parameters: vocabulary 4096, hidden 256, 4 layers (tied embeddings)
    "qwen2-4k": {
        "vocab_size": 4096,
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    # the same trunk with a 32k vocabulary (12.4M parameters, most of them in the embedding)
    "qwen2-32k": {
        "vocab_size": 32000,
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    # ~100M parameters: vocabulary 32000, hidden 768, 12 layers, grouped-query attention
    "qwen2-100m": {
        "vocab_size": 32000,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
    },
    # Qwen2-0.5B's shapes (494M parameters, 136M of them in the 151936 x 896 tied embedding); the
    # GPU benchmark's model (benchmarks/gpu.sh), too big for a CPU run
    "qwen2-0.5b": {
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
    },
}


def workload_config(name: str, max_positions: int = 2048) -> Any:
    """The ``Qwen2Config`` of workload ``name`` (pad id 0, EOS id 1, tied embeddings)."""
    from transformers import Qwen2Config

    if name not in WORKLOADS:
        raise SystemExit(f"error: unknown workload {name!r}; expected one of {', '.join(WORKLOADS)}")
    return Qwen2Config(
        **WORKLOADS[name],
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        attention_dropout=0.0,
    )


def parameter_count(config: Any) -> int:
    """Parameters of a Qwen2-style decoder from its shapes (tied embeddings, q/k/v biases, norms)."""
    d, i, n, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    attn = d * d + 2 * d * kv + d * d + d + 2 * kv  # q, k, v, o (+ q/k/v biases)
    mlp = 3 * d * i
    return v * d + n * (attn + mlp + 2 * d) + d


def forward_flops_per_token(config: Any, context: float) -> float:
    """Matmul FLOPs of one token's forward pass: 2 x (trunk matmul weights + LM head V x d), plus
    attention's scores and weighted sum, 2 x 2 x context x d per layer (``context``: the mean number
    of positions each token attends to). Training a token costs 3x this (forward + 2x backward);
    see Kaplan et al. 2020, https://arxiv.org/abs/2001.08361, Table 1."""
    d, n, v = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    weights = n * (2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size) + v * d
    return 2.0 * weights + 4.0 * n * context * d


def available_memory_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo (bytes); physical memory where that file is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def require_memory(needed: float, what: str) -> None:
    """Stop with one line, before anything is allocated, when ``needed`` bytes exceed what is free."""
    free = available_memory_bytes()
    if needed > free:
        raise SystemExit(
            f"error: {what} needs about {needed / 2**30:.1f} GiB but this machine has "
            f"{free / 2**30:.1f} GiB available; choose a smaller --model or batch"
        )


def training_bytes(config: Any, batch_tokens: int, copies: int = 2) -> float:
    """A floor on fp32 training memory: weights, gradients and two AdamW moments (16 bytes per
    parameter), ``copies - 1`` frozen copies (reference / reward model, 4 bytes per parameter), and
    the logits of one micro-batch (``batch_tokens`` x V x 4 bytes, x2 for their gradient)."""
    p = parameter_count(config)
    return 16.0 * p + 4.0 * p * (copies - 1) + 8.0 * batch_tokens * config.vocab_size


def _word_pool(seed: int = 0, n: int = 40000) -> list[str]:
    import random

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(n)]


def synthetic_texts(n: int, words: int, seed: int = 0) -> list[str]:
    """``n`` texts of ``words`` random words each, drawn from the pool the workloads' tokenizers
    were trained on."""
    import random

    pool, rng = _word_pool(), random.Random(seed)
    return [" ".join(rng.choice(pool) for _ in range(words)) for _ in range(n)]


def tokenizer_texts(vocab_size: int) -> list[str]:
    """The texts a workload's tokenizer is trained on: 12000 texts of 50 random words up to a 32k
    vocabulary; above that, every word of a pool of ~4/3 V words (the default pool extended: its
    first 40000 words are the same) twice, so BPE finds enough pairs to reach V merges."""
    if vocab_size <= 32000:
        return synthetic_texts(12000, 50, seed=1)
    pool = _word_pool(n=max(40000, vocab_size * 4 // 3))
    words = pool + pool[::-1]
    return [" ".join(words[i : i + 50]) for i in range(0, len(words), 50)]


def build_workload(name: str, root: str | Path, seed: int = 0, max_positions: int = 2048) -> Path:
    """Save workload ``name`` (random weights, seeded) under ``root/name`` with a byte-level BPE
    tokenizer of exactly V tokens trained on random words (Heed's tiny tokenizer recipe:
    ``<|pad|>`` 0, ``<|end|>`` 1, a chat template); reused when present."""
    out = Path(root) / name
    if (out / "config.json").exists():
        return out
    config = workload_config(name, max_positions)
    require_memory(8.0 * parameter_count(config), f"building workload {name}")
    import torch
    from transformers import Qwen2ForCausalLM

    from heed.models.tiny import train_tokenizer

    tok = train_tokenizer(tokenizer_texts(config.vocab_size), vocab_size=config.vocab_size)
    if len(tok) != config.vocab_size:
        raise SystemExit(f"error: the {name} tokenizer has {len(tok)} tokens, expected {config.vocab_size}")
    tok.model_max_length = max_positions
    config.pad_token_id, config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out

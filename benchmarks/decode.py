"""Decoding speed of Heed's sampler against the forward pass alone and against ``model.generate``.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/decode.py \
        [--models qwen2-4k,qwen2-32k,tiny] [--batches 4,64] [--prompt 32] [--new 64] [--repeats 3] [--compile]

For each model (the random-weight workloads of ``benchmarks/_common.py``, and ``tiny``: the built-in
Llama-style model's shape, vocabulary 2048) and batch B it times, with B distinct prompts of up to P
tokens (left padded) and T new tokens per row (no stop token, so every row runs T steps):

- ``heed``: :func:`heed.rollout.sampler.decode` (sampling at temperature 1, keyed draws);
- ``hf``: ``model.generate`` with the same sampling and ``min_new_tokens = T``;
- ``fwd``: one teacher-forced forward over the same B x (P + T) tokens, logits at the T answer
  positions only: the rate the forward pass alone allows;
- ``eff``: heed / fwd, both counted on the B x T new tokens;
- ``steps/s``, ``ms/step`` of Heed's loop and ``over``: its time per step beyond the forward pass's
  share, (t_heed - t_fwd) / T;
- ``mm ms/step``: the model's weight matrices applied to B rows once (T times, divided by T), the floor
  of any step-by-step decoder at this batch (each matrix as the lean step applies it,
  :class:`heed.rollout.lean.Projection`: packed for oneDNN where it packs, else ``linear`` over the
  layer's own); ``cap`` = t_fwd / (T x mm): the efficiency such a decoder could reach at best (small
  batches read every weight once per step, which the one forward does not);
- with ``--compile``: the same with ``SamplingParams(compile=True)``, and the wall time of its first
  call (``compile s``: compiling plus one decode).

Times are medians of ``--repeats`` runs after one warm-up; the machine's load (``uptime``) is
printed with the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import WORKLOADS, parameter_count, require_memory, workload_config


def model_for(name: str) -> Any:
    """A random-weight model (seeded): a workload of ``_common.WORKLOADS`` or the built-in ``tiny`` shape."""
    import torch

    if name == "tiny":
        from transformers import LlamaConfig

        from heed.models.tiny import SIZES, build_model

        config = LlamaConfig(
            vocab_size=2048,
            max_position_embeddings=1024,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
            attention_dropout=0.0,
            num_key_value_heads=SIZES["tiny"]["num_attention_heads"],
            **SIZES["tiny"],
        )
        return build_model(config).eval()
    from transformers import Qwen2ForCausalLM

    config = workload_config(name)
    require_memory(8.0 * parameter_count(config), f"workload {name}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen2ForCausalLM(config).eval()


def prompts(b: int, p: int, vocab: int, seed: int = 0) -> tuple[Any, Any]:
    """B left-padded prompts of p/2 to p random tokens (ids >= 2: neither padding nor EOS): ids, mask (B, P)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(p // 2, p + 1, (b,), generator=g)
    ids = torch.randint(2, vocab, (b, p), generator=g)
    mask = torch.arange(p)[None, :] >= (p - lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


CLOCK = time.process_time  # CPU seconds of this process: steadier than wall time on a loaded machine


def timed(fn: Any, repeats: int) -> tuple[float, float]:
    """(first call's seconds, median of ``repeats`` further calls) on :data:`CLOCK`."""
    t0 = CLOCK()
    fn()
    first = CLOCK() - t0
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return first, statistics.median(times)


def measure(name: str, b: int, p: int, t: int, repeats: int, compile_: bool, hf: bool) -> dict[str, float]:
    import torch

    from heed.models.lm import position_ids_from_mask
    from heed.rollout.generate import SamplingParams
    from heed.rollout.lean import Projection
    from heed.rollout.sampler import decode, row_keys

    model = model_for(name)
    vocab = model.config.vocab_size
    ids, mask = prompts(b, p, vocab)
    keys = row_keys(0, list(range(b)))
    params = SamplingParams(max_new_tokens=t, temperature=1.0)
    res: dict[str, float] = {}

    def heed(params: SamplingParams = params) -> None:
        rows, _ = decode(model, ids, mask, params, stop_ids=[], keys=keys)
        assert all(len(r) == t for r in rows)

    with torch.inference_mode():
        _, res["heed_s"] = timed(heed, repeats)
        if compile_:
            cparams = SamplingParams(max_new_tokens=t, temperature=1.0, compile=True)
            t0 = time.perf_counter()
            heed(cparams)  # compiles (wall time: inductor compiles in worker processes)
            res["compile_s"] = time.perf_counter() - t0
            _, res["compiled_s"] = timed(lambda: heed(cparams), repeats)
        # the same B x (P + T) tokens teacher-forced in one call, logits at the T answer positions
        full_ids = torch.cat([ids, torch.randint(2, vocab, (b, t))], dim=1)
        full_mask = torch.cat([mask, torch.ones(b, t, dtype=torch.bool)], dim=1).long()
        pos = position_ids_from_mask(full_mask)
        _, res["fwd_s"] = timed(
            lambda: model(input_ids=full_ids, attention_mask=full_mask, position_ids=pos, logits_to_keep=t),
            repeats,
        )
        # the floor of any decoding loop at this batch: every weight matrix read once per step, T steps
        # of B-row matmuls (at small B this is memory-bound, where the one batched forward is not), in
        # the layout the lean step reads
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        xs = [torch.randn(b, m.in_features) for m in linears]
        projections = [Projection([m], b) for m in linears]

        def matmuls() -> None:
            for _ in range(t):
                for proj, x in zip(projections, xs, strict=True):
                    proj(x)

        _, res["floor_s"] = timed(matmuls, repeats)
        if hf:

            def generate() -> None:
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask.long(),
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=t,
                    min_new_tokens=t,
                    pad_token_id=0,
                    eos_token_id=1,
                )
                assert out.shape[1] == p + t

            _, res["hf_s"] = timed(generate, max(1, repeats - 1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", default="qwen2-4k,qwen2-32k,tiny", help=f"of {', '.join([*WORKLOADS, 'tiny'])}"
    )
    ap.add_argument("--batches", default="4,64")
    ap.add_argument("--prompt", type=int, default=32, help="longest prompt P (tokens)")
    ap.add_argument("--new", type=int, default=64, help="new tokens T per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--compile", action="store_true", help="also time SamplingParams(compile=True)")
    ap.add_argument("--no-hf", action="store_true", help="skip model.generate")
    ap.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu", help="process CPU time (default) or wall time"
    )
    args = ap.parse_args()

    import warnings

    import torch

    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    warnings.filterwarnings("ignore")
    t = args.new
    head = "| model | B | heed tok/s | hf tok/s | fwd tok/s | eff | steps/s | ms/step | over ms/step | mm ms/step | cap |"
    if args.compile:
        head += " compiled tok/s | compiled eff | compile s |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for name in args.models.split(","):
        for b in (int(x) for x in args.batches.split(",")):
            r = measure(name, b, args.prompt, t, args.repeats, args.compile, not args.no_hf)
            n = b * t
            line = (
                f"| {name} | {b} | {n / r['heed_s']:.0f} | "
                + (f"{n / r['hf_s']:.0f}" if "hf_s" in r else "-")
                + f" | {n / r['fwd_s']:.0f} | {r['fwd_s'] / r['heed_s']:.0%} | {t / r['heed_s']:.1f} | "
                f"{1e3 * r['heed_s'] / t:.2f} | {1e3 * (r['heed_s'] - r['fwd_s']) / t:.2f} | "
                f"{1e3 * r['floor_s'] / t:.2f} | {min(1.0, r['fwd_s'] / r['floor_s']):.0%} |"
            )
            if args.compile:
                line += f" {n / r['compiled_s']:.0f} | {r['fwd_s'] / r['compiled_s']:.0%} | {r['compile_s']:.1f} |"
            print(line, flush=True)
    load = os.getloadavg()
    print(
        f"\nP={args.prompt} T={t} threads={args.threads} repeats={args.repeats} (medians of {args.clock} time); "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()

"""Heed's decoding loop at another git revision against this tree's, interleaved in one process.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/decode_ab.py REV \
        [--models qwen2-4k,qwen2-32k,tiny] [--batches 4,64] [--repeats 5]

``src/heed/rollout/sampler.py`` of ``REV`` (read with ``git show``) and of the working tree decode the
same prompts with the same keys, one after the other, ``--repeats`` times (medians of process CPU time,
eager, no stop token). It also checks that both return the same token ids (a speed-up must not change
an answer).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import model_for, prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="git revision of the 'before' sampler")
    ap.add_argument("--models", default="qwen2-4k,qwen2-32k,tiny")
    ap.add_argument("--batches", default="4,64")
    ap.add_argument("--new", type=int, default=64, help="new tokens T per row")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch

    from heed.rollout import sampler as after
    from heed.rollout.generate import SamplingParams
    from heed.rollout.sampler import row_keys

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    root = Path(__file__).resolve().parents[1]
    text = subprocess.run(
        ["git", "show", f"{args.rev}:src/heed/rollout/sampler.py"], cwd=root, capture_output=True, text=True
    )
    if text.returncode != 0:
        raise SystemExit(f"error: git show {args.rev}:src/heed/rollout/sampler.py: {text.stderr.strip()}")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(text.stdout)
    spec = importlib.util.spec_from_file_location("sampler_before", f.name)
    assert spec is not None and spec.loader is not None
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    os.unlink(f.name)

    t = args.new
    print(f"| model | B | {args.rev} ms/step | tree ms/step | tree / {args.rev} | same ids |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = model_for(name)
        for b in (int(x) for x in args.batches.split(",")):
            ids, mask = prompts(b, 32, model.config.vocab_size)
            keys = row_keys(0, list(range(b)))
            params = SamplingParams(max_new_tokens=t)
            times: dict[str, list[float]] = {"before": [], "after": []}
            with torch.inference_mode():
                same = (
                    before.decode(model, ids, mask, params, [], keys=keys)[0]
                    == after.decode(model, ids, mask, params, [], keys=keys)[0]
                )
                for _ in range(args.repeats):
                    for label, mod in (("before", before), ("after", after)):
                        t0 = time.process_time()
                        mod.decode(model, ids, mask, params, [], keys=keys)
                        times[label].append(time.process_time() - t0)
            a, z = statistics.median(times["before"]), statistics.median(times["after"])
            print(
                f"| {name} | {b} | {1e3 * a / t:.2f} | {1e3 * z / t:.2f} | {z / a:.2f} | {same} |", flush=True
            )
    load = os.getloadavg()
    print(
        f"\nT={t} repeats={args.repeats} (medians of cpu time); load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


if __name__ == "__main__":
    main()

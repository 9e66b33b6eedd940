"""Heed's log-probs against a plain ``transformers`` forward on every causal architecture of
``tests/archs.py`` (tiny random models, fp32, sequences longer than the sliding window of 8).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/arch_logprobs.py [NAME ...]

For each architecture and path (rows, shared prompt, packed SFT, value head on rows / shared, the
``heed`` and ``hf`` sampling engines) it prints max |Δ log-prob| (or |Δ value|) and the largest
gradient difference relative to the largest gradient entry (engines: no gradient). The measurement
is the one ``tests/models/test_architectures.py`` asserts (within 1e-5).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    import torch

    from archs import CAUSAL
    from models.test_architectures import measure

    torch.set_num_threads(1)
    names = sys.argv[1:] or list(CAUSAL)
    rows = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            rows[name] = measure(name)
    paths = list(next(iter(rows.values())))
    print("| architecture | " + " | ".join(paths) + " |")
    print("|---" * (len(paths) + 1) + "|")
    for name, res in rows.items():
        cells = []
        for p in paths:
            d, g = res[p]
            cells.append(f"{d:.1e}" if g != g else f"{d:.1e} / {g:.1e}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\ncells: max |Δ log-prob| (value columns: |Δ value|) / max |Δ grad| ÷ max |grad|")


if __name__ == "__main__":
    main()

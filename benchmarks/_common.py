"""Helpers shared by the benchmark scripts: subprocess isolation, peak memory, machine peak FLOP/s."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run_isolated(script: Path, name: str, args: dict[str, Any], timeout: int = 3600) -> dict[str, Any]:
    """Run ``script --worker name --args JSON`` in a fresh process; it prints one JSON line last."""
    proc = subprocess.run(
        [sys.executable, str(script), "--worker", name, "--args", json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
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

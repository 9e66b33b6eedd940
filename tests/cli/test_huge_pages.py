"""The ``heed`` command turns on transparent huge pages for PyTorch's CPU tensors (before torch is
imported, when PyTorch reads the setting), and leaves a user's own choice alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# allocate and touch a 64 MiB tensor, then print how much of this process's anonymous memory sits in
# huge pages (kB, from the kernel's own accounting)
PROBE = """
import os
import heed.cli  # what the heed command imports first
import torch
x = torch.ones(16 * 2**20)
rollup = open("/proc/self/smaps_rollup").read().splitlines()
huge = next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:"))
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), huge, float(x.sum()))
"""


def run_probe(value: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = value
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert float(out[2]) == 16 * 2**20  # the tensor was really written
    return out[0], int(out[1])


def thp_mode() -> str | None:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.exists():
        return None
    text = path.read_text()
    return text[text.index("[") + 1 : text.index("]")]


def test_the_command_sets_huge_pages_unless_the_user_chose() -> None:
    assert run_probe(None)[0] == "1"
    assert run_probe("0")[0] == "0"


@pytest.mark.skipif(thp_mode() != "madvise", reason="the kernel's huge-page mode is not 'madvise'")
def test_large_tensors_land_in_huge_pages() -> None:
    """In the kernel's ``madvise`` mode only memory that asks for huge pages gets them: with the
    setting most of the 64 MiB tensor does, with ``THP_MEM_ALLOC_ENABLE=0`` none of it."""
    assert run_probe(None)[1] >= 32 * 1024
    assert run_probe("0")[1] < 2 * 1024

"""Many processes on CPU (gloo): ``torchrun --nproc_per_node 2`` gives the same run as one
process with the same global batch, up to float noise (each rank takes every world-th sequence of the
global batch and the loss is normalised by the global token count, so the averaged gradient is the same)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

PROBE = """
import torch.distributed as dist
dist.init_process_group("gloo")
import torch
t = torch.ones(1)
dist.all_reduce(t)
assert t.item() == 2
dist.destroy_process_group()
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.update({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HEED_DEBUG": "1"})
    return env


def _launch(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess[str]:
    # torchrun (what accelerate launch runs for DDP): two local processes; accelerate reads their
    # environment and picks the gloo backend on CPU
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip (with the reason) when this machine cannot start two gloo processes at all."""
    probe = tmp_path_factory.mktemp("probe") / "probe.py"
    probe.write_text(PROBE)
    try:
        res = _launch([str(probe)], timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot launch 2 processes here: {exc}")
    if res.returncode != 0:
        pytest.skip("cannot launch 2 gloo processes here: " + (res.stderr.strip().splitlines() or ["?"])[-1])


def _config(tmp: Path, model: Path, data: Path, out: Path) -> Path:
    import yaml

    cfg = {
        "model": {"path": str(model)},
        "data": {"train": str(data), "max_length": 64, "eval_split": 0.0, "group_by_length": False},
        "train": {"batch_size": 8, "max_steps": 4, "seed": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "max_grad_norm": 1.0},
        "log": {"log_every": 1, "progress": False},
        "out": str(out),
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sft_on_two_processes_matches_one(two_processes: None, tmp_path: Path, micro_sft_model: Path,
                                          corpus_files: dict) -> None:
    from safetensors.torch import load_file

    from heed.cli import main

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(corpus_files["chat"].read_text().splitlines(keepends=True)[:64]))
    one, two = tmp_path / "one", tmp_path / "two"
    main(["sft", "--config", str(_config(tmp_path, micro_sft_model, data, one))])
    res = _launch(["-m", "heed", "sft", "--config", str(_config(tmp_path, micro_sft_model, data, two))])
    assert res.returncode == 0, res.stderr[-3000:]

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["split"] == "train"]

    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == 4
    assert max(abs(a - b) for a, b in zip(l1, l2, strict=True)) < 1e-4, (l1, l2)
    w1 = load_file(one / "final" / "model.safetensors")
    w2 = load_file(two / "final" / "model.safetensors")
    base = load_file(micro_sft_model / "model.safetensors")
    moved = max(float((w1[k] - base[k]).abs().max()) for k in w1)
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert moved > 1e-3 and diff < 1e-5 * max(1.0, moved) * 10, (moved, diff)
    shutil.rmtree(one)
    shutil.rmtree(two)

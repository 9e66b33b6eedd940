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


def _config(tmp: Path, command: str, model: Path, data: Path, out: Path) -> Path:
    import yaml

    cfg: dict = {
        "model": {"path": str(model)},
        "train": {"batch_size": 8, "max_steps": 4, "seed": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "max_grad_norm": 1.0},
        "log": {"log_every": 1, "progress": False},
        "out": str(out),
    }
    if command == "sft":
        cfg["data"] = {"train": str(data), "max_length": 64, "eval_split": 0.0, "group_by_length": False}
    elif command == "dpo":
        cfg["data"] = {"train": str(data), "max_length": 64, "eval_split": 0.0}
        cfg["sample"] = {"num_prompts": 0}
    else:
        cfg["data"] = {"train": str(data), "max_length": 64, "eval_split": 0.25}
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _data(tmp: Path, command: str, corpus_files: dict) -> Path:
    from heed.data.io import write_jsonl
    from heed.demo.preferences import make_pairs, make_ranked_groups

    data = tmp / f"{command}.jsonl"
    if command == "sft":
        data.write_text("".join(corpus_files["chat"].read_text().splitlines(keepends=True)[:64]))
    elif command == "dpo":
        write_jsonl(data, make_pairs(40, seed=0))
    else:
        write_jsonl(data, make_ranked_groups(40, k=3, seed=0))
    return data


@pytest.mark.parametrize("command", ["sft", "dpo", "rm"])
def test_two_processes_match_one(two_processes: None, tmp_path: Path, micro_sft_model: Path,
                                 corpus_files: dict, command: str) -> None:
    from safetensors.torch import load_file

    from heed.cli import main

    argv = ["rm", "train"] if command == "rm" else [command]
    data = _data(tmp_path, command, corpus_files)
    one, two = tmp_path / "one", tmp_path / "two"
    main([*argv, "--config", str(_config(tmp_path, command, micro_sft_model, data, one))])
    res = _launch(["-m", "heed", *argv, "--config", str(_config(tmp_path, command, micro_sft_model, data, two))])
    assert res.returncode == 0, res.stderr[-3000:]

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["split"] == "train"]

    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == 4
    assert max(abs(a - b) for a, b in zip(l1, l2, strict=True)) < 1e-4, (l1, l2)
    w1 = load_file(one / "final" / "model.safetensors")
    w2 = load_file(two / "final" / "model.safetensors")
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert diff < 1e-4, diff
    base = load_file(micro_sft_model / "model.safetensors")
    shared = [k for k in w1 if k in base and w1[k].shape == base[k].shape]
    assert max(float((w1[k] - base[k]).abs().max()) for k in shared) > 1e-3  # training moved the weights
    shutil.rmtree(one)
    shutil.rmtree(two)

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

from heed.config.base import set_dotted

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


def _launch(args: list[str], timeout: int = 240, debug: bool = True) -> subprocess.CompletedProcess[str]:
    # torchrun (what accelerate launch runs for DDP): two local processes; accelerate reads their
    # environment and picks the gloo backend on CPU
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        *args,
    ]
    env = _env() if debug else {**_env(), "HEED_DEBUG": "0"}  # debug: full tracebacks instead of one line
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


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
def test_two_processes_match_one(
    two_processes: None, tmp_path: Path, micro_sft_model: Path, corpus_files: dict, command: str
) -> None:
    from safetensors.torch import load_file

    from heed.cli import main

    argv = ["rm", "train"] if command == "rm" else [command]
    data = _data(tmp_path, command, corpus_files)
    one, two = tmp_path / "one", tmp_path / "two"
    main([*argv, "--config", str(_config(tmp_path, command, micro_sft_model, data, one))])
    res = _launch(
        ["-m", "heed", *argv, "--config", str(_config(tmp_path, command, micro_sft_model, data, two))]
    )
    assert res.returncode == 0, res.stderr[-3000:]

    def losses(run: Path) -> list[float]:
        return [
            json.loads(line)["loss"]
            for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"
        ]

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


# --------------------------------------------------------------------------------------------
# heed rl: each process generates and trains on its share of whole prompts


def _rl_config(tmp: Path, model: Path, prompts: Path, out: Path, **over: object) -> Path:
    import yaml

    cfg: dict = {
        "model": {"path": str(model)},
        "data": {"prompts": str(prompts)},
        "rewards": [{"function": "length_penalty", "args": {"per_word": 0.1}}],
        "rollout": {"prompts_per_step": 8, "k": 4, "max_new_tokens": 16},
        "optim": {"lr": 5e-4},
        "train": {"updates": 3, "seed": 1},
        "log": {"progress": False, "log_every": 1},
        "out": str(out),
    }
    for key, value in over.items():
        set_dotted(cfg, key, value)
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


RL_CASES = {
    "rloo": {"algorithm": "rloo"},
    # one minibatch per epoch (the default), two epochs: the second epoch's ratios move off 1 and the
    # value head (outside DDP, averaged by hand) trains; whitening uses the global moments
    "ppo": {"algorithm": "ppo", "update.epochs": 2, "ppo.critic_lr": 3e-3},
}


@pytest.mark.parametrize("case", sorted(RL_CASES))
def test_rl_two_processes_match_one(
    two_processes: None, tmp_path: Path, micro_sft_model: Path, corpus_files: dict, case: str
) -> None:
    """2 processes x 4 prompts = 1 process x 8 prompts: the same answers (sampling is keyed per answer),
    the same global statistics, the same averaged gradient. Tolerance 1e-4: what differs is float
    summation order (left padding of 4- vs 8-prompt generate batches, 1 vs 2 micro-batches, the gloo
    all-reduce), ~1e-7 relative per step, which the few updates at lr 5e-4 keep far below 1e-4; a real
    mistake (a process's share counted twice, a gradient not averaged, local whitening) moves these
    figures by 1e-2 or more."""
    from safetensors.torch import load_file

    from heed.cli import main

    extra = RL_CASES[case]
    one, two = tmp_path / "one", tmp_path / "two"
    prompts = corpus_files["prompts_train"]
    main(["rl", "--config", str(_rl_config(tmp_path, micro_sft_model, prompts, one, **extra))])
    res = _launch(
        ["-m", "heed", "rl", "--config", str(_rl_config(tmp_path, micro_sft_model, prompts, two, **extra))]
    )
    assert res.returncode == 0, res.stderr[-3000:]

    def rows(run: Path) -> list[dict]:
        return [
            r
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"
        ]

    r1, r2 = rows(one), rows(two)
    assert len(r1) == len(r2) == 3
    for key in ("reward/mean", "kl/k1", "loss", "length/mean"):
        a, b = [r[key] for r in r1], [r[key] for r in r2]
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (key, a, b)
    assert r1[-1]["kl/k1"] > 1e-4  # the policy moved away from the reference
    w1 = load_file(one / "final" / "model.safetensors")
    w2 = load_file(two / "final" / "model.safetensors")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4
    if case == "ppo":
        h1 = torch.load(one / "final" / "value_head.pt")
        h2 = torch.load(two / "final" / "value_head.pt")
        assert max(float((h1[k] - h2[k]).abs().max()) for k in h1) < 1e-4
    s2 = json.loads((two / "summary.json").read_text())
    assert s2["processes"] == 2 and s2["samples"] == 3 * 32


def test_rl_prompts_must_split_over_processes(
    two_processes: None, tmp_path: Path, micro_sft_model: Path, corpus_files: dict
) -> None:
    cfg = _rl_config(
        tmp_path,
        micro_sft_model,
        corpus_files["prompts_train"],
        tmp_path / "odd",
        **{"rollout.prompts_per_step": 3, "train.updates": 1},
    )
    res = _launch(["-m", "heed", "rl", "--config", str(cfg)], debug=False)
    assert res.returncode != 0
    assert (
        "error: rollout.prompts_per_step: 3 prompts per update do not split evenly over 2 processes"
        in res.stderr
    )


def test_rl_two_processes_resume(
    two_processes: None, tmp_path: Path, micro_sft_model: Path, corpus_files: dict
) -> None:
    """A 2-process run resumed from its checkpoint (on 2 processes) finishes like the uninterrupted run."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    cfg = _rl_config(
        tmp_path,
        micro_sft_model,
        corpus_files["prompts_train"],
        run,
        algorithm="reinforce",
        **{"log.save_every": 2},
    )
    res = _launch(["-m", "heed", "rl", "--config", str(cfg)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "checkpoints" / "step-2").is_dir()
    w_full = load_file(run / "final" / "model.safetensors")
    last_full = (run / "metrics.jsonl").read_text().splitlines()[-1]
    # as if killed after the checkpoint of update 2: no final model, no summary
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    res = _launch(["-m", "heed", "rl", "--config", str(cfg), "--resume"])
    assert res.returncode == 0, res.stderr[-3000:]
    w_resumed = load_file(run / "final" / "model.safetensors")
    assert max(float((w_full[k] - w_resumed[k]).abs().max()) for k in w_full) < 1e-5
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]  # step 3 logged once, again
    a, b = json.loads(last_full), json.loads(rows[-1])
    assert abs(a["reward/mean"] - b["reward/mean"]) < 1e-5 and abs(a["baseline"] - b["baseline"]) < 1e-5

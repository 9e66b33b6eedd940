"""SFT / pretraining loop: it learns, it resumes a killed run to the same final loss."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from heed.config import config_from_dict
from heed.config.sft import SFTConfig
from heed.report.metrics import read_metrics
from heed.train.sft import train_sft


def _cfg(model: Path, data: Path, out: Path, **train: object) -> SFTConfig:
    return config_from_dict(
        SFTConfig,
        {
            "model": {"path": str(model)},
            "data": {"train": str(data), "max_length": 96, "eval_split": 0.1},
            "train": {"batch_size": 16, "max_steps": 12, "seed": 3, **train},
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            "log": {"log_every": 1, "progress": False},
            "out": str(out),
        },
    )


def test_sft_learns_and_writes_a_run_folder(
    tmp_path: Path, micro_sft_model: Path, corpus_files: dict
) -> None:
    from transformers import AutoModelForCausalLM

    # a prompt/completion task the model has never seen: answer every question with the topic reversed
    data = tmp_path / "task.jsonl"
    rows = [json.loads(line) for line in corpus_files["chat"].read_text().splitlines()[:300]]
    data.write_text(
        "".join(
            json.dumps({"prompt": r["messages"][0]["content"], "completion": f"TOPIC {r['topic'][::-1]}"})
            + "\n"
            for r in rows
        )
    )
    summary = train_sft(_cfg(micro_sft_model, data, tmp_path / "run", max_steps=30))
    rows = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < 0.5 * first, (first, last)
    assert summary["eval/perplexity"] < 20
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/config.json", "final/tokenizer.json"):
        assert (tmp_path / "run" / name).exists(), name
    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")  # plain transformers loads it


def test_pretrain_from_scratch_with_packing(tmp_path: Path, corpus_files: dict) -> None:
    cfg = config_from_dict(
        SFTConfig,
        {
            "model": {"init": "scratch", "size": "micro", "vocab_size": 512},
            "data": {"train": str(corpus_files["text"]), "kind": "text", "packing": True, "max_length": 64},
            "train": {"batch_size": 16, "max_steps": 25},
            "optim": {"lr": 5e-3, "warmup_steps": 3},
            "log": {"log_every": 1, "progress": False},
            "out": str(tmp_path / "base"),
        },
    )
    train_sft(cfg)
    rows = [r for r in read_metrics(tmp_path / "base") if r["split"] == "train"]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.5  # from ~ln(vocab) ≈ 6.2 down by well over a nat
    assert (tmp_path / "base" / "final" / "tokenizer.json").exists()


def test_resume_after_kill_reaches_the_same_final_loss(
    tmp_path: Path, micro_sft_model: Path, corpus_files: dict
) -> None:
    steps, every = 16, 4
    full = train_sft(_cfg(micro_sft_model, corpus_files["chat"], tmp_path / "full", max_steps=steps))

    # the same run in a subprocess, killed with SIGKILL once its first checkpoint exists
    run = tmp_path / "killed"
    args = [
        sys.executable,
        "-m",
        "heed",
        "sft",
        "--set",
        f"model.path={micro_sft_model}",
        "--set",
        f"data.train={corpus_files['chat']}",
        "--set",
        "data.max_length=96",
        "--set",
        "data.eval_split=0.1",
        "--set",
        "train.batch_size=16",
        "--set",
        f"train.max_steps={steps}",
        "--set",
        "train.seed=3",
        "--set",
        "optim.lr=3e-3",
        "--set",
        "optim.warmup_steps=2",
        "--set",
        "log.log_every=1",
        "--set",
        "log.progress=false",
        "--set",
        f"log.save_every={every}",
        "--out",
        str(run),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while (
        time.time() < deadline
        and not (run / "checkpoints" / f"step-{every}").exists()
        and proc.poll() is None
    ):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists(), "the run finished before it could be killed"
    assert (run / "checkpoints" / f"step-{every}").exists()

    r = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    resumed = json.loads((run / "summary.json").read_text())
    assert abs(resumed["train/loss"] - full["train/loss"]) < 1e-5
    assert abs(resumed["eval/loss"] - full["eval/loss"]) < 1e-5
    steps_logged = [r["step"] for r in read_metrics(run) if r["split"] == "train"]
    assert steps_logged == list(range(1, steps + 1))  # no step twice, none missing


@pytest.mark.parametrize("bounded", [True, False])
def test_packed_sft_forwards_carry_document_positions(
    tmp_path: Path, micro_sft_model: Path, corpus_files: dict, monkeypatch: pytest.MonkeyPatch, bounded: bool
) -> None:
    """With data.pack_boundaries the training and eval forwards get each document's own positions (restarting
    inside a row) and no attention mask, which is what keeps attention inside documents
    (tests/data/test_collate.py checks that equivalence); without it, positions run through the row."""
    import heed.models.lm as lm

    seen: list[tuple[bool, bool]] = []  # (no attention mask, positions restart inside a row)
    real = lm.hidden_states

    def spy(model, input_ids, attention_mask, position_ids=None):  # type: ignore[no-untyped-def]
        restart = position_ids is not None and bool((position_ids[:, 1:] < position_ids[:, :-1]).any())
        seen.append((attention_mask is None, restart))
        return real(model, input_ids, attention_mask, position_ids)

    monkeypatch.setattr(lm, "hidden_states", spy)
    cfg = config_from_dict(
        SFTConfig,
        {
            "model": {"path": str(micro_sft_model)},
            "data": {
                "train": str(corpus_files["chat"]),
                "packing": True,
                "pack_boundaries": bounded,
                "max_length": 96,
                "eval_split": 0.05,
            },
            "train": {"batch_size": 8, "max_steps": 2},
            "log": {"progress": False},
            "out": str(tmp_path / "run"),
        },
    )
    train_sft(cfg)
    assert seen and all(s == (bounded, bounded) for s in seen)

"""benchmarks/gpu.sh without a GPU, the summary table of its parts, and the benchmarks' memory check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import gpu_bench  # noqa: E402

NO_GPU_LINE = "no CUDA GPU: nothing to measure"


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available() and shutil.which("nvidia-smi") is not None


def run_gpu_sh(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(BENCH / "gpu.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )


@pytest.mark.skipif(has_cuda(), reason="this machine has a CUDA GPU: gpu.sh would measure it")
def test_gpu_sh_without_a_gpu_prints_one_line_and_exits_0() -> None:
    proc = run_gpu_sh({})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == NO_GPU_LINE


@pytest.mark.skipif(has_cuda(), reason="this machine has a CUDA GPU: gpu.sh would measure it")
def test_gpu_sh_asks_torch_when_nvidia_smi_exists(tmp_path: Path) -> None:
    # an nvidia-smi on PATH but no CUDA device torch can see: the torch check still stops it
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (fake / "nvidia-smi").chmod(0o755)
    proc = run_gpu_sh({"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == NO_GPU_LINE


def test_gpu_sh_with_a_python_without_torch_is_one_error_line(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (fake / "nvidia-smi").chmod(0o755)
    proc = run_gpu_sh({"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "PYTHON": "false"})
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert (
        proc.stderr.strip()
        == "error: false cannot import torch; set PYTHON to the Python that Heed is installed in"
    )


def test_qwen2_05b_workload_has_qwen2_05b_parameter_count() -> None:
    # Qwen2-0.5B has 494,032,768 parameters (tied embeddings): 151936 x 896 embedding, 24 layers of
    # q/k/v/o (with q/k/v biases, 2 KV heads of 64), a 4864-wide SwiGLU MLP and two RMSNorms, a final norm
    config = _common.workload_config("qwen2-0.5b")
    assert _common.parameter_count(config) == 494_032_768


def test_tokenizer_texts_above_32k_reach_the_vocabulary_exactly() -> None:
    # above 32k the default 40000-word pool runs out of pairs to merge; the extended pool (whose first
    # 40000 words are the default pool's) must give BPE enough, as qwen2-0.5b's 151936 needs
    from heed.models.tiny import train_tokenizer

    assert _common._word_pool(n=50000)[:40000] == _common._word_pool()
    tok = train_tokenizer(_common.tokenizer_texts(40000), vocab_size=40000)
    assert len(tok) == 40000


def test_require_memory_is_one_line_naming_the_workload() -> None:
    with pytest.raises(SystemExit) as exc:
        _common.require_memory(1e15, "building workload qwen2-0.5b")
    message = str(exc.value.code)
    assert message.startswith("error: building workload qwen2-0.5b needs about 931322.6 GiB")
    assert "\n" not in message


def test_require_memory_passes_what_fits() -> None:
    _common.require_memory(1024, "building workload qwen2-4k")  # returns, raises nothing


def test_a_too_big_workload_fails_before_allocating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    huge = {
        **_common.WORKLOADS["qwen2-0.5b"],
        "hidden_size": 65536,
        "num_attention_heads": 512,
        "num_key_value_heads": 64,
    }
    monkeypatch.setitem(_common.WORKLOADS, "huge", huge)
    t = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        _common.build_workload("huge", tmp_path)
    message = str(exc.value.code)
    assert message.startswith("error: building workload huge needs about") and "\n" not in message
    # stopped before the tokenizer and the model: nothing written, no time spent building
    assert not (tmp_path / "huge").exists()
    assert time.perf_counter() - t < 5.0


def test_summary_table_exits_1_when_a_part_failed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [
        {"part": "build", "status": "ok", "seconds": 31.0},
        {"part": "rl (vllm)", "status": "skipped", "reason": "needs vllm (not installed)"},
        {
            "part": "rl (hf)",
            "status": "ok",
            "gen_tokens_per_s": 1234.5,
            "samples_per_s": 2.5,
            "peak_gpu_mib": 9000,
        },
        {"part": "sft (QLoRA 4-bit)", "status": "failed", "reason": "error: out of memory"},
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert gpu_bench.summary(tmp_path) == 1
    out = capsys.readouterr().out
    assert "needs vllm (not installed)" in out and "1234.5" in out
    assert out.strip().splitlines()[-1] == "failed: sft (QLoRA 4-bit)"


def test_summary_table_exits_0_when_every_part_ran_or_was_skipped(tmp_path: Path) -> None:
    rows = [{"part": "build", "status": "ok"}, {"part": "fsdp", "status": "skipped", "reason": "needs x"}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert gpu_bench.summary(tmp_path) == 0
    (tmp_path / "results.jsonl").unlink()
    assert gpu_bench.summary(tmp_path) == 1  # no part ran at all

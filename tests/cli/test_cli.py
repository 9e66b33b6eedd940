"""The command line: help, python -m heed, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def heed(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "heed", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_help_lists_commands() -> None:
    r = heed("--help")
    assert r.returncode == 0
    for cmd in ("pretrain", "sft", "generate"):
        assert cmd in r.stdout


def test_import_heed_is_light() -> None:
    code = "import sys, heed, heed.algos, heed.config, heed.data; print(sorted(m for m in ('transformers', 'fastapi', 'gymnasium') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _assert_one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_config_key(tmp_path: Path) -> None:
    _assert_one_line_error(
        heed("sft", "--set", "model.path=x", "--set", "data.train=t", "--set", "optim.lrr=1"),
        "unknown config key 'optim.lrr'",
    )


def test_wrong_model_path(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    _assert_one_line_error(
        heed(
            "sft",
            "--set",
            f"model.path={tmp_path / 'missing'}",
            "--set",
            f"data.train={data}",
            "--out",
            str(tmp_path / "run"),
        ),
        "missing",
        "folder not found",
    )


def test_malformed_data_line(tmp_path: Path, micro_sft_model: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    _assert_one_line_error(
        heed(
            "sft",
            "--set",
            f"model.path={micro_sft_model}",
            "--set",
            f"data.train={data}",
            "--out",
            str(tmp_path / "run"),
        ),
        f"{data}:2: malformed JSON",
    )


def test_empty_data_file(tmp_path: Path, micro_sft_model: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("")
    _assert_one_line_error(
        heed(
            "sft",
            "--set",
            f"model.path={micro_sft_model}",
            "--set",
            f"data.train={data}",
            "--out",
            str(tmp_path / "run"),
        ),
        "empty dataset",
    )


def test_chat_data_without_chat_template(tmp_path: Path, micro_sft_model: Path) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(micro_sft_model, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
        + "\n"
    )
    _assert_one_line_error(
        heed(
            "sft",
            "--set",
            f"model.path={model}",
            "--set",
            f"data.train={data}",
            "--out",
            str(tmp_path / "run"),
        ),
        f"{data}:1",
        "chat template",
    )


def test_debug_shows_traceback(tmp_path: Path) -> None:
    r = heed("sft", "--debug", "--set", "model.path=x", "--set", "data.train=t", "--set", "bogus=1")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_existing_run_folder_is_not_overwritten(
    tmp_path: Path, micro_sft_model: Path, corpus_files: dict
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    _assert_one_line_error(
        heed(
            "sft",
            "--set",
            f"model.path={micro_sft_model}",
            "--set",
            f"data.train={corpus_files['chat']}",
            "--out",
            str(run),
        ),
        "already holds a run",
        "--resume",
    )
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


@pytest.mark.parametrize("k", [3])
def test_generate_writes_k_answers_per_prompt(tmp_path: Path, micro_sft_model: Path, k: int) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": p, "id": i}) + "\n"
            for i, p in enumerate(
                ["What do you think about tea?", "Tell me something about the river, please, in detail?"]
            )
        )
    )
    out = tmp_path / "g.jsonl"
    r = heed(
        "generate",
        "--model",
        str(micro_sft_model),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--num-samples",
        str(k),
        "--max-new-tokens",
        "16",
        "--temperature",
        "0.7",
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1]
    assert all(len(r["responses"]) == k and all(isinstance(x, str) for x in r["responses"]) for r in rows)


def test_warnings_are_one_line_each(tmp_path: Path) -> None:
    # an old RL key name warns: one line `warning: ...`, without Python's source-line echo
    r = heed(
        "rl",
        "--set",
        "model.path=/nonexistent",
        "--set",
        "data.prompts=p.jsonl",
        "--set",
        "rewards=[{function: banana_format}]",
        "--set",
        "critic_lr=0.001",
        cwd=tmp_path,
    )
    lines = r.stderr.strip().splitlines()
    assert (
        "warning: config key 'critic_lr' is now 'ppo.critic_lr'; the old name still works in this release"
        in lines
    )
    assert not any("rename_old_keys" in line or "FutureWarning" in line for line in lines), lines

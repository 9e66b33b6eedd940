"""Every failure of the real ``heed`` command is one line on stderr, names the culprit and the fix,
exits 2 (130 when interrupted), shows no traceback and loses nothing.

The table runs each case through ``python -m heed`` in a subprocess (several at once: most stop
before any model is loaded). ``pytest -s`` prints the table case -> exit code -> message.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from heed.report.metrics import read_metrics

BANANA = str(Path(__file__).resolve().parents[2] / "configs" / "banana.yaml")


def heed(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "NO_COLOR": "1",
        "COLUMNS": "120",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    env.pop("HEED_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "heed", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@dataclass
class Case:
    name: str
    args: list[str]
    code: int
    needles: tuple[str, ...]  # all must appear in the one stderr line
    check: Callable[[], None] | None = None  # what must still be there afterwards


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, micro_sft_model: Path, corpus_files: dict) -> dict:
    root = tmp_path_factory.mktemp("faults")
    a_file = root / "a_file"
    a_file.write_text("not a folder\n")
    no_ckpt = root / "no_ckpt"
    no_ckpt.mkdir()
    (no_ckpt / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}\n')
    old = root / "old_run"  # a finished run that a malformed overwrite must not lose
    (old / "final").mkdir(parents=True)
    (old / "final" / "config.json").write_text("{}\n")
    (old / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}\n')
    (old / "summary.json").write_text('{"train/loss": 2.0}\n')
    bad = root / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    return {
        "root": root,
        "a_file": a_file,
        "no_ckpt": no_ckpt,
        "old": old,
        "bad": bad,
        "sft": [
            "sft",
            "--set",
            f"model.path={micro_sft_model}",
            "--set",
            f"data.train={corpus_files['chat']}",
        ],
    }


def _cases(w: dict) -> list[Case]:
    sft = w["sft"]
    old_files = {p: p.read_bytes() for p in w["old"].rglob("*") if p.is_file()}

    def old_run_intact() -> None:
        now = {p: p.read_bytes() for p in w["old"].rglob("*") if p.is_file()}
        assert now == old_files
        assert not (w["old"] / ".previous-run").exists()

    def no_ckpt_untouched() -> None:
        assert (w["no_ckpt"] / "metrics.jsonl").read_text().count("\n") == 1
        assert not (w["no_ckpt"] / "final").exists()

    return [
        Case(
            "unknown option",
            ["dpo", "--learning-rate", "1"],
            2,
            ("heed dpo", "No such option: --learning-rate", "--set optim.lr"),
        ),
        Case("unknown command", ["trian"], 2, ("No such command 'trian'", "heed --help")),
        Case("missing option", ["generate"], 2, ("heed generate", "Missing option '--model'")),
        Case("missing value", ["sft", "--set"], 2, ("heed sft", "'--set' requires an argument")),
        Case("bad option value", ["rm", "score", "--batch-size", "x"], 2, ("'--batch-size'", "integer")),
        Case("infinite lr (rl)", ["rl", "-c", BANANA, "--set", "optim.lr=.inf"], 2, ("optim.lr", "finite")),
        Case("nan lr (sft)", [*sft, "--set", "optim.lr=.nan"], 2, ("optim.lr", "finite")),
        Case(
            "--out is a file", [*sft, "--out", str(w["a_file"])], 2, (str(w["a_file"]), "is a file", "--out")
        ),
        Case("--out under a file", [*sft, "--out", str(w["a_file"] / "run")], 2, (str(w["a_file"]), "--out")),
        Case(
            "--out uncreatable",
            [*sft, "--out", "/proc/heed-run"],
            2,
            ("/proc/heed-run", "cannot be created", "--out"),
        ),
        Case(
            "--resume, no checkpoint",
            [*sft, "--out", str(w["no_ckpt"]), "--resume"],
            2,
            (str(w["no_ckpt"]), "no checkpoint", "overwrite=true"),
            no_ckpt_untouched,
        ),
        Case(
            "overwrite, malformed data",
            [*sft, "--set", f"data.train={w['bad']}", "--set", "overwrite=true", "--out", str(w["old"])],
            2,
            (f"{w['bad']}:2", "malformed JSON"),
            old_run_intact,
        ),
    ]


@pytest.fixture(scope="module")
def results(world: dict) -> list[tuple[Case, subprocess.CompletedProcess[str]]]:
    cases = _cases(world)
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = list(pool.map(lambda c: heed(*c.args), cases))
    print("\ncase                         exit  stderr")
    for c, r in zip(cases, done, strict=True):
        print(f"{c.name:<28} {r.returncode:>4}  {r.stderr.strip()}")
    return list(zip(cases, done, strict=True))


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_every_failure_is_one_line(results: list[tuple[Case, subprocess.CompletedProcess[str]]]) -> None:
    for case, r in results:
        assert r.returncode == case.code, (case.name, r.returncode, r.stderr)
        line = _one_line(r)
        assert line.startswith("error: "), (case.name, line)
        for needle in case.needles:
            assert needle in line, (case.name, needle, line)
        if case.check is not None:
            case.check()


@pytest.mark.parametrize("args", [[], ["rm"]])
def test_a_bare_command_prints_its_help(args: list[str]) -> None:
    r = heed(*args)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "Usage" in r.stdout and ("train" in r.stdout)


def test_read_only_out(tmp_path: Path, world: dict) -> None:
    """A read-only folder (root ignores file modes, so a read-only tmpfs stands in for one)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        r = heed(*world["sft"], "--out", str(ro / "run"))
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=True)
    assert r.returncode == 2
    line = _one_line(r)
    assert str(ro / "run") in line and "not writable" in line and "--out" in line


def test_ctrl_c_says_where_the_run_stopped_and_resume_continues_it(tmp_path: Path, world: dict) -> None:
    """A real SIGINT to a training process: exit 130, one line naming the run folder and its last
    checkpoint, with the command that resumes it; that command finishes the run, no step twice."""
    run = tmp_path / "run"
    steps = 150
    args = [
        *world["sft"],
        "--set", "train.batch_size=4",
        "--set", "data.max_length=48",
        "--set", f"train.max_steps={steps}",
        "--set", "log.save_every=5",
        "--set", "log.log_every=1",
        "--set", "log.progress=false",
        "--out", str(run),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "heed", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "step-5").exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert not (run / "final").exists(), "the run finished before it could be interrupted"
    r = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    assert r.returncode == 130, err
    line = _one_line(r)
    assert line.startswith(f"interrupted: {run}: stopped; its last checkpoint is step-"), line
    assert "resume with: heed sft " in line and line.endswith("--resume"), line

    resume = shlex.split(line.split("resume with: ", 1)[1])[1:]
    again = heed(*resume)
    assert again.returncode == 0, again.stderr
    logged = [r["step"] for r in read_metrics(run) if r["split"] == "train"]
    assert logged == list(range(1, steps + 1))  # no step twice, none missing
    assert json.loads((run / "summary.json").read_text())["steps"] == steps

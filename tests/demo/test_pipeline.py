"""The demo pipeline: killed mid-way, it resumes without redoing finished stages; a rerun reuses all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUN = (
    "import sys; from dataclasses import replace; from heed.demo.pipeline import DemoSettings, SMOKE, run_demo; "
    "run_demo(replace(DemoSettings(out=sys.argv[1], progress=False), **SMOKE))"
)


def _demo(out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", RUN, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke-sized demo, killed (SIGKILL) while the reward model trains, then run again to the end."""
    out = tmp_path_factory.mktemp("demo")
    proc = _demo(out)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and not (out / "runs" / "rm").exists():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "report.html").exists(), "the demo finished before it could be killed"
    first = json.loads((out / "stages.json").read_text())["stages"]
    assert [s["name"] for s in first][:3] == ["corpus", "base model", "sft"]

    second = _demo(out)
    log, _ = second.communicate(timeout=1800)
    assert second.returncode == 0, log
    return out


def test_resume_reuses_finished_stages_and_completes(demo_dir: Path) -> None:
    stages = {s["name"]: s for s in json.loads((demo_dir / "stages.json").read_text())["stages"]}
    # stages finished before the kill were not redone: their recorded time is from the first run
    for name in ("corpus", "base model", "sft", "sample answers (round 1)", "annotate + export (round 1)"):
        assert stages[name]["reused"] is False and stages[name]["seconds"] >= 0
    for name in (
        "reward model (rm)",
        "ppo",
        "rloo-banana",
        "dpo",
        "annotate + export (round 2)",
        "reward model (rm-round-2)",
        "ppo-round-2",
        "evaluate policies",
    ):
        assert name in stages
    for run in (
        "base",
        "sft",
        "rm",
        "ppo",
        "rloo-banana",
        "dpo",
        "rm-round-2",
        "ppo-round-2",
        "kto-thumbs",
        "sft-edits",
        "dpo-edits",
    ):
        summary = demo_dir / "runs" / run / "summary.json"
        assert summary.exists(), run
        json.loads(summary.read_text())  # complete, parseable
    assert not list(demo_dir.rglob("*.tmp")), "no temporary files left behind"
    assert (demo_dir / "report.html").stat().st_size > 10_000
    # best-of-N of the SFT model (SMOKE: N = 1, 2), the frontier of the report's score-vs-KL plot
    for n in (1, 2):
        ev = json.loads((demo_dir / "runs" / f"best-of-{n}" / "eval.json").read_text())
        assert ev["eval/best_of"] == n and "gold/positivity" in ev
    assert "<h2>Score vs KL</h2>" in (demo_dir / "report.html").read_text(encoding="utf-8")


def test_annotations_went_through_the_store(demo_dir: Path) -> None:
    from heed.feedback.service import Feedback

    fb = Feedback(f"sqlite:///{demo_dir / 'feedback.db'}")
    try:
        projects = {p.name for p in fb.projects()}
        assert projects == {"demo-round-1", "demo-round-2", "demo-thumbs", "demo-edits"}
        for p in projects:
            prog = fb.progress(p)
            overlap = 3 if p.startswith("demo-round") else 1  # rankings by all three; thumbs, edits by one
            assert prog["annotations"] == overlap * prog["total"] > 0, prog
        assert fb.kinds("demo-thumbs").judgement == "binary" and fb.kinds("demo-edits").kinds == ("edit",)
    finally:
        fb.close()
    agreement = json.loads((demo_dir / "agreement.json").read_text())
    assert agreement["n_annotators"] == 3 and set(agreement["rounds"]) == {"1", "2"}
    ranked = [
        json.loads(line) for line in (demo_dir / "rounds" / "1" / "ranked.jsonl").read_text().splitlines()
    ]
    assert ranked and all(len(r["responses"]) == len(r["ranks"]) >= 2 for r in ranked)
    kinds = json.loads((demo_dir / "feedback_kinds.json").read_text())
    assert [r["policy"] for r in kinds["kinds"]] == ["dpo", "ppo", "kto-thumbs", "sft-edits", "dpo-edits"]
    assert all(r["labels"] > 0 and r["gold_positivity"] is not None for r in kinds["kinds"])
    assert agreement["feedback_kinds"] == kinds["kinds"]  # shown in the report beside the agreement


def test_rerun_reuses_everything(demo_dir: Path) -> None:
    before = (demo_dir / "runs" / "ppo" / "summary.json").stat().st_mtime
    proc = _demo(demo_dir)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    assert log.count("reused") >= 14 and "▶" not in log, log
    assert (demo_dir / "runs" / "ppo" / "summary.json").stat().st_mtime == before

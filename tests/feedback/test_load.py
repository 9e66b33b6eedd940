"""A small version of benchmarks/annotate_load.py: real HTTP on 127.0.0.1 to a `heed annotate serve`
subprocess, SIGKILLed and restarted mid-run. Nothing acknowledged may be lost or stored twice,
and no record may get more than `overlap` annotations."""

from __future__ import annotations

import pytest

from heed.feedback.loadtest import run_load


def test_load_with_sigkill_and_restart(tmp_path, db_url: str) -> None:  # type: ignore[no-untyped-def]
    if db_url.startswith("sqlite"):
        db_url = f"sqlite:///{tmp_path / 'load.db'}"
    figures = run_load(
        tmp_path,
        annotators=6,
        annotations=120,
        overlap=2,
        kill_after=40,
        db=db_url,
        fast_hashes=True,
        timeout_s=180,
    )
    print(figures)
    assert figures["errors"] == []
    assert figures["kills"] == 1
    assert figures["acknowledged"] == figures["target_annotations"] == figures["stored"] == 120
    assert figures["lost"] == 0 and figures["stored_twice"] == 0 and figures["over_assigned_records"] == 0
    assert figures["unacknowledged_stored"] == 0 and figures["complete_records"] == 60


@pytest.mark.parametrize("task", ["ranking"])
def test_load_ranking_steady(tmp_path, task: str) -> None:  # type: ignore[no-untyped-def]
    figures = run_load(
        tmp_path, annotators=4, annotations=40, overlap=2, task=task, fast_hashes=True, timeout_s=120
    )
    assert figures["errors"] == [] and figures["stored"] == figures["acknowledged"] == 40
    assert figures["over_assigned_records"] == 0

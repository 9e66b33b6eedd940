"""`heed annotate watch`: start a command every N complete records, through the real SQLite store."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

from heed.cli import main

# The command the watch starts: writes run-<n> holding the count of complete records it saw.
WRITE_RUN = (
    "import os, pathlib; "
    "pathlib.Path(os.environ['WATCH_OUT'], 'run-' + os.environ['HEED_WATCH_RUN'])"
    ".write_text(os.environ['HEED_WATCH_PROJECT'] + ':' + os.environ['HEED_WATCH_COMPLETE'])"
)


@pytest.fixture
def project(tmp_path: Path, hasher, monkeypatch):  # type: ignore[no-untyped-def]
    from heed.feedback.service import Feedback

    monkeypatch.setenv("WATCH_OUT", str(tmp_path))
    db = tmp_path / "w.db"
    fb = Feedback(f"sqlite:///{db}", hasher=hasher, seed=0)
    fb.create_project("p", task="pairwise", overlap=2)
    fb.add_user("ann1")
    fb.add_user("ann2")
    yield fb, db
    fb.close()


def add(fb, n: int) -> None:  # type: ignore[no-untyped-def]
    """Import n records; annotators are handed the least-annotated records first, so labelling
    the new ones with both annotators completes exactly these."""
    fb.import_records("p", [{"prompt": "q", "responses": ["yes", "no"]} for _ in range(n)])


def label(fb, user: str, n: int) -> None:  # type: ignore[no-untyped-def]
    for _ in range(n):
        a = fb.next_assignment(user, "p")
        fb.submit(user, "p", a.record_id, choice=a.display_choice(0), key=f"{user}-{a.record_id}")


def watch(db: Path, state: Path, *args: str, command: tuple[str, ...] = ("-c", WRITE_RUN)) -> None:
    options = ["--every", "3", "--db", str(db), "--state", str(state), *args]
    main(["annotate", "watch", "-p", "p", *options, "--", sys.executable, *command])


def runs(folder: Path) -> dict[str, str]:
    return {f.name: f.read_text() for f in sorted(folder.glob("run-*"))}


def test_watch_starts_once_per_n_complete_records(project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fb, db = project
    state = tmp_path / "state.json"
    add(fb, 3)
    label(fb, "ann1", 3)
    label(fb, "ann2", 2)  # 2 records complete (overlap 2), one half done: not due
    watch(db, state, "--once")
    assert runs(tmp_path) == {}
    label(fb, "ann2", 1)  # 3 complete
    watch(db, state, "--once")
    assert runs(tmp_path) == {"run-1": "p:3"}
    watch(db, state, "--once")  # a restart does not start it again for the same records
    assert runs(tmp_path) == {"run-1": "p:3"}
    saved = json.loads(state.read_text())
    assert (saved["last_complete"], saved["runs"], saved["last_run"]["status"]) == (3, 1, "ok")

    # polling: the watch waits until three more records are complete, runs once, stops (--max-runs 1)
    thread = threading.Thread(
        target=watch, args=(db, state, "--interval", "0.05", "--max-runs", "1"), daemon=True
    )
    thread.start()
    add(fb, 3)
    label(fb, "ann1", 3)
    label(fb, "ann2", 2)
    thread.join(0.5)
    assert thread.is_alive() and runs(tmp_path) == {"run-1": "p:3"}  # 5 complete: 2 new, not yet
    label(fb, "ann2", 1)
    thread.join(30)
    assert not thread.is_alive()
    assert runs(tmp_path) == {"run-1": "p:3", "run-2": "p:6"}


def test_watch_failures_and_restarts(project, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    fb, db = project
    state = tmp_path / "state.json"
    add(fb, 6)
    label(fb, "ann1", 6)
    label(fb, "ann2", 6)
    # a failing command stops the watch with one line and gives its records back
    with pytest.raises(SystemExit) as exc:
        watch(db, state, "--once", command=("-c", "raise SystemExit(3)"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: watch: run 1 (") and err.endswith(
        "exited with code 3; fix it and start the watch again to retry"
    )
    assert json.loads(state.read_text())["last_complete"] == 0
    watch(db, state, "--once")  # retried as run 2
    assert runs(tmp_path) == {"run-2": "p:6"}

    # a run the watch never saw end (killed) is not started again for the same records
    saved = json.loads(state.read_text())
    saved["last_run"]["status"] = "running"
    state.write_text(json.dumps(saved))
    capsys.readouterr()
    watch(db, state, "--once")
    assert "run 2 was interrupted; not started again" in capsys.readouterr().out
    assert runs(tmp_path) == {"run-2": "p:6"}
    assert json.loads(state.read_text())["last_run"]["status"] == "interrupted"

    # one-line errors: bad options, a broken or foreign state file, no command, a missing program
    def error(*argv: str) -> str:
        with pytest.raises(SystemExit) as exc:
            main(["annotate", "watch", "-p", "p", "--db", str(db), *argv])
        assert exc.value.code == 2
        return capsys.readouterr().err.strip()

    assert error("--every", "0", "--", "true") == "error: --every 0: expected a positive number of records"
    assert error("--every", "1", "--max-runs", "0", "--", "true") == "error: --max-runs 0: expected 1 or more"
    assert error("--every", "1", "--state", str(state)).startswith("error: watch: give the command after --")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert error("--every", "1", "--state", str(broken), "--", "true").startswith(
        f"error: {broken}: not a watch state file (JSONDecodeError"
    )
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"project": "q", "last_complete": 0, "runs": 0}))
    assert error("--every", "1", "--state", str(foreign), "--", "true") == (
        f"error: {foreign}: state of project 'q', not 'p'; pass --state FILE"
    )
    add(fb, 1)
    label(fb, "ann1", 1)
    label(fb, "ann2", 1)
    assert error(
        "--every", "1", "--once", "--state", str(state), "--", str(tmp_path / "no-such-program")
    ) == (
        f"error: watch: cannot start '{tmp_path / 'no-such-program'}' (No such file or directory);"
        " fix it and start the watch again to retry"
    )
    assert error("--every", "1", "-p", "nope", "--state", str(tmp_path / "n.json"), "--", "true") == (
        "error: project 'nope' not found"
    )

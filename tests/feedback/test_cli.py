"""`heed annotate ...` end to end through the command line entry point."""

from __future__ import annotations

import json

import pytest

from heed.cli import main


def run(capsys, *args: str) -> str:  # type: ignore[no-untyped-def]
    main(list(args))
    return capsys.readouterr().out


def test_cli_project_import_label_export(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    db = str(tmp_path / "a.db")
    guide = tmp_path / "guide.md"
    guide.write_text("# 指南\nBe kind.", encoding="utf-8")
    run(
        capsys,
        "annotate",
        "project",
        "create",
        "p",
        "--task",
        "pairwise",
        "--overlap",
        "1",
        "--guidelines",
        str(guide),
        "--db",
        db,
    )
    out = run(capsys, "annotate", "user", "add", "boss", "--role", "admin", "--db", db)
    assert out.startswith("user boss (admin) password: ")
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"prompt": f"q{i}", "chosen": "yes", "rejected": "no", "src": "cli"}, ensure_ascii=False
            )
            + "\n"
            for i in range(2)
        ),
        encoding="utf-8",
    )
    assert "imported 2 records" in run(
        capsys, "annotate", "import", "--project", "p", "--data", str(data), "--db", db
    )

    from heed.feedback.service import Feedback

    fb = Feedback(db)
    while (a := fb.next_assignment("boss", "p")) is not None:
        fb.submit("boss", "p", a.record_id, choice=a.display_choice(0), key=str(a.record_id))
    fb.close()
    out = run(
        capsys,
        "annotate",
        "export",
        "--project",
        "p",
        "--format",
        "pairs",
        "--out",
        str(tmp_path / "o.jsonl"),
        "--db",
        db,
    )
    assert "wrote 2 pairs rows" in out
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"], r["src"]) for r in rows] == [
        ("q0", "yes", "no", "cli"),
        ("q1", "yes", "no", "cli"),
    ]
    stats = json.loads(run(capsys, "annotate", "stats", "--project", "p", "--db", db))
    assert stats["progress"]["annotations"] == 2


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    db = str(tmp_path / "a.db")
    run(capsys, "annotate", "project", "create", "p", "--db", db)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "responses": ["a", "b"]}\n{"prompt": "q", "responses": [1, "b"]}\n')
    with pytest.raises(SystemExit) as exc:
        main(["annotate", "import", "--project", "p", "--data", str(bad), "--db", db])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}:2: responses[0]: expected text, got int"
    with pytest.raises(SystemExit):
        main(["annotate", "export", "--project", "nope", "--out", str(tmp_path / "x.jsonl"), "--db", db])
    assert "project 'nope' not found" in capsys.readouterr().err

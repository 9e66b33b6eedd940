"""report.html built from synthetic run folders: structure, escaping, errors, the CLI."""

import base64
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from heed.cli import main
from heed.errors import DataError, HeedError
from heed.report import write_report
from heed.report.runs import load_collection


class Page(HTMLParser):
    """Collects what the tests look at: images, tables (as lists of row texts), scripts, links."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.scripts = 0
        self.links: list[str] = []
        self._table: list[list[str]] | None = None
        self._depth = 0
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "script":
            self.scripts += 1
        for name in ("href", "src", "action"):
            if name in a and tag != "img":
                self.links.append(a[name])
        if tag == "table":
            self._depth += 1
            if self._depth == 1:
                self._table = self.tables.setdefault(a.get("class", "?"), [])
        if self._depth == 1 and tag == "tr":
            self._row = []
        if self._depth == 1 and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._depth -= 1
        if self._depth == 1 and tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        if self._depth == 1 and tag == "tr" and self._row is not None and self._table is not None:
            self._table.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> tuple[str, Page]:
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    return text, page


def test_demo_folder_report(demo_folder, evil):
    out = write_report(demo_folder)
    assert out == demo_folder / "report.html"
    text, page = parse(out)
    # self-contained: every image is an embedded PNG, no scripts, no links out
    assert len(page.images) >= 20
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.scripts == 0 and page.links == []
    assert "Content-Security-Policy" in text
    # model text is escaped: the literal tag never reaches the page, its escaped form does
    assert evil not in text and "<script>window" not in text
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in text
    assert "&lt;b&gt;sim-2&lt;/b&gt;" in text  # annotator names too
    # headline cards: SFT -> tuned gold, and the alarms
    assert "0.31 → 0.82" in text and "0.31 → 0.5" in text and "6 alarms" in text
    # policies side by side: header + SFT first, then the tuned policies in stage order
    compare = page.tables["compare"]
    assert [r[0] for r in compare[1:5]] == ["sft", "ppo", "grpo", "dpo"]
    header = compare[0]
    grpo = dict(zip(header, compare[3], strict=True))
    assert grpo["gold/positivity"] == "0.82 +0.51" and grpo["alarms"] == "0"
    # alarms: ppo's six from alarms.jsonl, in step order
    alarms = page.tables["alarms"]
    assert [(r[0], r[2]) for r in alarms[1:]] == [
        ("ppo", "length_trend"),
        ("ppo", "low_distinct"),
        ("ppo", "repeated_answers"),
        ("ppo", "overoptimisation"),
        ("ppo", "entropy_collapse"),
        ("ppo", "kl_budget"),
    ]
    # before/after answers: 4 prompts x (sft, ppo, grpo)
    samples = page.tables["samples"]
    assert samples[0] == ["prompt", "sft", "ppo", "grpo"]
    assert len(samples) == 1 + 4
    assert any("grpo says: it was wonderful 1" in cell for cell in samples[2])
    # stage times
    assert [r[0] for r in page.tables["stages"]] == ["sft", "rm", "ppo", "grpo", "dpo"]
    assert "6 min 04 s" in text


def test_single_run_replays_monitors_when_no_alarms_file(demo_folder, tmp_path):
    run = demo_folder / "runs" / "grpo"
    out = write_report(run, tmp_path / "grpo.html")
    text, _ = parse(out)
    assert out.exists() and not (run / "report.html").exists()
    assert "monitors were replayed" in text
    # a lone run has no SFT run to compare with: the card reads first -> last logged
    assert "first → last logged" in text
    coll = load_collection(run)
    assert [r.name for r in coll.runs] == ["grpo"] and coll.runs[0].alarms_replayed


def test_replayed_alarms_use_the_run_monitor_config(demo_folder):
    # ppo's alarms.jsonl was written live; remove it and the replay must find the same story
    ppo = demo_folder / "runs" / "ppo"
    live = {a["kind"] for a in map(json.loads, (ppo / "alarms.jsonl").read_text().splitlines())}
    (ppo / "alarms.jsonl").unlink()
    coll = load_collection(demo_folder)
    replayed = next(r for r in coll.runs if r.name == "ppo")
    assert replayed.alarms_replayed
    assert {a.kind for a in replayed.alarms} == live


def test_user_errors(tmp_path, demo_folder):
    with pytest.raises(HeedError, match="no such folder"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HeedError, match="no run found"):
        write_report(tmp_path / "empty")
    (demo_folder / "runs" / "dpo" / "summary.json").write_text('{"algo": "dpo",\n  "kl": }')
    with pytest.raises(DataError, match=r"dpo/summary.json:2: not valid JSON"):
        write_report(demo_folder)


def test_cli_report(demo_folder, tmp_path, capsys):
    import typer.main

    from heed.cli import app

    # Typer runs a lone command without its name; once other commands exist `report` is needed.
    cmd = ["report"] if hasattr(typer.main.get_command(app), "commands") else []
    main([*cmd, str(demo_folder), "--out", str(tmp_path / "r.html")])
    assert "wrote" in capsys.readouterr().out and (tmp_path / "r.html").stat().st_size > 10_000
    with pytest.raises(SystemExit) as exc:
        main([*cmd, str(tmp_path / "missing")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_import_is_light():
    code = "import sys, heed.report; print('matplotlib' in sys.modules, 'torch' in sys.modules)"
    src = str(Path(__file__).resolve().parents[2] / "src")
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src}
    )
    assert res.stdout.split() == ["False", "False"], res.stderr


def test_sparse_run_folders(tmp_path):
    # a run with only a summary
    only_summary = tmp_path / "a"
    only_summary.mkdir()
    (only_summary / "summary.json").write_text('{"eval": {"success": 0.5}}')
    text, _ = parse(write_report(only_summary))
    assert "eval/success" in text and "✓ no alarms" in text
    # samples at two steps without a policy field: the first step becomes the "before" column
    samples_only = tmp_path / "b"
    samples_only.mkdir()
    rows = [
        {"step": s, "prompt": f"p{i}", "completion": f"answer {s} to {i}", "reward": s / 10}
        for s in (0, 50)
        for i in range(3)
    ]
    (samples_only / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, page = parse(write_report(samples_only))
    assert page.tables["samples"][0] == ["prompt", "b @ step 0", "b"]
    assert len(page.tables["samples"]) == 4
    # a control run: episode returns only, one eval row
    control = tmp_path / "c"
    control.mkdir()
    (control / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "split": "train", "episode/return": -1000 + 8 * s}) + "\n"
            for s in range(100)
        )
        + json.dumps({"step": 99, "split": "eval", "episode/return": -150.0})
        + "\n"
    )
    text, page = parse(write_report(control))
    assert "-1,000 → -150" in text  # first logged -> last logged (the eval row)
    assert len(page.images) == 1


def test_cards_lead_with_what_moved_most_and_never_compare_losses_across_runs(demo_folder, tmp_path):
    # a pretraining run beside the SFT run: both log a loss, on different data
    base = demo_folder / "runs" / "base"
    from heed.report.metrics import MetricsLogger

    log = MetricsLogger(base)
    log.log(0, {"loss": 5.0, "perplexity": 150.0}, split="eval")
    log.log(100, {"loss": 1.2, "perplexity": 3.3}, split="eval")
    sft = MetricsLogger(demo_folder / "runs" / "sft")
    sft.log(100, {"loss": 0.8}, split="eval")
    text, _ = parse(write_report(demo_folder, tmp_path / "r.html"))
    # the headline cards show the metrics that moved most first: grpo success 0.2 -> 0.9 before gold 0.31 -> 0.82
    assert text.index("GRPO · eval/success") < text.index("GRPO · gold/positivity")
    assert "0.2 → 0.9" in text
    # the base run's loss reads first -> last logged, not "vs sft" (whose summary has a loss too)
    card = text[text.index("BASE · loss") :]
    assert "5 → 1.2" in card[:60] and "first → last logged" in card[:150] and "vs sft" not in card[:150]

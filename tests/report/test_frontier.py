"""The report's score-vs-KL plot: each run's final (KL, score) is a point, the folders of
``heed eval --best-of N`` are the reference frontier, sorted by N with KL = log N − (N − 1)/N."""

from __future__ import annotations

import json
import math
import re
from itertools import pairwise
from pathlib import Path

import pytest

from heed.report.frontier import score_vs_kl
from heed.report.render import write_report
from heed.report.runs import load_collection

NS = (1, 2, 4, 8, 16)
# gold positivity of best-of-N of the SFT model (made up, rising with N)
BON_GOLD = {1: 0.30, 2: 0.45, 4: 0.58, 8: 0.67, 16: 0.85}  # 16 above every run


def _write(path: Path, name: str, data: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(json.dumps(data), encoding="utf-8")


def _folder(root: Path) -> Path:
    """A folder of runs as the trainers and ``heed eval`` write them."""
    for n in NS:  # heed eval --model builtin --best-of N --out ROOT/best-of-N
        kl = math.log(n) - (n - 1) / n
        _write(
            root / f"best-of-{n}",
            "eval.json",
            {"eval/best_of": n, "eval/kl": kl, "gold/positivity": BON_GOLD[n]},
        )
    # heed online-dpo and heed rs: the end-of-run evaluation in summary.json (kl/k1, gold)
    _write(root / "online-dpo", "summary.json", {"algo": "online_dpo", "kl/k1": 1.2, "gold/positivity": 0.71})
    _write(root / "rs", "summary.json", {"algo": "rs", "kl/k1": 3.0, "gold/positivity": 0.80})
    # heed rl: eval/kl and gold at the end; the last training step's kl/k1 must not be taken
    for algo, kl, gold in (("ppo", 2.0, 0.69), ("rloo", 0.5, 0.50)):
        _write(
            root / algo, "summary.json", {"algo": algo, "kl/k1": 9.9, "eval/kl": kl, "gold/positivity": gold}
        )
    # heed dpo has no gold of its own: heed eval --model RUN/final --out RUN adds eval.json
    _write(root / "dpo", "summary.json", {"algo": "dpo", "kl/k1": 1.1, "dpo/accuracy": 0.9})
    _write(root / "dpo", "eval.json", {"eval/kl": 1.0, "gold/positivity": 0.60})
    # a reward model run: neither KL nor gold, no point
    _write(root / "rm", "summary.json", {"algo": "reward", "rm/accuracy": 0.8})
    return root


def test_points_and_frontier(tmp_path: Path) -> None:
    data = score_vs_kl(load_collection(_folder(tmp_path)))
    assert data is not None
    assert data.score_key == "gold/positivity"
    points = {p.run: (p.method, p.kl, p.score) for p in data.points}
    assert points == {
        "dpo": ("dpo", 1.0, 0.60),  # eval.json's eval/kl before summary.json's kl/k1
        "online-dpo": ("online_dpo", 1.2, 0.71),
        "ppo": ("ppo", 2.0, 0.69),
        "rloo": ("rloo", 0.5, 0.50),
        "rs": ("rs", 3.0, 0.80),
    }
    assert [p.n for p in data.frontier] == list(NS)  # sorted by N (the folders sort as 1, 16, 2, 4, 8)
    kls = [p.kl for p in data.frontier]
    assert kls[0] == 0.0
    assert all(a < b for a, b in pairwise(kls))  # KL grows with N
    assert kls[-1] == pytest.approx(math.log(16) - 15 / 16)
    assert [p.score for p in data.frontier] == [BON_GOLD[n] for n in NS]
    # the curve between N = 2 (KL 0.193) and N = 4 (KL 0.636) at KL 0.5:
    # 0.45 + (0.5 - 0.1931) / (0.6363 - 0.1931) * (0.58 - 0.45) = 0.5400
    assert data.frontier_at(0.5) == pytest.approx(0.45 + (0.5 - kls[1]) / (kls[2] - kls[1]) * 0.13)
    assert data.frontier_at(kls[-1] + 0.1) is None  # beyond best-of-16


def test_score_falls_back_to_the_judge_reward(tmp_path: Path) -> None:
    _write(tmp_path / "a", "summary.json", {"algo": "online_dpo", "kl/k1": 0.4, "eval/reward": 1.5})
    _write(tmp_path / "best-of-4", "eval.json", {"eval/best_of": 4, "eval/kl": 0.64, "eval/reward": 1.1})
    data = score_vs_kl(load_collection(tmp_path))
    assert data is not None and data.score_key == "eval/reward"
    assert [(p.run, p.score) for p in data.points] == [("a", 1.5)]
    assert [p.n for p in data.frontier] == [4]


def test_report_has_the_plot_and_its_table(tmp_path: Path) -> None:
    path = write_report(_folder(tmp_path / "runs"), tmp_path / "report.html")
    page = path.read_text(encoding="utf-8")
    section = page[page.index("<h2>Score vs KL</h2>") :]
    section = section[: section.index("</section>")]
    assert re.search(
        r'<img alt="gold/positivity vs KL" src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', section
    )
    for name in ("best-of-1", "best-of-16", "online-dpo", "rs", "ppo", "rloo", "dpo"):
        assert f"<th>{name}</th>" in section
    assert "<th>rm</th>" not in section
    # online DPO at KL 1.2 against the curve between N = 4 (0.636, 0.58) and N = 8 (1.205, 0.67)
    kl4, kl8 = math.log(4) - 0.75, math.log(8) - 7 / 8
    gap = 0.71 - (0.58 + (1.2 - kl4) / (kl8 - kl4) * 0.09)
    assert f"{gap:+.3f}" in section
    assert "http" not in page.split("</style>")[1].replace("http-equiv", "")  # still self-contained
    # best-of-N folders are a reference, not tuned policies: no headline card, not the verdict's best
    cards = page[page.index('<section class="cards">') :]
    assert "BEST-OF-" not in cards[: cards.index("</section>")]
    verdict = page[page.index('<p class="verdict">') :]
    assert "<b>RS</b>" in verdict[: verdict.index("</p>")]


def test_no_section_without_points(tmp_path: Path) -> None:
    _write(tmp_path / "rm", "summary.json", {"algo": "reward", "rm/accuracy": 0.8})
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "Score vs KL" not in page

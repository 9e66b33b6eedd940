"""``heed eval --best-of N``: the kept answer is the highest-rewarded of each prompt's N, and the KL is
the closed form log N − (N − 1)/N."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

REWARD = '''
import json, os

def words(prompts, completions, **columns):
    """Reward = number of words; every call is recorded so the test can redo the choice."""
    scores = [float(len(c.split())) for c in completions]
    with open(os.environ["HEED_TEST_RECORD"], "a") as f:
        f.write(json.dumps(scores) + "\\n")
    return scores
'''


@pytest.mark.parametrize("n", [1, 4])  # 1: one answer per prompt, KL 0 (the frontier's first point)
def test_best_of_n_keeps_the_best_answer_and_reports_the_closed_form_kl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    from heed.cli import main

    (tmp_path / "reward.py").write_text(REWARD)
    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("HEED_TEST_RECORD", str(record))
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        "model: {path: builtin:micro}\n"
        "data: {prompts: builtin:micro:prompts_train, eval_prompts: builtin:micro:prompts_eval}\n"
        "rewards: [{function: reward.py:words}]\n"
        "rollout: {max_new_tokens: 12}\n"
        "eval: {num_prompts: 6, temperature: 1.0}\n"
    )
    main(
        [
            "eval",
            "--model",
            "builtin:micro",
            "--config",
            str(cfg),
            "--best-of",
            str(n),
            "--out",
            str(tmp_path / "e"),
        ]
    )
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    scores = calls[0]  # the one scoring call: 6 prompts x n answers, prompt-major
    assert len(scores) == 6 * n
    best = [max(scores[i * n : (i + 1) * n]) for i in range(6)]
    assert result["eval/reward"] == pytest.approx(sum(best) / 6)
    assert result["eval/kl"] == pytest.approx(math.log(n) - (n - 1) / n)
    assert result["eval/best_of"] == n


def test_best_of_below_one_is_a_usage_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "heed", "eval", "--model", "m", "--config", "c.yaml", "--best-of", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "--best-of" in r.stderr and "Traceback" not in r.stderr
